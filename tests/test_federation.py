"""Federation logic, run in this process (tests/inprocess.py): the ServerApp and ClientApp
the Simulation Engine runs, without Ray. Strategies, FedBN, partial participation,
pseudo-labels, privacy budgets, dropouts and resuming; and the baselines."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmed.baselines import run_baseline
from fedmed.errors import FedmedError
from fedmed.federation import client_app as fedmed_client
from fedmed.federation import simulation
from fedmed.ledger.chain import LedgerFile
from fedmed.models import build_model, norm_keys
from fedmed.run.directory import RunDirectory
from fedmed.run.record import NO_REPLY, TIMING_FIELDS

from .conftest import TINY
from .inprocess import Crash, InProcessGrid, run_in_process, run_until_crash_before_checkpoint
from .privacy_check import independent_epsilon


def rounds_of(run: Path) -> list[dict]:
    return RunDirectory(run).rounds()


def summary_of(run: Path) -> dict:
    return RunDirectory(run).summary()


@pytest.fixture(scope="module")
def fedavg_run(cache_dir, tmp_path_factory) -> Path:
    """FedAvg, 3 hospitals, 2 rounds: read by several tests."""
    from fedmed import config as config_mod

    return run_in_process(config_mod.load(None, TINY, {"data.cache_dir": cache_dir, "output.dir": str(tmp_path_factory.mktemp("fedavg"))}))


def test_every_hospital_trains_and_evaluates_on_its_own_split_each_round(fedavg_run):
    records = rounds_of(fedavg_run)
    assert [r["round"] for r in records] == [1, 2]
    for r in records:
        assert set(r["hospitals"]) == {"hospital-01", "hospital-02", "hospital-03"}
        assert all(h["train"]["examples"] == 24 and h["eval"]["examples"] == 12 for h in r["hospitals"].values())
        assert r["federated_eval"]["examples"] == 36 and r["test"]["examples"] == 24
        assert (r["failures"], r["dropped"], r["declined"]) == (0, [], [])
    per_hospital = summary_of(fedavg_run)["per_hospital"]
    assert {k: v["accuracy"] for k, v in per_hospital.items()} == {k: v["eval"]["accuracy"] for k, v in records[-1]["hospitals"].items()}


def test_the_global_model_is_the_weighted_mean_of_the_hospitals_updates(fedavg_run):
    """The saved updates of the last round average to the saved model (equal weights here)."""
    with np.load(RunDirectory(fedavg_run).updates_of(2)) as saved:
        updates = {k: saved[k] for k in saved.files}
    final = torch.load(fedavg_run / RunDirectory.MODEL)
    key = "head.2.weight"
    mean = np.mean([updates[f"hospital-0{i}/{key}"] for i in (1, 2, 3)], axis=0)
    np.testing.assert_allclose(final[key].numpy(), mean, rtol=1e-5, atol=1e-7)
    assert not np.allclose(updates[f"sent/{key}"], mean)  # the round moved the model


@pytest.mark.parametrize("mode", ["pooled", "local"])
def test_baselines_write_the_same_kind_of_run_directory(tiny_config, mode):
    out = run_baseline(tiny_config(f"federation.mode='{mode}'"))
    summary, records = out.summary(), out.rounds()
    assert summary["mode"] == mode and summary["rounds"] == 2 and len(records) == 2
    assert set(summary["per_hospital"]) == {"hospital-01", "hospital-02", "hospital-03"}
    assert summary["test"]["accuracy"] == records[-1]["test"]["accuracy"]
    if mode == "local":  # the mean over each hospital's own model
        own = [h["global_test_accuracy"] for h in summary["per_hospital"].values()]
        assert summary["test"]["accuracy"] == pytest.approx(sum(own) / len(own))


def test_pooled_takes_as_many_sample_gradient_steps_as_federated(tiny_config, fedavg_run):
    pooled = run_baseline(tiny_config("federation.mode='pooled'")).rounds()
    for f, p in zip(rounds_of(fedavg_run), pooled, strict=True):
        assert p["train"]["sample_gradients"] == sum(h["train"]["sample_gradients"] for h in f["hospitals"].values())


def _run_files_text(run: Path) -> str:
    return "\n".join(p.read_text(errors="replace") for p in run.iterdir() if p.suffix in (".toml", ".json", ".jsonl"))


def test_a_run_on_an_image_folder_written_by_make_demo(tiny_config, tmp_path):
    from fedmed.data.export import export_demo

    export_demo(tiny_config(), tmp_path / "hospitals")
    run = run_in_process(tiny_config("data.source=disk", f"data.path='{tmp_path / 'hospitals'}'", "data.partition=folders", "federation.rounds=1"))
    summary = summary_of(run)
    assert summary["data"]["format"] == "imagefolder"
    assert (summary["data"]["train"], summary["data"]["test"]) == (72, 36)
    assert all(h["train"]["examples"] == 24 for h in rounds_of(run)[-1]["hospitals"].values())
    text = _run_files_text(run)
    assert str(tmp_path / "hospitals") not in text and ".png" not in text and "Training" not in text


def test_a_run_on_nifti_volumes_split_by_patient(tiny_config, tmp_path):
    from tests import mri_fixtures as fx

    rng = np.random.default_rng(0)
    classes = ("glioma", "meningioma", "no_tumour", "pituitary")
    for i in range(16):
        fx.nifti(tmp_path / "vols" / classes[i % 4] / f"patient{i:02d}.nii.gz", fx.brain_volume(rng, shape=(40, 40, 24), brain_slices=(2, 22)))
    run = run_in_process(tiny_config("data.source=disk", f"data.path='{tmp_path / 'vols'}'", "data.test_fraction=0.25", "federation.rounds=1"))
    summary = summary_of(run)
    assert summary["data"]["format"] == "nifti" and summary["data"]["images"] == 16 * 12
    assert summary["data"]["test"] == 4 * 12  # whole volumes: 4 of 16 patients
    text = _run_files_text(run)
    assert "patient" not in text and str(tmp_path / "vols") not in text


def test_skewed_hospitals_report_their_heterogeneity(tiny_config):
    from fedmed.data.demo import DemoSpec

    cfg = tiny_config("skew.labels=classes", "skew.classes_per_hospital=2", "skew.quantity=power", "skew.min_size=4", "federation.rounds=1")
    hetero = RunDirectory(run_in_process(cfg)).heterogeneity()
    assert hetero["label_counts"] == [list(row) for row in DemoSpec.from_config(cfg.data, cfg.seed, cfg.skew).train_counts]
    assert all(sum(1 for v in row if v) == 2 for row in hetero["label_counts"])
    assert hetero["index"] > 0.2


def test_iid_hospitals_have_a_heterogeneity_index_of_zero(fedavg_run):
    hetero = RunDirectory(fedavg_run).heterogeneity()
    assert hetero["label_counts"] == [[6, 6, 6, 6]] * 3 and hetero["index"] == 0.0
    assert (fedavg_run / RunDirectory.HEATMAP).stat().st_size > 1000


def test_fedbn_keeps_normalisation_layers_at_each_hospital(tiny_config):
    cfg = tiny_config("federation.strategy=fedbn")
    run = run_in_process(cfg)
    initial = build_model(cfg.model, 4, seed=cfg.seed).state_dict()
    final = torch.load(run / RunDirectory.MODEL)
    kept = norm_keys(build_model(cfg.model, 4, seed=0))
    assert kept and all(torch.equal(final[k], initial[k]) for k in kept)  # never sent, never averaged
    assert any(not torch.equal(final[k], initial[k]) for k in final if k not in kept)
    records = rounds_of(run)
    assert {h["train"]["local_arrays_restored"] for h in records[0]["hospitals"].values()} == {0}
    assert {h["train"]["local_arrays_restored"] for h in records[1]["hospitals"].values()} == {len(kept)}


@pytest.fixture(scope="module")
def one_round_models(cache_dir, tmp_path_factory):
    """The global model after one round, by strategy (and setting), each trained once."""
    from fedmed import config as config_mod

    trained: dict[tuple[str, ...], dict[str, torch.Tensor]] = {}

    def model(*settings: str) -> dict[str, torch.Tensor]:
        if settings not in trained:
            values = {"data.cache_dir": cache_dir, "output.dir": str(tmp_path_factory.mktemp("strategies"))}
            run = run_in_process(config_mod.load(None, [*TINY, "federation.rounds=1", *settings], values))
            trained[settings] = torch.load(run / RunDirectory.MODEL)
        return trained[settings]

    return model


@pytest.mark.parametrize(
    ("settings", "other"),
    [
        (("federation.strategy=fedprox", "federation.proximal_mu=1.0"), ("federation.strategy=fedprox", "federation.proximal_mu=0.0")),
        (("federation.strategy=fedadam", "federation.server_lr=0.01"), ("federation.strategy=fedadam", "federation.server_lr=0.001")),
        (("federation.strategy=fedyogi", "federation.server_lr=0.01"), ("federation.strategy=fedyogi", "federation.server_lr=0.001")),
    ],
    ids=["fedprox-mu", "fedadam-server_lr", "fedyogi-server_lr"],
)
def test_a_strategys_own_setting_changes_the_global_model(one_round_models, settings, other):
    a, b = one_round_models(*settings), one_round_models(*other)
    assert any(not torch.equal(a[k], b[k]) for k in a)


def test_fedprox_without_its_term_is_fedavg(one_round_models):
    prox, avg = one_round_models("federation.strategy=fedprox", "federation.proximal_mu=0.0"), one_round_models()
    assert all(torch.equal(prox[k], avg[k]) for k in avg)


def test_unlabelled_hospitals_pseudo_label_and_report_counts(tiny_config):
    run = run_in_process(tiny_config("labels.scenario=unlabelled", "labels.hospitals=0.34", "labels.unlabelled=pseudo", "labels.threshold=0.3"))
    last = rounds_of(run)[-1]["hospitals"]
    counts = sorted((h["train"]["labelled_examples"], h["train"]["unlabelled_examples"]) for h in last.values())
    assert counts == [(0, 24), (24, 0), (24, 0)]
    assert len({frozenset(h["train"]) for h in last.values()}) == 1  # every reply, the same keys
    assert max(h["train"]["pseudo_labelled"] for h in last.values()) > 0


def test_partial_participation_trains_a_fraction_of_hospitals_each_round(tiny_config):
    run = run_in_process(tiny_config("federation.fraction_train=0.67", "federation.strategy=fedbn"))
    for record in rounds_of(run):
        assert sum("train" in h for h in record["hospitals"].values()) == 2
        assert sum("eval" in h for h in record["hospitals"].values()) == 3


def test_fewer_nodes_than_hospitals_play_every_hospital_with_the_same_results(tiny_config):
    """A simulated node plays whichever hospital a request names: one node serves three
    hospitals (as a `flwr run` federation smaller than data.hospitals), round for round
    as three nodes do, with FedBN's layers kept per hospital, not per node."""
    cfg = simulation.prepare(tiny_config("federation.strategy=fedbn", "federation.fraction_train=0.67"))
    one = rounds_of(run_in_process(cfg, grid=InProcessGrid(fedmed_client.app, 1, cfg.flat())))
    three = rounds_of(run_in_process(simulation.prepare(tiny_config("federation.strategy=fedbn", "federation.fraction_train=0.67"))))
    assert [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in one] == [{k: v for k, v in r.items() if k not in TIMING_FIELDS} for r in three]
    assert sum("train" in h for h in one[-1]["hospitals"].values()) == 2


