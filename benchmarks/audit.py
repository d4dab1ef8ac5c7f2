"""How long `fedmed audit` takes on a 10-round, 8-hospital run (the quickstart) with
sample-level DP: every check, without --empirical, as a user runs it (a fresh process,
imports included) and the audit's own time (the report's `seconds`).

    python benchmarks/audit.py [RUN_DIR]      # without RUN_DIR: trains the run first (~3 min)

Target: under 30 s.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmed import config as config_mod
from fedmed.federation.simulation import run_simulation
from fedmed.run.directory import RunDirectory


def main() -> None:
    if len(sys.argv) > 1:
        run = Path(sys.argv[1])
    else:
        out = Path(tempfile.mkdtemp(prefix="fedmed-audit-bench-"))
        cfg = config_mod.load(Path("simulations/quickstart.toml"), ["privacy.mode=sample"], {"output.dir": str(out)})
        started = time.perf_counter()
        run = run_simulation(cfg)
        print(f"training: {time.perf_counter() - started:.1f} s -> {run}")
    ledgers = sorted((run / RunDirectory.LEDGERS).glob("*/*.jsonl"))
    records = sum(len(p.read_text().splitlines()) for p in ledgers)
    updates = sum(p.stat().st_size for p in (run / RunDirectory.UPDATES).glob("*.npz")) / 2**20
    started = time.perf_counter()
    done = subprocess.run([sys.executable, "-m", "fedmed.cli", "audit", str(run)], capture_output=True, text=True)
    wall = time.perf_counter() - started
    report = json.loads((run / RunDirectory.AUDIT).read_text())
    print(f"ledgers: {len(ledgers)} ({records} records); saved updates: {updates:.1f} MiB")
    print(f"audit exit code: {done.returncode} ({'passed' if report['passed'] else 'FAILED'})")
    print(f"audit checks: {report['seconds']:.2f} s")
    print(f"fedmed audit, whole command: {wall:.2f} s (target < 30 s)")


if __name__ == "__main__":
    main()
