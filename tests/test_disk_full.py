"""A disk that fills up: every command says so in one line and exits 2, leaves no
temporary file behind, and what it had written stays whole.

Each test runs its command on a real small file system that it fills: a tmpfs mounted in
a private user and mount namespace (`unshare -rm`, as an unprivileged user can where the
kernel allows it), so nothing is faked. What the command left on it is copied out for the
test to read before the namespace, and the tmpfs with it, goes away."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import textwrap
from dataclasses import dataclass
from functools import cache
from pathlib import Path

import numpy as np
import pytest

from fedmed import config as config_mod
from fedmed.federation import checkpoint
from fedmed.ledger.chain import LedgerFile
from fedmed.ledger.keys import KeyStore, default_key_store
from fedmed.run.directory import RunDirectory

from .conftest import TINY, assert_clean_failure
from .inprocess import run_in_process
from .test_sweep import STUDY

REPO = Path(__file__).resolve().parents[1]
FEDMED = str(Path(sys.executable).parent / "fedmed")
FULL = "no space left on device"

# Runs in the namespace: mount the tmpfs, prepare it, fill it (leaving $LEAVE KiB), run
# the command, then copy what is on the tmpfs (dot files too) out to $AFTER.
SCRIPT = """
set -e
mount -t tmpfs -o size="$SIZE" tmpfs "$DISK"
eval "$SETUP"
if [ "$LEAVE" != none ]; then
    dd if=/dev/zero of="$DISK/filler" bs=1k 2>/dev/null || true
    rm -f "$DISK/filler"
    free=$(df -k "$DISK" | awk 'NR==2 {print $4}')
    dd if=/dev/zero of="$DISK/filler" bs=1k count=$((free - LEAVE)) 2>/dev/null
fi
set +e
"$@" >"$RESULT/stdout" 2>"$RESULT/stderr" </dev/null
echo $? >"$RESULT/rc"
rm -f "$DISK/filler"
cp -a "$DISK/." "$AFTER/"
"""


@cache
def namespaces() -> str:
    """Why a private tmpfs cannot be mounted here ('' when it can)."""
    if not shutil.which("unshare"):
        return "no unshare(1) on this machine"
    probe = subprocess.run(["unshare", "-rm", "sh", "-c", "mount -t tmpfs -o size=64k tmpfs /mnt"], capture_output=True, text=True)
    if probe.returncode != 0:
        return f"user and mount namespaces are not available here (unshare -rm: {probe.stderr.strip()[:200]})"
    return ""


@pytest.fixture(autouse=True)
def _needs_namespaces():
    if reason := namespaces():
        pytest.skip(f"a full disk is made with a private tmpfs: {reason}")


@dataclass(frozen=True)
class Outcome:
    returncode: int
    stdout: str
    stderr: str
    after: Path  # what the command left on the full disk, copied out

    def dot_files(self) -> list[str]:
        """Temporary files (atomic writes' .NAME-*, caches' .building-*) left anywhere."""
        return sorted(str(p.relative_to(self.after)) for p in self.after.rglob(".*"))


def on_full_disk(tmp_path: Path, *command: object, size: str = "4m", leave_kib: int | None = 0, setup: str = "", timeout: float = 120) -> Outcome:
    """`command` with $DISK (a fresh tmpfs of `size`) full, but for `leave_kib` KiB
    (None: not filled); `setup` (sh) runs first, on the empty tmpfs. The command's
    arguments may use $DISK."""
    disk, result, after = (tmp_path / name for name in ("disk", "result", "after"))
    for folder in (disk, result, after):
        folder.mkdir()
    env = {
        **os.environ, "DISK": str(disk), "RESULT": str(result), "AFTER": str(after), "SIZE": size, "SETUP": setup,
        "LEAVE": "none" if leave_kib is None else str(leave_kib), "FLWR_TELEMETRY_ENABLED": "0",
    }
    argv = [str(a).replace("$DISK", str(disk)) for a in command]
    done = subprocess.run(["unshare", "-rm", "sh", "-c", SCRIPT, "sh", *argv], env=env, cwd=REPO, capture_output=True, text=True, timeout=timeout)
    assert done.returncode == 0 and (result / "rc").is_file(), done.stderr
    return Outcome(int((result / "rc").read_text()), (result / "stdout").read_text(), (result / "stderr").read_text(), after)


@pytest.fixture(scope="module")
def run_dir(cache_dir, tmp_path_factory) -> Path:
    """A finished federated run (in this process, no Ray): what `fedmed audit` reads."""
    values = {"data.cache_dir": cache_dir, "output.dir": str(tmp_path_factory.mktemp("runs"))}
    return run_in_process(config_mod.load(None, [*TINY, "federation.rounds=1"], values))


def test_the_audit_on_a_full_disk_is_one_line_and_keeps_the_earlier_report(run_dir, tmp_path):
    earlier = '{"verdict": "PASSED"}\n'
    setup = f"mkdir \"$DISK/audit\"; printf '%s' '{earlier}' >\"$DISK/audit/audit.json\"; echo earlier >\"$DISK/audit/audit.md\""
    outcome = on_full_disk(tmp_path, FEDMED, "audit", run_dir, "--out", "$DISK/audit", setup=setup)
    assert_clean_failure(outcome, FULL, "audit.json", "free space")
    assert outcome.dot_files() == []
    assert (outcome.after / "audit" / "audit.json").read_text() == earlier  # the old report, whole
    assert (outcome.after / "audit" / "audit.md").read_text() == "earlier\n"


# `fedmed simulate` with its federation in this process (tests/inprocess.py) instead of on
# Ray: the same ServerApp and ClientApp writing the same run directory, and the command's
# own entry point. (On Ray, an error in the ServerApp's thread reaches the command as it is.)
SIMULATE = """
import sys
from fedmed.cli import main
from fedmed.federation import simulation
from tests.inprocess import run_in_process
simulation.run_simulation = lambda cfg, verbose=False, **_: run_in_process(cfg)
sys.argv = ["fedmed", "simulate", *sys.argv[1:]]
main()
"""


def test_a_run_that_fills_the_disk_stops_in_one_line_and_what_it_wrote_stays_whole(cache_dir, tmp_path):
    """Round 1 is written, round 2's saved updates fill the disk: no temporary update file
    is left, and round 1's record, updates, checkpoint and ledgers all read back."""
    settings = [f"--set={s}" for s in (*TINY, f"data.cache_dir={cache_dir}", "output.save_updates=true", "output.name=run")]
    outcome = on_full_disk(tmp_path, sys.executable, "-c", SIMULATE, *settings, "--out", "$DISK", size="1700k", leave_kib=None)
    assert_clean_failure(outcome, FULL, "round-002.npz", "free space and run again")
    assert outcome.dot_files() == []
    run = RunDirectory(outcome.after / "run")
    assert [r["round"] for r in run.rounds()] == [1]
    assert (run / RunDirectory.METRICS).read_text().endswith("\n")
    assert sorted(p.name for p in (run / RunDirectory.UPDATES).iterdir()) == ["round-001.npz"]
    with np.load(run.updates_of(1)) as updates:
        assert len(updates.files) > 1
    assert checkpoint.load(run, KeyStore(default_key_store())).round == 1
    ledgers = [p for folder in run.ledger_runs() for p in folder.glob("*.jsonl")]
    assert len(ledgers) == 4  # the server's and three hospitals'
    for path in ledgers:
        ledger = LedgerFile.read(path)
        assert ledger.lines and not ledger.torn, path