def test_a_federation_without_nodes_fails_after_the_timeout_naming_the_setting(tiny_config):
    """A `flwr run` federation with no SuperNode: one line after simulation.node_timeout."""
    cfg = simulation.prepare(tiny_config("simulation.node_timeout=0.5"))
    with pytest.raises(FedmedError, match=r"no SuperNode joined the federation in 0.5 s \(simulation.node_timeout\): .*num-supernodes"):
        run_in_process(cfg, grid=InProcessGrid(fedmed_client.app, 0, cfg.flat()))


def test_dp_with_fedbn_composes_epsilon_over_every_round_with_the_rdp_accountant(tiny_config):
    run = run_in_process(tiny_config("privacy.mode=sample", "privacy.accountant=rdp", "privacy.epsilon=6", "federation.rounds=3", "federation.strategy=fedbn"))
    records = rounds_of(run)
    for record in records:
        for phases in record["hospitals"].values():
            t = phases["train"]
            assert t["dp_steps"] == record["round"] * t["steps"]  # the hospital's step history persists
            expected = independent_epsilon("rdp", t["dp_sigma"], t["dp_sample_rate"], int(t["dp_steps"]), t["dp_delta"])
            assert t["dp_epsilon"] == pytest.approx(expected, rel=0.01)
    privacy = summary_of(run)["privacy"]
    assert {r["rounds_trained"] for r in privacy["hospitals"].values()} == {3}
    assert 5.0 < privacy["max_epsilon"] <= 6.0  # the whole planned run's target, spent
    assert all(h["train"]["local_arrays_restored"] > 0 for h in records[1]["hospitals"].values())


