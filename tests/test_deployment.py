"""A real deployment on loopback: `fedmed server start` (SuperLink with TLS and node
authentication) and `fedmed site start` (SuperNodes), the same ServerApp and ClientApp
as the simulation, through refusals, a crash, a dropout, a policy decline and a resume.

Three federations (each its own port, state and ledgers) run at once: most of a deployed
round is Flower's polling and each request's fresh ClientApp process. Every step waits
for an event, never for one timer to beat another."""

from __future__ import annotations

import http.client
import json
import os
import ssl
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest

from fedmed.deployment import server as server_commands
from fedmed.federation.wire import ENROLLED_AS, NAME_MISMATCH
from fedmed.ledger.chain import LedgerFile
from fedmed.run.directory import RunDirectory

from .conftest import fedmed, fedmed_process
from .deployment import HOSPITALS, Federation, make_world

pytestmark = [pytest.mark.slow, pytest.mark.timeout(1800)]  # the module's federations run in the first test's setup


IMPOSTOR = "sites/impostor-node"  # the impostor node's own folder (its own machine)
PROBE = {"FEDMED_CLIENTAPP": "tests.probe_client:app", "PYTHONPATH": str(Path(__file__).resolve().parents[1])}


def healthy(fed: Federation) -> dict[str, Any]:
    """Three hospitals and an impostor: hospital-04's node, whose site config says
    site.name = "hospital-01". 2 rounds; they need all four nodes. While two have come,
    the server waits, and meanwhile `server status`, a client speaking plain HTTP, and a
    node whose key was never enrolled (hospital-99), refused while the server is up.
    Every node runs fedmed's ClientApp behind a probe that writes down the run config and
    requests the node is given."""
    config = fed.server_config(enrolled="server/enrolled-4")
    fed.start_server(config, env=PROBE)
    for name in HOSPITALS[:2]:
        fed.start_site(name, env=PROBE)
    fed.wait_for(lambda: all("SuperNode ID" in fed.node_log(name) for name in HOSPITALS[:2]), "two hospitals to connect", fed.procs["server"])
    status = fedmed_process("server", "status", "--config", config, cwd=fed.root)
    plain = _plain_http(fed.port)
    fed.start_site("hospital-99")
    intruder = {"code": fed.finish("hospital-99"), "server_alive": fed.procs["server"].poll() is None, "rounds": fed.rounds_done()}
    fed.start_site(HOSPITALS[2], env=PROBE)
    fed.start_site("hospital-01", key="sites/keys/hospital-04.key", ledgers=IMPOSTOR, label="impostor", env=PROBE)
    return {"status": status, "plain": plain, "intruder": intruder, "code": fed.finish()}


def dropout_and_resume(fed: Federation) -> dict[str, Any]:
    """Four hospitals, all needed to start a round, FedBN. Round 1: hospital-04's policy
    requires DP-SGD, which this federation does not use, so it declines (and is not asked
    again); hospital-03 is killed mid-round (its ClientApp is held opening its signing key,
    a FIFO nobody writes, so it has certainly not replied). Round 2 then waits for a third
    hospital: the server is killed there, hospital-01's node is killed and restarted,
    hospital-03 comes back, the server resumes."""
    config = fed.server_config(enrolled="server/enrolled-4", fraction_evaluate=0.0, strategy="fedbn")
    fed.start_server(config)
    blocked_key = fed.root / fed.ledgers / "keys" / "hospital-03.key"
    blocked_key.parent.mkdir(parents=True)
    os.mkfifo(blocked_key, 0o600)
    for name in ("hospital-01", "hospital-02", "hospital-03"):
        fed.start_site(name)
    fed.start_site("hospital-04", "min_noise = 1.0")
    fed.wait_for(lambda: "Receiving: train message" in fed.node_log("hospital-03"), "round 1 to reach hospital-03", fed.procs["server"])
    fed.crash("hospital-03")
    fed.wait_for(lambda: (fed.run_dir() / "checkpoint.pkl").is_file(), "round 1's checkpoint", fed.procs["server"])
    fed.crash("server")
    fed.crash("hospital-01")
    before = [r["round"] for r in fed.rounds_done()]
    fed.start_server(config, "--resume", label="resumed")
    # Round 2 still waits for a third hospital (hospital-03 is not back). hospital-01's new
    # node joins once the server has let go of the one killed (its heartbeat lapses); only
    # then does hospital-03 come back, so round 2 asks the new node, not the dead one.
    joined = fed.node_log("hospital-01").count("SuperNode ID")
    fed.start_site("hospital-01", label="hospital-01-again")
    fed.wait_for(lambda: fed.node_log("hospital-01").count("SuperNode ID") > joined, "hospital-01's node to join again", fed.procs["resumed"])
    blocked_key.unlink()
    fed.start_site("hospital-03", label="hospital-03-again")
    return {"before": before, "code": fed.finish("resumed")}


