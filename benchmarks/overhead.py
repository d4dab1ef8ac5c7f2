"""Framework overhead: the quickstart federated (Flower + Ray) against pooled training.

Both runs take the same number of sample-gradient steps and the same evaluation
work (the global test set and every hospital's test split, each round). Each runs
as its own `fedmed simulate` process, as a user would run it, after the data is
cached. Prints wall times, their ratio, time to the first round and peak memory
(resident set of the whole process tree, sampled every 0.2 s).

    python benchmarks/overhead.py [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fedmed.run.directory import RunDirectory

ROOT = Path(__file__).resolve().parents[1]
QUICKSTART = ROOT / "simulations" / "quickstart.toml"


def _tree_rss(proc: psutil.Process) -> int:
    total = 0
    for p in [proc, *proc.children(recursive=True)]:
        try:
            total += p.memory_info().rss
        except psutil.Error:
            pass
    return total


def run(mode: str, out: Path, overrides: list[str]) -> dict:
    args = [sys.executable, "-m", "fedmed.cli", "simulate", str(QUICKSTART), "--out", str(out),
            "--set", f"federation.mode='{mode}'", "--set", f"output.name='{mode}'"]
    for item in overrides:
        args += ["--set", item]
    env = {**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}
    # Ray's own processes count towards the federated run's memory: they live in
    # the same process tree only while they run, so sample throughout.
    start = time.time()
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak = 0
    done = threading.Event()

    def sample() -> None:
        nonlocal peak
        ps = psutil.Process(proc.pid)
        while not done.is_set():
            try:
                peak = max(peak, _tree_rss(ps))
            except psutil.Error:
                pass
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    wall = time.time() - start
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{mode} run failed:\n{output}")
    run = RunDirectory(out / mode)
    records, summary = run.rounds(), run.summary()
    return {
        "wall": wall,
        "first_round": records[0]["finished_at"] - start,
        "peak_mb": peak / 2**20,
        "accuracy": summary["test"]["accuracy"],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as in fedmed simulate")
    args = parser.parse_args()

    sys.path.insert(0, str(ROOT))
    from fedmed import config as config_mod
    from fedmed.data.sites import ensure_data

    ensure_data(config_mod.load(QUICKSTART, args.overrides))  # data generation is not framework overhead
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-") as tmp:
        results = {mode: run(mode, Path(tmp), args.overrides) for mode in ("pooled", "federated")}
    pooled, fed = results["pooled"], results["federated"]
    print(f"{'':>10} {'wall s':>8} {'first round s':>14} {'peak MB':>8} {'test acc':>9}")
    for mode, r in results.items():
        print(f"{mode:>10} {r['wall']:8.1f} {r['first_round']:14.1f} {r['peak_mb']:8.0f} {r['accuracy']:9.3f}")
    print(f"federated / pooled wall time: {fed['wall'] / pooled['wall']:.3f} (target <= 1.25)")


if __name__ == "__main__":
    main()