def test_client_level_dp_is_accounted_at_the_server(tiny_config):
    run = run_in_process(tiny_config("privacy.mode=client", "privacy.epsilon=20", "federation.rounds=2"))
    federation = summary_of(run)["privacy"]["federation"]
    assert federation["steps"] == 2 and 15 < federation["epsilon"] <= 20
    assert federation["epsilon"] == pytest.approx(independent_epsilon("prv", federation["sigma"], 1.0, 2, federation["delta"]), rel=0.02)
    assert [r["privacy"]["steps"] for r in rounds_of(run)] == [1, 2]


def test_once_every_hospital_has_spent_its_budget_the_model_stops_changing(tiny_config, capsys):
    from fedmed.privacy.accounting import StepHistory
    from fedmed.privacy.dpsgd import plan

    settings = ("privacy.mode=sample", "privacy.epsilon=6", "federation.rounds=3")
    p = plan(tiny_config(*settings), 24)
    one = StepHistory(p.accountant, [(p.sigma, p.rate, p.steps_per_round)]).epsilon(p.delta)
    run = run_in_process(tiny_config(*settings, f"privacy.budget={one * 1.05:.4f}"))
    records = rounds_of(run)
    assert [r["round"] for r in records] == [1]  # round 2: all declined; round 3: none left to ask
    assert "every hospital asked declined; the model stays as it is" in capsys.readouterr().out
    privacy = summary_of(run)["privacy"]["hospitals"]
    assert {(r["rounds_trained"], r["declined"]["round"]) for r in privacy.values()} == {(1, 2)}