def lifetime_budget(fed: Federation) -> dict[str, Any]:
    """Two DP runs, one after the other (each with a fresh ledger run id), of hospital-01,
    whose lifetime cap (site.max_epsilon) allows the first run's one round and one more,
    and hospital-02. The second run has two rounds. No evaluations: each would be one
    more ClientApp process per hospital."""
    fed.start_server(fed.server_config(enrolled="server/enrolled-2", privacy=PRIVACY, rounds=1, fraction_evaluate=0.0))
    fed.start_site("hospital-01", f"max_epsilon = {_lifetime_cap()}")
    fed.start_site("hospital-02")
    first = fed.finish()
    runs = [fed.run_dir()]
    fed.start_server(fed.server_config(enrolled="server/enrolled-2", privacy=PRIVACY, rounds=2, fraction_evaluate=0.0), label="second")
    second = fed.finish("second")
    runs.append(fed.run_dir())
    return {"codes": (first, second), "runs": runs}


PRIVACY = {"mode": "sample", "epsilon": 8.0}


def _lifetime_cap() -> float:
    """An epsilon between what hospital-01 has spent after the first run's round and the
    second run's first, and what the second run's second round would bring it to (24
    images, batch 8; sigma calibrated per run, over its rounds)."""
    from fedmed.config import load
    from fedmed.privacy.accounting import epsilon_of
    from fedmed.privacy.dpsgd import plan

    one, two = (plan(load(None, ["privacy.mode=sample", f"privacy.epsilon={PRIVACY['epsilon']}", f"federation.rounds={n}", "train.batch_size=8"]), 24) for n in (1, 2))
    spent = ((one.sigma, one.rate, one.steps_per_round), (two.sigma, two.rate, two.steps_per_round))
    before, after = (epsilon_of(two.accountant, entries, two.delta) for entries in (spent, (*spent, spent[1])))
    return round((before + after) / 2, 3)


SCENARIOS: dict[str, Callable[[Federation], dict[str, Any]]] = {
    "healthy": healthy, "dropout": dropout_and_resume, "lifetime": lifetime_budget,
}


def _plain_http(port: int) -> str:
    """What a client speaking plain text gets from the TLS port."""
    connection = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        connection.request("POST", "/v1/fleet/activate-node", body=b"{}")
        return f"answered {connection.getresponse().status}"
    except (OSError, http.client.HTTPException, ssl.SSLError) as exc:
        return f"failed: {type(exc).__name__}"
    finally:
        connection.close()


@pytest.fixture(scope="module")
def runs(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("deployment")
    make_world(root, cache_dir)
    feds = {name: Federation(root, cache_dir, name) for name in SCENARIOS}

    def play(name: str) -> dict[str, Any] | BaseException:
        try:
            return SCENARIOS[name](feds[name])
        except Exception as exc:  # noqa: BLE001 - re-raised by the scenario's own tests
            return exc
        finally:
            feds[name].stop_all()

    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        results = dict(zip(SCENARIOS, pool.map(play, SCENARIOS), strict=True))

    def get(name: str) -> tuple[Federation, dict[str, Any]]:
        if isinstance(results[name], BaseException):
            raise results[name]
        return feds[name], results[name]

    return get


def test_three_hospitals_over_tls_complete_two_rounds_and_the_server_writes_the_results(runs):
    fed, out = runs("healthy")
    assert out["code"] == 0, fed.output("server")[-3000:]
    rounds = fed.rounds_done()
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(s for s, h in r["hospitals"].items() if "train" in h) == list(HOSPITALS) for r in rounds)
    assert all("eval" in rounds[-1]["hospitals"][name] for name in HOSPITALS)  # their own test sets
    run = fed.run_dir()
    assert (run / "model.pt").is_file() and (run / "summary.json").is_file()
    assert "round 2/2: global test accuracy" in fed.output("server")


