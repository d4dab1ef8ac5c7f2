"""A real deployment on loopback: `fedmed server start` (SuperLink with TLS and node
authentication) and `fedmed site start` (SuperNodes), the same ServerApp and ClientApp
as the simulation, through crashes, dropouts, refusals and policy declines."""

from __future__ import annotations

import http.client
import json
import ssl

import pytest

from fedmed.audit.ledger import LedgerFile

from .deployment import HOSPITALS, Federation, make_world
from .test_cli import fedmed

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(tmp_path_factory, cache_dir):
    root = tmp_path_factory.mktemp("deployment")
    make_world(root, cache_dir)
    return root


@pytest.fixture(scope="module")
def healthy(world, cache_dir):
    """Three hospitals, 2 rounds; while it runs, a node whose key was never enrolled tries
    to join and a client tries plain HTTP."""
    fed = Federation(world, cache_dir, "healthy")
    try:
        config = fed.server_config()
        fed.start_server(config)
        fed.start_sites(*((name, ()) for name in HOSPITALS))
        fed.wait_for(lambda: _any_training(fed), 300, "round 1 to start", fed.procs["server"])
        status = fedmed("server", "status", "--config", str(config), cwd=world)
        intruder = fed.start("hospital-99", "site", "start", "--config", str(fed.site_config("hospital-99")))
        intruder_code = intruder.wait(timeout=240)  # it retries for 90 s
        plain = _plain_http(fed.port)
        code = fed.finish()
        yield fed, code, intruder_code, plain, status
    finally:
        fed.stop_all()


def _any_training(fed: Federation) -> bool:
    return any((fed.root / fed.ledgers).glob("*/hospital-0*.jsonl"))


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


def test_three_hospitals_over_tls_complete_two_rounds_and_the_server_writes_the_results(healthy):
    fed, code, _, _, _ = healthy
    assert code == 0, fed.output("server")[-3000:]
    rounds = fed.rounds_done()
    assert [r["round"] for r in rounds] == [1, 2]
    assert all(sorted(r["hospitals"]) == list(HOSPITALS) for r in rounds)
    assert all("eval" in phases for phases in rounds[-1]["hospitals"].values())  # their own test sets
    run = fed.run_dir()
    assert (run / "model.pt").is_file() and json.loads((run / "summary.json").read_text())["rounds"] == 2
    assert "round 2/2: global test accuracy" in fed.output("server")


def test_a_node_whose_key_was_not_enrolled_is_refused_and_the_run_goes_on(healthy):
    fed, code, intruder_code, _, _ = healthy
    assert intruder_code == 2
    assert "is not enrolled" in fed.output("hospital-99") and "Traceback" not in fed.output("hospital-99")
    assert code == 0 and all("hospital-99" not in r["hospitals"] for r in fed.rounds_done())


def test_a_plain_text_connection_to_the_tls_server_fails(healthy):
    _, _, _, plain, _ = healthy
    assert plain.startswith("failed"), plain


def test_server_status_shows_the_connected_hospitals_and_the_runs_progress(healthy):
    *_, status = healthy
    assert status.returncode == 0, status.stderr
    for name in HOSPITALS:
        assert f"{name}" in status.stdout
    assert status.stdout.count("online") == 3 and "of 2 rounds done" in status.stdout


def test_a_hospital_killed_during_a_round_drops_out_and_the_others_finish(world, cache_dir):
    fed = Federation(world, cache_dir, "dropout")
    node_log = fed.root / fed.ledgers / "hospital-03-supernode.log"
    try:
        fed.start_server(fed.server_config(min_hospitals=2, fraction_evaluate=0.0, round_timeout=150))
        fed.start_sites(*((name, ()) for name in HOSPITALS))
        # its first train request has arrived: its ClientApp is starting (seconds of imports)
        fed.wait_for(lambda: node_log.is_file() and "Receiving: train message" in node_log.read_text(errors="replace"),
                     300, "round 1 to reach hospital-03", fed.procs["server"])
        fed.crash("hospital-03")
        assert fed.finish() == 0, fed.output("server")[-3000:]
        rounds = fed.rounds_done()
        assert [sorted(r["hospitals"]) for r in rounds] == [["hospital-01", "hospital-02"]] * 2
        assert [r["dropped"] for r in rounds] == [["hospital-03"], []]
        assert "dropped out: hospital-03" in fed.output("server")
    finally:
        fed.stop_all()


def test_a_crashed_server_resumes_after_its_last_round_and_a_declining_hospital_is_left_out(world, cache_dir):
    fed = Federation(world, cache_dir, "resume")
    try:
        config = fed.server_config(fraction_evaluate=0.0, min_hospitals=2)
        fed.start_server(config)
        strict = ("min_noise = 1.0",)  # requires DP-SGD: this federation trains without
        fed.start_sites(("hospital-01", ()), ("hospital-02", ()), ("hospital-03", strict))
        fed.wait_for(lambda: (fed.run_dir() / "checkpoint.pkl").is_file(), 300, "round 1's checkpoint", fed.procs["server"])
        fed.crash("server")
        assert [r["round"] for r in fed.rounds_done()] == [1]

        fed.start_server(config, "--resume", label="resumed")
        assert fed.finish("resumed") == 0, fed.output("resumed")[-3000:]
        rounds = fed.rounds_done()
        assert [r["round"] for r in rounds] == [1, 2]  # no gap, no repeat
        assert rounds[0]["declined"] == ["hospital-03"]
        assert sorted(rounds[1]["hospitals"]) == ["hospital-01", "hospital-02"]
        assert "resuming" in fed.output("resumed")
        server = LedgerFile.read(next(fed.run_dir().glob("ledgers/*/server.jsonl"))).records
        assert [r["event"] for r in server].count("resume") == 1
        assert [r["round"] for r in server if r["event"] == "train-round"] == [1, 2]
        mine = LedgerFile.read(next((fed.root / fed.ledgers).glob("*/hospital-03.jsonl"))).records
        declined = [r for r in mine if r["event"] == "declined"]
        assert declined and "site.min_noise" in declined[0]["payload"]["reason"]
    finally:
        fed.stop_all()