def _failing_at(site_index: int) -> ClientApp:
    """fedmed's ClientApp, except that hospital `site_index` fails every request."""
    app = ClientApp()

    def handler(name: str):
        def handle(msg: Message, context: Context) -> Message:
            if int(msg.content["config"]["hospital-index"]) == site_index:
                raise RuntimeError("the scanner archive is offline")
            return getattr(fedmed_client, name)(msg, context)

        return handle

    app.train()(handler("train"))
    app.evaluate()(handler("evaluate"))
    return app


def test_a_hospital_that_fails_drops_out_and_the_round_goes_on(tiny_config, capsys):
    run = run_in_process(tiny_config("federation.min_hospitals=2"), client_app=_failing_at(2))
    records = rounds_of(run)
    assert [sorted(r["hospitals"]) for r in records] == [["hospital-01", "hospital-02"]] * 2
    assert [(r["failures"], r["dropped"]) for r in records] == [(1, ["hospital-03"])] * 2  # never heard from: named by the hospital its node is
    assert "hospital-03 dropped out (no update)" in capsys.readouterr().out
    server = LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records
    assert [r["payload"]["failures"] for r in server if r["event"] == "train-round"] == [1, 1]


def test_a_reply_under_another_hospitals_name_is_not_aggregated(tiny_config):
    """Every node answers as hospital-01: only hospital-01's own reply counts, the others are failures."""
    from flwr.app import ConfigRecord

    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        reply = fedmed_client.train(msg, context)
        reply.content["site"] = ConfigRecord({"name": "hospital-01"})
        return reply

    run = run_in_process(tiny_config("federation.rounds=1", "federation.fraction_evaluate=0.0"), client_app=app)
    record = rounds_of(run)[0]
    assert list(record["hospitals"]) == ["hospital-01"] and record["failures"] == 2
    assert record["dropped"] == ["hospital-02", "hospital-03"]
    assert set(record["dropped_reasons"].values()) == {"a reply under another hospital's name (the reply says 'hospital-01')"}
    server = LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records
    train_round = next(r for r in server if r["event"] == "train-round")["payload"]
    assert [p["hospital"] for p in train_round["participants"]] == ["hospital-01"] and train_round["failures"] == 2


def test_a_round_in_which_every_hospital_fails_stops_the_run_with_the_reason(tiny_config):
    everyone = ClientApp()
    everyone.train()(lambda msg, context: (_ for _ in ()).throw(RuntimeError("disk full")))
    with pytest.raises(FedmedError, match="round 1: no hospital returned an update .*disk full"):
        run_in_process(tiny_config(), client_app=everyone)


class Silent(InProcessGrid):
    """Hospitals whose node ids are in `silent` never answer (their replies do not come before the timeout)."""

    silent: frozenset[int] = frozenset()

    def push_messages(self, messages):  # as if the round's timeout passed without their replies
        return super().push_messages([m for m in messages if m.metadata.dst_node_id not in self.silent])


