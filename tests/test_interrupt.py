"""Ctrl-C and SIGTERM during `fedmed simulate`: Ray and every child stopped within 10 s,
one line saying where the run stopped, exit 130 or 143, the run directory marked
interrupted (its audit says so, not tampering), and `fedmed simulate --resume RUN`
continuing it to a run whose audit passes. The refusals of --resume are one line."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from fedmed import config as config_mod
from fedmed.federation import checkpoint, simulation
from fedmed.ledger.keys import KeyStore, Signer, default_key_store
from fedmed.run.directory import RunDirectory

from .auditing import audit_of
from .conftest import assert_clean_failure, fedmed, from_a_terminal
from .inprocess import run_in_process

pytestmark = pytest.mark.slow

FEDMED = Path(sys.executable).parent / "fedmed"
STOP_S = 10  # a signalled run must be gone within this
SMALL = ["data.image_size=32", "data.hospitals=1", "data.train_per_hospital=24", "data.test_per_hospital=12",
         "data.global_test_size=24", "train.batch_size=8"]
# The interrupted run is SCAFFOLD's: its server state (the control variate) goes into the
# checkpoint, the hospital's own variate into its folder, and both must survive each stop.
SCAFFOLD = ["federation.strategy=scaffold", "train.optimizer=sgd", "train.momentum=0", "train.lr=0.05"]


def _session(sid: int) -> list[int]:
    """The live (not zombie) processes of session `sid`: what the command started."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        state, _ppid, _pgrp, session = stat[stat.rindex(")") + 2 :].split()[:4]
        if int(session) == sid and state != "Z":
            out.append(int(entry.name))
    return out


def _command(pid: int) -> str:
    try:
        return (Path("/proc") / str(pid) / "cmdline").read_bytes().replace(b"\0", b" ").decode()[:120]
    except OSError:
        return "?"


def _wait_for(what: str, ready: Callable[[], bool], process: subprocess.Popen, within: float = 300) -> None:
    """A guard against a hang, not a timing: a loaded machine may take minutes to start Ray."""
    deadline = time.monotonic() + within
    while not ready():
        assert process.poll() is None, f"fedmed exited ({process.returncode}) before {what}: {process.stderr.read()}"
        assert time.monotonic() < deadline, f"no {what} after {within} s"
        time.sleep(0.05)


def _rounds(run: Path) -> list[int]:
    return [int(r["round"]) for r in RunDirectory(run).rounds()]


def _signalled(args: list[object], ready: Callable[[], bool], signum: int, to_group: bool, again: bool = False) -> tuple[int, str, float]:
    """`fedmed ARGS` in a session of its own, sent `signum` (to its process group, as a
    terminal's Ctrl-C, or to it alone, as `kill`) once `ready()`; `again`: a second signal
    while it stops. Its exit code, stderr, and the seconds from the signal until it and
    everything it started (Ray's processes) are gone."""
    process = subprocess.Popen([FEDMED, *map(str, args)], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True, preexec_fn=from_a_terminal)
    try:
        _wait_for("round to interrupt", ready, process)
        sent = time.monotonic()
        (os.killpg if to_group else os.kill)(process.pid, signum)
        if again:
            time.sleep(0.3)
            (os.killpg if to_group else os.kill)(process.pid, signum)
        _, stderr = process.communicate(timeout=STOP_S + 20)
        while _session(process.pid) and time.monotonic() < sent + STOP_S:  # Ray's workers end once its raylet has
            time.sleep(0.05)
        took = time.monotonic() - sent
        left = {pid: _command(pid) for pid in _session(process.pid)}
        assert not left, f"left running {took:.1f} s after the signal: {left}"
        return process.returncode, stderr, took
    finally:
        if process.poll() is None or _session(process.pid):
            os.killpg(process.pid, signal.SIGKILL)
            process.wait()


# What Ray relays from its worker processes, "(pid=N) ...", in colour: Ray's, not
# fedmed's (on a loaded machine, abseil's "Lock blocking" warnings, at any time in a run).
RAY_WORKER_LOG = re.compile(r"^(\x1b\[\d+m)?\((\w+ )?pid=\d+")


def _one_line(stderr: str) -> str:
    """fedmed's one line; no traceback anywhere."""
    lines = [line for line in stderr.strip().splitlines() if not RAY_WORKER_LOG.match(line)]
    assert "Traceback" not in stderr and len(lines) == 1, stderr
    return lines[0]