def test_an_append_that_fills_the_disk_leaves_no_torn_line(tmp_path):
    """metrics.jsonl and a ledger each hold one line in a page of their own; the disk is
    full, so the next line fits only in part: the file is cut back to its whole lines."""
    script = textwrap.dedent("""
        import os, sys
        from pathlib import Path
        from fedmed.ledger.chain import LedgerWriter
        from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey
        from fedmed.ledger.keys import Signer
        from fedmed.run.directory import RunDirectory, write_new
        run = RunDirectory(Path(sys.argv[1]))
        writer = LedgerWriter(run / "ledger.jsonl", Signer("server", Ed25519PrivateKey.generate()), "r1")
        writer.append("start", 0, {"pad": "x" * 2000})
        (run / "metrics.jsonl").write_text('{"round": 1, "pad": "%s"}\\n' % ("x" * 2000))
        os.system(f"dd if=/dev/zero of={run / 'filler'} bs=1k 2>/dev/null; rm -f {run / 'filler'}; dd if=/dev/zero of={run / 'filler'} bs=1k count=$(( $(df -k {run.path} | awk 'NR==2 {{print $4}}') )) 2>/dev/null")
        failed = []
        for name, append in [("metrics", lambda: run.append_round({"round": 2, "pad": "y" * 3000})),
                             ("ledger", lambda: writer.append("round", 1, {"pad": "y" * 3000})),
                             ("key", lambda: write_new(run / "party.key", b"k" * 8192, 0o600))]:
            try:
                append()
            except OSError as exc:
                failed.append(f"{name}: {exc.errno} {exc.filename}")
        print("\\n".join(failed))
    """)
    outcome = on_full_disk(tmp_path, sys.executable, "-c", script, "$DISK", size="64k", leave_kib=None)
    assert outcome.returncode == 0, outcome.stderr
    disk = tmp_path / "disk"
    assert outcome.stdout.splitlines() == [f"metrics: 28 {disk}/metrics.jsonl", f"ledger: 28 {disk}/ledger.jsonl", f"key: 28 {disk}/party.key"]
    run = RunDirectory(outcome.after)
    assert [r["round"] for r in run.rounds()] == [1]
    assert (run / "metrics.jsonl").read_text().count("\n") == 1
    ledger = LedgerFile.read(run / "ledger.jsonl")
    assert len(ledger.lines) == 1 and not ledger.torn
    assert not (run / "party.key").exists()  # a key cut short would be kept, and refused, as existing
    assert json.loads((run / "metrics.jsonl").read_text())["round"] == 1


def test_make_demo_on_a_full_disk_keeps_nothing_half_written(cache_dir, tmp_path):
    settings = [f"--set={s}" for s in (*TINY, f"data.cache_dir={cache_dir}")]
    outcome = on_full_disk(tmp_path, FEDMED, "data", "make-demo", "$DISK/demo", *settings, size="64k", leave_kib=24)
    assert_clean_failure(outcome, "cannot write the demo images", FULL)
    assert list(outcome.after.iterdir()) == []


def test_the_data_cache_on_a_full_disk_is_one_line(tmp_path):
    settings = [f"--set={s}" for s in (*TINY, "data.cache_dir=$DISK/cache", f"output.dir={tmp_path / 'runs'}")]
    outcome = on_full_disk(tmp_path, FEDMED, "simulate", *settings, size="64k")
    assert_clean_failure(outcome, "cannot write the data cache", "free space and run again")
    assert outcome.dot_files() == []
    assert not (tmp_path / "runs").exists()  # stopped before the run started


def test_a_sweep_on_a_full_disk_is_one_line(cache_dir, tmp_path):
    study = tmp_path / "study.toml"
    study.write_text(STUDY.format(cache=cache_dir))  # the sweep tests' two-cell study
    outcome = on_full_disk(tmp_path, FEDMED, "sweep", study, "--out", "$DISK/out", size="64k")
    assert_clean_failure(outcome, FULL, "free space and run again")