def test_a_hospital_that_never_answers_drops_out_and_the_round_goes_on(tiny_config):
    cfg = simulation.prepare(tiny_config("federation.rounds=1", "federation.min_hospitals=2"))
    grid = Silent(fedmed_client.app, 3, cfg.flat())
    grid.silent = frozenset({1001})
    record = rounds_of(run_in_process(cfg, grid=grid))[0]
    assert (sorted(record["hospitals"]), record["failures"], record["dropped"]) == (["hospital-02", "hospital-03"], 1, ["hospital-01"])


def test_a_round_in_which_no_hospital_answers_stops_the_run(tiny_config):
    cfg = simulation.prepare(tiny_config("federation.rounds=1"))
    grid = Silent(fedmed_client.app, 3, cfg.flat())
    grid.silent = frozenset({1001, 1002, 1003})
    with pytest.raises(FedmedError, match=f"round 1: no hospital returned an update \\({NO_REPLY}\\)"):
        run_in_process(cfg, grid=grid)


class CrashInRound(InProcessGrid):
    """The server dies as it sends round `crash_round`'s training requests."""

    def __init__(self, crash_round: int, *args, **kwargs) -> None:
        super().__init__(*args, **kwargs)
        self.crash_round = crash_round

    def push_messages(self, messages):
        messages = list(messages)
        if any(m.metadata.message_type == "train" and m.content["config"]["server-round"] == self.crash_round for m in messages):
            raise Crash
        return super().push_messages(messages)


def test_a_crashed_server_resumes_after_its_last_checkpoint(tiny_config):
    cfg = simulation.prepare(tiny_config("federation.rounds=3", "privacy.mode=client", "privacy.epsilon=20"))

    with pytest.raises(Crash):
        run_in_process(cfg, grid=CrashInRound(3, fedmed_client.app, 3, cfg.flat()))
    run = Path(cfg.output.dir) / cfg.output.name
    # Round 2's record waits for its model's evaluations, which round 3's requests ask for.
    assert [r["round"] for r in rounds_of(run)] == [1] and not (run / RunDirectory.SUMMARY).exists()
    run_in_process(cfg, resume=run)
    assert [r["round"] for r in rounds_of(run)] == [1, 2, 3]
    assert [r["privacy"]["steps"] for r in rounds_of(run)] == [1, 2, 3]  # the server's DP spend survived the crash
    server = LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records
    assert [r["event"] for r in server].count("resume") == 1
    assert [r["round"] for r in server if r["event"] == "train-round"] == [1, 2, 3]
    assert json.loads((run / RunDirectory.SUMMARY).read_text())["rounds"] == 3


ENROLLED = {1001: "hospital-01", 1002: "hospital-02", 1003: "hospital-03"}  # as `fedmed server start` enrols them


def _deployed(cfg, app: ClientApp, ledgers: Path) -> Path:
    """The nodes as a deployment's: enrolled names, and ledgers in the nodes' own folder."""
    grid = InProcessGrid(app, cfg.data.hospitals, cfg.flat(), {"ledger-dir": str(ledgers)})
    return run_in_process(cfg, grid=grid, nodes=ENROLLED)


def _speaking_as(name: str, node: int) -> ClientApp:
    """fedmed's ClientApp, except that node `node` replies under `name` (a modified fedmed)."""
    from flwr.app import ConfigRecord

    app = ClientApp()

    def handler(kind: str):
        def handle(msg: Message, context: Context) -> Message:
            reply = getattr(fedmed_client, kind)(msg, context)
            if context.node_id == node:
                reply.content["site"] = ConfigRecord({"name": name})
            return reply

        return handle

    app.train()(handler("train"))
    app.evaluate()(handler("evaluate"))
    return app


def test_a_deployed_reply_under_another_hospitals_name_is_refused_every_round(tiny_config, tmp_path):
    from fedmed.federation.wire import NAME_MISMATCH

    run = _deployed(tiny_config(), _speaking_as("hospital-01", node=1002), tmp_path / "nodes")
    for record in rounds_of(run):
        assert sorted(s for s, h in record["hospitals"].items() if "train" in h) == ["hospital-01", "hospital-03"]
        assert record["dropped_reasons"] == {"hospital-02": f"{NAME_MISMATCH} (the reply says 'hospital-01')"}
    assert sorted(summary_of(run)["per_hospital"]) == ["hospital-01", "hospital-03"]
    server = LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records
    failed = [r["payload"]["failed"] for r in server if r["event"] == "train-round"]
    assert failed == [[{"hospital": "hospital-02", "reason": f"{NAME_MISMATCH} (the reply says 'hospital-01')"}]] * 2