def test_a_signalled_simulation_stops_at_once_and_resumes_to_a_verified_run(cache_dir, ray_head, tmp_path, monkeypatch):
    """Ctrl-C (twice) while the run starts its own Ray: 130, all of Ray gone, marked and
    audited as interrupted; resumed on a Ray cluster, `kill` after a round: 143; resumed
    again to the end (in this process): its audit passes."""
    rounds, run = 8, tmp_path / "runs" / "interrupted"
    sets = [f"--set={s}" for s in [*SMALL, *SCAFFOLD, f"federation.rounds={rounds}", f"data.cache_dir='{cache_dir}'"]]
    code, stderr, took = _signalled(
        ["simulate", *sets, "--set=output.name=interrupted", "--out", run.parent], lambda: bool(_rounds(run)), signal.SIGINT, to_group=True, again=True
    )
    status = RunDirectory(run).status()
    first = status["after_round"]
    assert (code, status["state"], status["signal"]) == (130, "interrupted", "SIGINT"), stderr
    assert took < STOP_S, took
    assert 1 <= first < rounds - 2
    assert _one_line(stderr) == f"interrupted (SIGINT) after round {first} of {rounds}: run `fedmed simulate --resume {run}` to continue"
    assert checkpoint.load(RunDirectory(run), KeyStore(default_key_store())).round == first

    shown = fedmed("audit", run)
    code, report = audit_of(run)
    assert (shown.returncode, code, report["interrupted_after_round"]) == (1, 1, first)
    assert f"interrupted after round {first}" in shown.stdout.replace("\n", " ")
    assert all(report["checks"][check]["passed"] for check in ("integrity", "checkpoints", "identity", "consistency")), report["checks"]

    on_cluster = ["--set", f"data.cache_dir='{cache_dir}'", "--ray-address", ray_head.address]  # paths and Ray are this machine's to give again
    code, stderr, took = _signalled(
        ["simulate", "--resume", run, *on_cluster], lambda: max(_rounds(run), default=0) > first, signal.SIGTERM, to_group=False
    )
    second = RunDirectory(run).status()["after_round"]
    assert (code, RunDirectory(run).status()["signal"]) == (143, "SIGTERM"), stderr
    assert took < STOP_S, took
    assert first < second < rounds
    assert _one_line(stderr) == f"interrupted (SIGTERM) after round {second} of {rounds}: run `fedmed simulate --resume {run}` to continue"
    assert ray_head.process.poll() is None, "an interrupted run must not stop a Ray cluster it did not start"

    # The rest of the run through the command's own entry point, its federation in this
    # process (tests/inprocess.py: the same apps, without Ray's start-up on a loaded machine).
    monkeypatch.setattr(simulation, "run_simulation", lambda cfg, resume=None, **_: run_in_process(simulation.prepare(cfg, resume=True), resume=resume))
    finished = fedmed("simulate", "--resume", run, "--set", f"data.cache_dir='{cache_dir}'")
    assert finished.returncode == 0, finished.stderr
    assert f"resumed after round {second}" in finished.stdout
    assert RunDirectory(run).status() == {"state": "finished", "after_round": rounds, "rounds": rounds, "signal": None}
    assert _rounds(run) == list(range(1, rounds + 1))
    server = RunDirectory(run).ledger_runs()[0] / "server.jsonl"
    events = [json.loads(line)["event"] for line in server.read_text().splitlines()]
    assert [e for e in events if e in ("interrupted", "resume", "run-end")] == ["interrupted", "resume", "interrupted", "resume", "run-end"]
    code, report = audit_of(run)
    assert (code, report["verdict"], report["interrupted_after_round"]) == (0, "PASSED", None), report  # SCAFFOLD's steps replayed across the stops
    variates = list((run / RunDirectory.LEDGERS).glob("*/hospital-01.scaffold.pt"))
    assert len(variates) == 1  # the hospital's control variate, kept through both stops

    again = fedmed("simulate", "--resume", run)
    assert_clean_failure(again, "has finished: nothing to resume")

    RunDirectory(run).write_status("interrupted", second, rounds, "SIGINT")  # a claim the signed ledger does not back
    code, report = audit_of(run)
    assert code == 1
    assert [f["message"] for f in report["checks"]["integrity"]["findings"]] == [
        "says interrupted but the server ledger has no signed interrupted record at its end"
    ]


