"""How long `fedmed audit` takes on a 10-round, 8-hospital run (the quickstart) with
sample-level DP: every check, without --empirical, as a user runs it (a fresh process,
imports included) and the audit's own time (the report's `seconds`). Then the leakage
scan on a 50 MB line, as anyone who can write into a run's metrics.jsonl can leave one:
the scan alone and the whole `fedmed audit` of the run with that line appended, each in
a fresh process, with its peak memory.

    python benchmarks/audit.py [RUN_DIR]      # without RUN_DIR: trains the run first (~3 min)
    python benchmarks/audit.py --line-only    # the 50 MB line's scan only (no run)

Targets: the run's audit under 30 s; the 50 MB line under 10 s.
"""

from __future__ import annotations

import argparse
import json
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from fedmed import config as config_mod
from fedmed.federation.simulation import run_simulation
from fedmed.run.directory import RunDirectory

LINE_BYTES = 50_000_000
# The near-match: word characters that end in what almost names a DICOM file. The
# file-name pattern fedmed had before took time quadratic in such a run (9.2 s at 80 KB).
NEAR_MATCH = ".dcmx"

# Run in a fresh process: the scan of one file, its seconds and the process's peak
# resident memory (ru_maxrss, KiB on Linux; fedmed's imports alone take hundreds of MiB),
# then the scan again under tracemalloc for the peak of what the scan itself allocates.
SCAN = """
import json, resource, sys, time, tracemalloc
from pathlib import Path
from fedmed.audit.leakage import scan_file
imported = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
started = time.perf_counter()
findings = scan_file(Path(sys.argv[1]), "metrics.jsonl")
seconds = time.perf_counter() - started
peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
tracemalloc.start()
scan_file(Path(sys.argv[1]), "metrics.jsonl")
allocated = tracemalloc.get_traced_memory()[1]
print(json.dumps({"seconds": seconds, "imported_kib": imported, "peak_kib": peak, "allocated": allocated, "findings": [f.line() for f in findings]}))
"""
# A command's wall time and peak resident memory: the wrapper's only child is the command.
MEASURED = """
import json, resource, subprocess, sys, time
started = time.perf_counter()
done = subprocess.run(sys.argv[1:], capture_output=True)
print(json.dumps({"seconds": time.perf_counter() - started, "peak_kib": resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss, "rc": done.returncode}))
"""


def long_line(path: Path) -> None:
    """metrics.jsonl's one record, a nested metrics field holding LINE_BYTES of word
    characters that end in NEAR_MATCH, written in pieces (the benchmark's own memory
    stays small)."""
    unit = b"aB3_" * 16384
    body = LINE_BYTES - len(b'{"round": 1, "metrics": {"note": ""}}') - len(NEAR_MATCH)
    with path.open("wb") as handle:
        handle.write(b'{"round": 1, "metrics": {"note": "')
        for _ in range(body // len(unit)):
            handle.write(unit)
        handle.write(unit[: body % len(unit)] + NEAR_MATCH.encode() + b'"}}\n')


def line_scan(folder: Path) -> None:
    path = folder / "metrics.jsonl"
    long_line(path)
    done = subprocess.run([sys.executable, "-c", SCAN, str(path)], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    print(f"50 MB line ({path.stat().st_size / 1e6:.1f} MB, {NEAR_MATCH!r} at its end): leakage scan {result['seconds']:.2f} s (target < 10 s), "
          f"peak memory {result['peak_kib'] / 1024:.0f} MiB ({result['imported_kib'] / 1024:.0f} MiB after imports; "
          f"the scan's own allocations peak at {result['allocated'] / 2**20:.1f} MiB)")
    for line in result["findings"]:
        print(f"  {line}")


def line_audit(run: Path, folder: Path) -> None:
    """The whole `fedmed audit` of a copy of the run whose metrics.jsonl ends with the line."""
    copy = Path(shutil.copytree(run, folder / run.name))
    long_line(folder / "line.jsonl")
    with (copy / RunDirectory.METRICS).open("ab") as out, (folder / "line.jsonl").open("rb") as line:
        shutil.copyfileobj(line, out)
    command = [sys.executable, "-m", "fedmed.cli", "audit", str(copy)]
    done = subprocess.run([sys.executable, "-c", MEASURED, *command], capture_output=True, text=True, check=True)
    result = json.loads(done.stdout.splitlines()[-1])
    report = json.loads((copy / RunDirectory.AUDIT).read_text())
    leaked = [f"{f['where']}: {f['message']}" for f in report["checks"]["leakage"]["findings"]]
    print(f"fedmed audit, the run with the 50 MB line in {RunDirectory.METRICS}: {result['seconds']:.2f} s whole command (target < 10 s), "
          f"{report['seconds']:.2f} s of checks, peak memory {result['peak_kib'] / 1024:.0f} MiB, exit code {result['rc']}")
    for line in leaked:
        print(f"  [leakage] {line}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("run", nargs="?", type=Path, help="a run directory to audit (default: train the quickstart first)")
    parser.add_argument("--line-only", action="store_true", help="only the 50 MB line's scan")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmed-audit-line-") as scratch:
        line_scan(Path(scratch))
    if args.line_only:
        return
    if args.run is not None:
        run = args.run
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
    with tempfile.TemporaryDirectory(prefix="fedmed-audit-line-") as scratch:
        line_audit(run, Path(scratch))


if __name__ == "__main__":
    main()