def test_server_status_shows_the_enrolled_hospitals_those_connected_and_the_runs_progress(runs):
    _, out = runs("healthy")
    status = out["status"]
    assert status.returncode == 0, status.stderr
    assert all(name in status.stdout for name in HOSPITALS)
    assert status.stdout.count("online") == 2 and "0 of 2 rounds done" in status.stdout


def test_a_plain_text_connection_to_the_tls_server_fails(runs):
    _, out = runs("healthy")
    assert out["plain"].startswith("failed") and "ConnectionRefused" not in out["plain"], out["plain"]  # the server was up


def test_a_node_whose_key_was_not_enrolled_is_refused_while_the_server_waits(runs):
    fed, out = runs("healthy")
    assert out["intruder"]["code"] == 2 and out["intruder"]["server_alive"]
    assert "is not enrolled" in fed.output("hospital-99") and "Traceback" not in fed.output("hospital-99")
    assert out["intruder"]["rounds"] == []


def test_a_hospital_killed_during_a_round_drops_out_and_the_others_finish_it(runs):
    fed, out = runs("dropout")
    assert out["code"] == 0, fed.output("resumed")[-3000:]
    first = fed.rounds_done()[0]
    assert sorted(s for s, h in first["hospitals"].items() if "train" in h) == ["hospital-01", "hospital-02"]
    assert first["dropped"] == ["hospital-03"]
    assert "dropped out: hospital-03" in server_commands._round_line(first, 2)  # what the operator's terminal shows


def test_a_crashed_server_resumes_after_its_last_round_without_a_gap_or_repeat(runs):
    fed, out = runs("dropout")
    assert out["before"] == [1]
    assert out["code"] == 0, fed.output("resumed")[-3000:]
    rounds = fed.rounds_done()
    assert [r["round"] for r in rounds] == [1, 2]
    assert sorted(rounds[1]["hospitals"]) == ["hospital-01", "hospital-02", "hospital-03"]  # back after its restart
    assert "resuming" in fed.output("resumed")
    server = LedgerFile.read(next(fed.run_dir().glob("ledgers/*/server.jsonl"))).records
    assert [r["event"] for r in server].count("resume") == 1
    assert [r["round"] for r in server if r["event"] == "train-round"] == [1, 2]


def test_a_hospital_whose_policy_forbids_the_privacy_settings_declines_and_the_others_go_on(runs):
    fed, _ = runs("dropout")
    first = fed.rounds_done()[0]
    assert first["declined"] == ["hospital-04"]
    assert "requires sample-level DP" in first["declined_reasons"]["hospital-04"]
    assert fed.rounds_done()[1]["declined"] == []  # not asked again (asked, it would decline again)
    mine = LedgerFile.read(next((fed.root / fed.ledgers).glob("*/hospital-04.jsonl"))).records
    declined = [r for r in mine if r["event"] == "declined"]
    assert len(declined) == 1 and "site.min_noise" in declined[0]["payload"]["reason"]


def test_a_hospitals_own_normalisation_layers_survive_its_node_restarting_and_the_server_resuming(runs):
    fed, out = runs("dropout")
    assert out["code"] == 0, fed.output("resumed")[-3000:]
    second = fed.rounds_done()[1]["hospitals"]
    assert second["hospital-01"]["train"]["local_arrays_restored"] > 0  # its node was restarted
    assert second["hospital-02"]["train"]["local_arrays_restored"] > 0  # the server resumed: a new Flower run
    assert second["hospital-03"]["train"]["local_arrays_restored"] == 0  # never finished a round


