import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Message, MetricRecord, RecordDict
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import load
from fedmed.federation import sampling
from fedmed.federation.strategy import Recording, build_strategy


@pytest.fixture(autouse=True)
def task_identity(monkeypatch):
    """Messages are stamped with the task that creates them; the engine sets this, here we do."""
    for name, value in (("_task_id", 1), ("_run_id", 1), ("_node_id", 0)):
        monkeypatch.setattr(TaskIdentity, name, value, raising=False)


def _strategy(names: list[str]) -> Recording:
    """FedAvg that asked each of `names` to train (request `ask-<name>`)."""
    strategy = build_strategy(load(), set())
    for name in names:
        request = Message(RecordDict(), dst_node_id=1, message_type="train")
        request.metadata.__dict__["_message_id"] = f"ask-{name}"
        strategy.requests.append((request, name))
    return strategy


def _reply(name: str, weights: dict[str, np.ndarray], n: int, acc: float) -> Message:
    """Hospital `name`'s reply to its request."""
    content = RecordDict(
        {
            "arrays": ArrayRecord({k: Array(v) for k, v in weights.items()}),
            "metrics": MetricRecord({"num-examples": n, "train-accuracy": acc, "confusion": [n, 0]}),
            "site": ConfigRecord({"name": name}),
        }
    )
    message = Message(content=content, dst_node_id=0, message_type="train")
    message.metadata.__dict__["_reply_to_message_id"] = f"ask-{name}"
    return message


def test_fedavg_is_the_sample_weighted_mean():
    rng = np.random.default_rng(0)
    sites = [(f"hospital-0{i}", {"w": rng.normal(size=(3, 2)).astype(np.float32), "b": rng.normal(size=2).astype(np.float32)}, n, a)
             for i, n, a in ((1, 10, 0.5), (2, 30, 0.7), (3, 60, 0.9))]
    strategy = _strategy([name for name, *_ in sites])
    arrays, metrics = strategy.aggregate_train(1, [_reply(*s) for s in sites])
    total = sum(n for _, _, n, _ in sites)
    for key in ("w", "b"):
        expected = sum(w[key] * n for _, w, n, _ in sites) / total
        np.testing.assert_allclose(arrays[key].numpy(), expected, rtol=1e-6)
    assert abs(metrics["train-accuracy"] - (0.5 * 10 + 0.7 * 30 + 0.9 * 60) / 100) < 1e-12
    assert metrics["confusion"] == [100, 0]
    assert set(strategy.log.rounds[1].trained) == {"hospital-01", "hospital-02", "hospital-03"}


def test_aggregation_does_not_depend_on_reply_order():
    rng = np.random.default_rng(1)
    sites = [(f"hospital-{i:02d}", {"w": rng.normal(size=1000).astype(np.float32)}, int(n), 0.5) for i, n in enumerate(rng.integers(1, 100, 8))]
    names = [name for name, *_ in sites]
    a, _ = _strategy(names).aggregate_train(1, [_reply(*s) for s in sites])
    b, _ = _strategy(names).aggregate_train(1, [_reply(*s) for s in reversed(sites)])
    assert np.array_equal(a["w"].numpy(), b["w"].numpy())


def test_the_hospitals_drawn_depend_on_the_seed_and_round_only():
    names = [f"hospital-{i:02d}" for i in range(1, 21)]
    drawn = sampling.draw(names, 0.3, seed=0, server_round=1, stream=sampling.TRAIN)
    assert len(drawn) == 6 and drawn == sorted(drawn)
    assert sampling.draw(reversed(names), 0.3, seed=0, server_round=1, stream=sampling.TRAIN) == drawn  # not the order given
    assert sampling.draw(names, 0.3, seed=0, server_round=2, stream=sampling.TRAIN) != drawn
    assert sampling.draw(names, 0.3, seed=1, server_round=1, stream=sampling.TRAIN) != drawn
    assert sampling.draw(names, 0.01, seed=0, server_round=1, stream=sampling.TRAIN) != []  # at least one
    assert sampling.draw(names, 1.0, seed=0, server_round=1, stream=sampling.TRAIN) == names