def test_a_signalled_baseline_stops_in_one_line(cache_dir, tmp_path):
    run = tmp_path / "runs" / "pooled"
    sets = [f"--set={s}" for s in [*SMALL, "federation.mode=pooled", "federation.rounds=50", f"data.cache_dir='{cache_dir}'", "output.name=pooled"]]
    code, stderr, took = _signalled(["simulate", *sets, "--out", run.parent], lambda: bool(_rounds(run)), signal.SIGTERM, to_group=True)
    status = RunDirectory(run).status()
    assert (code, status["state"], status["signal"]) == (143, "interrupted", "SIGTERM"), stderr
    assert took < STOP_S
    assert _one_line(stderr) == f"interrupted (SIGTERM) after round {status['after_round']} of 50: a pooled baseline keeps no checkpoint; run it again ({run})"
    assert_clean_failure(fedmed("simulate", "--resume", run), "is a pooled baseline")


# ---- what --resume refuses, in one line ---------------------------------------------


@pytest.fixture
def stopped(tiny_config, tmp_path) -> Callable[..., Path]:
    """A run directory as a federated run leaves it after round 1 (`federation.rounds=2`),
    without training: its config, and a checkpoint unless `saved` is false."""

    def make(*extra: str, saved: bool = True, digest: str | None = None, signer: Signer | None = None) -> Path:
        cfg = tiny_config("output.name=stopped", *extra)
        out = RunDirectory.create(cfg)
        out.write_status("interrupted", 1, 2, "SIGINT")
        if saved:
            checkpoint.save(out, checkpoint.Checkpoint(1, digest or cfg.digest(), {}, {}, "0" * 16), signer or KeyStore(default_key_store()).signer("server"))
        return out.path

    return make


def test_resume_refuses_what_is_not_a_run(tmp_path):
    assert_clean_failure(fedmed("simulate", "--resume", tmp_path), f"{tmp_path} is not a run directory")


def test_resume_refuses_a_run_without_a_checkpoint(stopped):
    assert_clean_failure(fedmed("simulate", "--resume", stopped(saved=False)), "has no checkpoint")


def test_resume_refuses_a_finished_run(stopped):
    run = stopped()
    RunDirectory(run).write_status("finished", 2, 2)
    assert_clean_failure(fedmed("simulate", "--resume", run), "has finished: nothing to resume")


def test_resume_refuses_other_settings(stopped):
    assert_clean_failure(fedmed("simulate", "--resume", stopped(), "--set", "train.lr=0.5"), "the settings differ from those")


def test_resume_refuses_a_checkpoint_of_other_settings(stopped):
    assert_clean_failure(fedmed("simulate", "--resume", stopped(digest="f" * 64)), "the settings differ from those")


def test_resume_takes_no_config_file_or_out(stopped, tmp_path):
    run = stopped()
    assert_clean_failure(fedmed("simulate", run / RunDirectory.CONFIG, "--resume", run), "pass no config file and no --out")
    assert_clean_failure(fedmed("simulate", "--resume", run, "--out", tmp_path), "pass no config file and no --out")


def test_resume_asks_again_for_a_data_path_it_did_not_record(stopped, tmp_path):
    run = stopped("data.source=disk", f"data.path='{tmp_path}'")
    assert config_mod.load(run / RunDirectory.CONFIG).data.path == config_mod.REDACTED
    assert_clean_failure(fedmed("simulate", "--resume", run), "does not record data.path", "--set data.path=PATH")


def test_resume_refuses_a_checkpoint_the_key_store_did_not_sign(stopped, tmp_path):
    """Changed by whoever holds the run directory, or made with another key store: it is
    never unpickled (pickle runs code), and the run's figures are not signed from it."""
    run = stopped(signer=KeyStore(tmp_path / "other-store").signer("server"))
    assert_clean_failure(fedmed("simulate", "--resume", run), "checkpoint.pkl is not signed by the server key in", "FEDMED_KEY_STORE")


def test_resume_refuses_an_edited_metrics_file(stopped):
    run = stopped()
    (run / RunDirectory.METRICS).write_text("[1, 2]\n")
    assert_clean_failure(fedmed("simulate", "--resume", run), "metrics.jsonl is not one JSON round record per line")
