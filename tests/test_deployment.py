"""A real deployment on loopback: `fedmed server start` (SuperLink with TLS and node
authentication) and `fedmed site start` (SuperNodes), the same ServerApp and ClientApp
as the simulation, through crashes, dropouts, refusals and policy declines.

Three federations (each its own port, state and ledgers) run at once: most of a
deployed round is Flower's polling and each request's fresh ClientApp process, so
together they take little longer than the slowest alone."""

from __future__ import annotations

import http.client
import ssl
from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable

import pytest

from fedmed.audit.ledger import LedgerFile

from .deployment import HOSPITALS, Federation, make_world
from .test_cli import fedmed

pytestmark = pytest.mark.slow
WAIT_S = 600  # for a round under the load of three federations on two cores


def healthy(fed: Federation) -> dict[str, Any]:
    """Three hospitals, 2 rounds; while it runs, `server status`, a node whose key was
    never enrolled, and a client speaking plain HTTP."""
    config = fed.server_config()
    fed.start_server(config)
    fed.start_sites(*((name, ()) for name in HOSPITALS))
    fed.wait_for(lambda: any((fed.root / fed.ledgers).glob("*/hospital-0*.jsonl")), WAIT_S, "round 1 to start", fed.procs["server"])
    status = fedmed("server", "status", "--config", str(config), cwd=fed.root)
    intruder = fed.start("hospital-99", "site", "start", "--config", str(fed.site_config("hospital-99")))
    plain = _plain_http(fed.port)
    return {"status": status, "plain": plain, "intruder": intruder.wait(timeout=WAIT_S), "code": fed.finish(timeout=WAIT_S)}


def dropout(fed: Federation) -> dict[str, Any]:
    """hospital-03 killed once its first training request has arrived (its ClientApp is
    still starting: seconds of imports)."""
    node_log = fed.root / fed.ledgers / "hospital-03-supernode.log"
    fed.start_server(fed.server_config(min_hospitals=2, fraction_evaluate=0.0, round_timeout=300))
    fed.start_sites(*((name, ()) for name in HOSPITALS))
    fed.wait_for(lambda: node_log.is_file() and "Receiving: train message" in node_log.read_text(errors="replace"),
                 WAIT_S, "round 1 to reach hospital-03", fed.procs["server"])
    fed.crash("hospital-03")
    return {"code": fed.finish(timeout=WAIT_S)}


def resume(fed: Federation) -> dict[str, Any]:
    """The server killed once round 1 is checkpointed, then `--resume`; hospital-03's
    policy requires DP-SGD, which this federation does not use."""
    config = fed.server_config(fraction_evaluate=0.0, min_hospitals=2)
    fed.start_server(config)
    fed.start_sites(("hospital-01", ()), ("hospital-02", ()), ("hospital-03", ("min_noise = 1.0",)))
    fed.wait_for(lambda: (fed.run_dir() / "checkpoint.pkl").is_file(), WAIT_S, "round 1's checkpoint", fed.procs["server"])
    fed.crash("server")
    before = [r["round"] for r in fed.rounds_done()]
    fed.start_server(config, "--resume", label="resumed")
    return {"before": before, "code": fed.finish("resumed", timeout=WAIT_S)}


SCENARIOS: dict[str, Callable[[Federation], dict[str, Any]]] = {"healthy": healthy, "dropout": dropout, "resume": resume}


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
        except Exception as exc:  # re-raised by the scenario's own tests
            return exc
        finally:
            feds[name].stop_all()

    with ThreadPoolExecutor(len(SCENARIOS)) as pool:
        results = dict(zip(SCENARIOS, pool.map(play, SCENARIOS)))

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
    assert all(sorted(r["hospitals"]) == list(HOSPITALS) for r in rounds)
    assert all("eval" in phases for phases in rounds[-1]["hospitals"].values())  # their own test sets
    run = fed.run_dir()
    assert (run / "model.pt").is_file() and (run / "summary.json").is_file()
    assert "round 2/2: global test accuracy" in fed.output("server")


def test_server_status_shows_the_connected_hospitals_and_the_runs_progress(runs):
    _, out = runs("healthy")
    status = out["status"]
    assert status.returncode == 0, status.stderr
    assert all(name in status.stdout for name in HOSPITALS)
    assert status.stdout.count("online") == 3 and "of 2 rounds done" in status.stdout


def test_a_node_whose_key_was_not_enrolled_is_refused_and_the_run_goes_on(runs):
    fed, out = runs("healthy")
    assert out["intruder"] == 2
    assert "is not enrolled" in fed.output("hospital-99") and "Traceback" not in fed.output("hospital-99")
    assert out["code"] == 0 and all("hospital-99" not in r["hospitals"] for r in fed.rounds_done())


def test_a_plain_text_connection_to_the_tls_server_fails(runs):
    _, out = runs("healthy")
    assert out["plain"].startswith("failed"), out["plain"]


def test_a_hospital_killed_during_a_round_drops_out_and_the_others_finish(runs):
    fed, out = runs("dropout")
    assert out["code"] == 0, fed.output("server")[-3000:]
    rounds = fed.rounds_done()
    assert [sorted(r["hospitals"]) for r in rounds] == [["hospital-01", "hospital-02"]] * 2
    assert [r["dropped"] for r in rounds] == [["hospital-03"], []]
    assert "dropped out: hospital-03" in fed.output("server")


def test_a_crashed_server_resumes_after_its_last_round_without_a_gap_or_repeat(runs):
    fed, out = runs("resume")
    assert out["before"] == [1]
    assert out["code"] == 0, fed.output("resumed")[-3000:]
    assert [r["round"] for r in fed.rounds_done()] == [1, 2]
    assert "resuming" in fed.output("resumed")
    server = LedgerFile.read(next(fed.run_dir().glob("ledgers/*/server.jsonl"))).records
    assert [r["event"] for r in server].count("resume") == 1
    assert [r["round"] for r in server if r["event"] == "train-round"] == [1, 2]


def test_a_hospital_whose_policy_forbids_the_privacy_settings_declines_and_the_others_go_on(runs):
    fed, _ = runs("resume")
    rounds = fed.rounds_done()
    assert rounds[0]["declined"] == ["hospital-03"]
    assert "requires sample-level DP" in rounds[0]["declined_reasons"]["hospital-03"]
    assert [sorted(r["hospitals"]) for r in rounds] == [["hospital-01", "hospital-02"]] * 2
    mine = LedgerFile.read(next((fed.root / fed.ledgers).glob("*/hospital-03.jsonl"))).records
    declined = [r for r in mine if r["event"] == "declined"]
    assert declined and "site.min_noise" in declined[0]["payload"]["reason"]