def test_a_node_answering_under_another_hospitals_name_is_refused_every_round(runs):
    fed, out = runs("healthy")
    assert out["code"] == 0, fed.output("server")[-3000:]
    rounds = fed.rounds_done()
    assert [r["round"] for r in rounds] == [1, 2]
    for record in rounds:
        assert "train" not in record["hospitals"].get("hospital-04", {})
        assert NAME_MISMATCH in record["dropped_reasons"]["hospital-04"]  # the name its key was enrolled under
    summary = json.loads((fed.run_dir() / "summary.json").read_text())
    assert sorted(summary["per_hospital"]) == list(HOSPITALS)
    assert f"the server refuses this node's replies: {NAME_MISMATCH}" in fed.output("impostor")
    assert "Traceback" not in fed.output("impostor")


def test_the_audit_passes_for_the_honest_hospitals_and_names_the_refused_node(runs, tmp_path):
    fed, _ = runs("healthy")
    server = next(fed.run_dir().glob("ledgers/*/server.jsonl"))
    ledgers = fed.root / fed.ledgers
    hospitals = [p for name in HOSPITALS for p in (next(ledgers.glob(f"*/{name}.jsonl")), ledgers / "keys" / f"{name}.pub")]
    server_key = fed.root / fed.state / "keys" / "server.pub"  # the server's own, not the run's copy
    audit = fedmed_process("audit", server, server_key, *hospitals, "--out", tmp_path)
    assert audit.returncode == 0, audit.stdout[-3000:]
    assert "refused hospital-04's node in round(s) 1, 2" in audit.stdout


def test_a_node_is_told_no_path_no_server_setting_and_no_other_hospitals_name(runs):
    fed, _ = runs("healthy")
    received = [json.loads(line) for folder in (fed.ledgers, IMPOSTOR) for f in (fed.root / folder).glob("received-*.jsonl") for line in f.read_text().splitlines()]
    assert len(received) == 4 * 3  # four nodes: two rounds (each training request asks for an evaluation too), the last evaluation
    for seen in received:
        assert seen["run_config"] == {}  # Flower's run config, the same for every node
        request = seen["request"]
        others = {*HOSPITALS, "hospital-04"} - {request[ENROLLED_AS]}
        values = [str(v) for v in request.values()]
        assert not any(str(fed.root) in v or name in v for v in values for name in others), request
        assert not {"data.path", "data.cache_dir", "output.dir", "data.global_test_size", "privacy.budgets"} & set(request)


def test_a_hospitals_lifetime_budget_holds_across_runs_whatever_their_run_id(runs):
    fed, out = runs("lifetime")
    assert out["codes"] == (0, 0), fed.output("second")[-3000:]
    first, second = (RunDirectory(run).rounds() for run in out["runs"])
    assert "train" in first[0]["hospitals"]["hospital-01"]
    assert "train" in second[0]["hospitals"]["hospital-01"] and second[0]["declined"] == []
    assert second[1]["declined"] == ["hospital-01"]  # its third round would pass its lifetime cap
    assert "lifetime privacy budget" in second[1]["declined_reasons"]["hospital-01"]
    assert "train" in second[1]["hospitals"]["hospital-02"]
    run_ids = [next(run.glob("ledgers/*/server.jsonl")).parent.name for run in out["runs"]]
    assert run_ids[0] != run_ids[1]


def test_site_budget_shows_what_each_run_spent_and_what_is_left(runs):
    fed, out = runs("lifetime")
    budget = fedmed("site", "budget", "--config", fed.root / f"{fed.ledgers}-hospital-01.toml", cwd=fed.root)
    assert budget.returncode == 0, budget.stderr
    for run in out["runs"]:
        assert next(run.glob("ledgers/*/server.jsonl")).parent.name in budget.stdout
    assert "(its data now)" in budget.stdout and "left" in budget.stdout