def test_the_audit_names_a_node_refused_for_its_name_and_flags_a_reply_recorded_under_another(tiny_config, tmp_path):
    from fedmed.audit.evidence import load
    from fedmed.audit.identity import identity

    run = _deployed(tiny_config("federation.rounds=1"), _speaking_as("hospital-01", node=1002), tmp_path / "nodes")
    evidence = load([run])
    assert identity(evidence) == []
    assert any("refused hospital-02's node in round(s) 1" in note for note in evidence.notes)
    server = evidence.server.file.records
    entry = next(r for r in server if r["event"] == "train-round")["payload"]["participants"][0]
    entry["checkpoint"]["party"] = "hospital-03"  # as if the server had recorded hospital-03's reply as hospital-01's
    assert [f.check for f in identity(evidence)] == ["identity"]


def test_a_deployed_node_is_sent_its_own_name_and_budget_and_no_path(tiny_config, tmp_path):
    from fedmed.federation.wire import BUDGET, CONFIG, ENROLLED_AS

    seen: dict[int, dict] = {}
    app = ClientApp()

    @app.train()
    def train(msg: Message, context: Context) -> Message:
        seen[context.node_id] = dict(msg.content[CONFIG])
        return fedmed_client.train(msg, context)

    cfg = tiny_config("federation.rounds=1", "federation.fraction_evaluate=0.0", "privacy.budgets='hospital-02=4.0'")
    _deployed(cfg, app, tmp_path / "nodes")
    assert {node: (c[ENROLLED_AS], c[BUDGET]) for node, c in seen.items()} == {1001: ("hospital-01", 0.0), 1002: ("hospital-02", 4.0), 1003: ("hospital-03", 0.0)}
    for config in seen.values():
        assert not any(str(tmp_path) in str(v) for v in config.values())
        assert not {"privacy.budgets", "data.cache_dir", "output.dir"} & set(config)


def test_fedbn_layers_outlive_a_server_restart(tiny_config):
    cfg = simulation.prepare(tiny_config("federation.rounds=3", "federation.strategy=fedbn"))

    with pytest.raises(Crash):
        run_in_process(cfg, grid=CrashInRound(3, fedmed_client.app, 3, cfg.flat()))
    run = Path(cfg.output.dir) / cfg.output.name
    run_in_process(cfg, resume=run)  # new nodes (new Flower contexts), as after a restart
    assert all(h["train"]["local_arrays_restored"] > 0 for h in rounds_of(run)[2]["hospitals"].values())


def test_a_server_that_crashes_after_writing_a_rounds_record_but_before_its_checkpoint_resumes_without_a_repeat(tiny_config, monkeypatch):
    from fedmed.audit.report import audit

    cfg = simulation.prepare(tiny_config("federation.rounds=3"))
    run = run_until_crash_before_checkpoint(cfg, 2, monkeypatch)  # round 1's record is written (round 2's requests brought its evaluations)
    assert [r["round"] for r in rounds_of(run)] == [1]
    run_in_process(cfg, resume=run)
    assert [r["round"] for r in rounds_of(run)] == [1, 2, 3]
    assert audit([run], out_dir=run / "audit") == 0  # the redone round's ledger records follow the resume


def test_the_final_models_scores_reproduce_its_reported_figures(fedavg_run):
    """scores.npz (the global test set's class probabilities) gives back the summary's
    accuracy, ECE and Brier score."""
    from fedmed.training.metrics import calibration, classification_metrics

    with np.load(fedavg_run / RunDirectory.SCORES) as saved:
        probs, labels = saved["probs"], saved["labels"]
    test = summary_of(fedavg_run)["test"]
    assert calibration(labels, probs) == (test["ece"], test["brier"])
    assert classification_metrics(labels, probs)["accuracy"] == test["accuracy"]


def test_tensorboard_shows_the_round_records_figures(tiny_config):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    run = run_in_process(tiny_config("output.tensorboard=true"))
    events = EventAccumulator(str(run / "tensorboard"))
    events.Reload()
    records = rounds_of(run)
    assert [e.step for e in events.Scalars("test/accuracy")] == [1, 2]
    assert [e.value for e in events.Scalars("test/accuracy")] == pytest.approx([r["test"]["accuracy"] for r in records])
    assert [e.value for e in events.Scalars("hospital/hospital-01/accuracy")] == pytest.approx(
        [r["hospitals"]["hospital-01"]["eval"]["accuracy"] for r in records]
    )
    assert "fairness/gap" in events.Tags()["scalars"]
