"""Scale: federations of 10 to 10,000 simulated hospitals, 10 of them asked each round.

Each size runs as its own `fedmed simulate` process, as a user would run it: 5 rounds,
10 hospitals drawn to train each round (`federation.fraction_train` = 10 / hospitals),
20 training and 4 test images of 64x64 per hospital, the global model evaluated on the
server's test set each round. The hospitals' own evaluation is off
(`fraction_evaluate` = 0) so that every size runs the same protocol: where every
hospital trains and evaluates (10 of 10), fedmed sends one message per hospital a
round instead of two, which would flatter the smallest size. A hospital's images are made when it is first asked; the benchmark runs each
size twice and reports the second run, whose hospitals' images are in the data cache
(the first run's figures, with the images made during the rounds, are printed too).

Prints, per size: time to the first round (from the command's start to round 1's
record), the mean round time of rounds 2-5 (round 1 also starts Ray's actors), and the
peak memory of the whole process tree (Ray's processes included) as proportional set
size, so pages shared between processes count once (sampled every 0.2 s).

    python benchmarks/scale.py [--sizes 10,100,1000,10000] [--set section.key=value ...]
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import psutil

from fedmed.run.directory import RunDirectory

PER_ROUND = 10
ROUNDS = 5
SETTINGS = ("data.train_per_hospital=20", "data.test_per_hospital=4", "data.global_test_size=200", f"federation.rounds={ROUNDS}")
TARGETS = "targets at 10,000: round time <= 1.2x that at 10, peak memory <= 4 GB, first round <= 60 s"


def tree_pss(root: psutil.Process) -> int:
    """Proportional set size of `root` and every process under it."""
    try:
        tree = [root, *root.children(recursive=True)]
    except psutil.Error:  # the run has just ended
        return 0
    total = 0
    for process in tree:
        try:
            total += process.memory_full_info().pss
        except psutil.Error:  # gone, or not ours to read
            pass
    return total


def run(hospitals: int, out: Path, name: str, overrides: list[str], cache: str) -> dict:
    share = PER_ROUND / hospitals
    settings = [*SETTINGS, f"data.hospitals={hospitals}", f"federation.fraction_train={share}", "federation.fraction_evaluate=0",
                f"data.cache_dir={cache}", f"output.name='{name}'", *overrides]
    args = [sys.executable, "-m", "fedmed.cli", "simulate", "--out", str(out), *(f"--set={s}" for s in settings)]
    start = time.time()
    proc = subprocess.Popen(args, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    peak, done = 0, threading.Event()

    def sample() -> None:
        nonlocal peak
        root = psutil.Process(proc.pid)
        while not done.is_set():
            peak = max(peak, tree_pss(root))
            time.sleep(0.2)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    output, _ = proc.communicate()
    done.set()
    sampler.join()
    if proc.returncode != 0:
        sys.exit(f"{hospitals} hospitals: the run failed:\n{output}")
    records = RunDirectory(out / name).rounds()
    return {
        "first_round": records[0]["finished_at"] - start,
        "round": statistics.mean(r["time_s"] for r in records[1:]),
        "peak_gb": peak / 1e9,
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="10,100,1000,10000", help="numbers of hospitals, comma-separated")
    parser.add_argument("--set", dest="overrides", action="append", default=[], help="config override, as in fedmed simulate")
    args = parser.parse_args()
    sizes = [int(s) for s in args.sizes.split(",")]
    rows = {}
    with tempfile.TemporaryDirectory(prefix="fedmed-scale-") as tmp:
        cache = str(Path(tmp) / "cache")
        for n in sizes:
            cold = run(n, Path(tmp), f"h{n}-first", args.overrides, cache)
            rows[n] = (cold, run(n, Path(tmp), f"h{n}", args.overrides, cache))
            print(f"{n} hospitals done", file=sys.stderr, flush=True)
    print(f"{'hospitals':>10} {'first round s':>14} {'round s':>8} {'peak GB':>8}   {'(first run: first round s':>26} {'round s)':>9}")
    for n, (cold, warm) in rows.items():
        print(f"{n:>10} {warm['first_round']:14.1f} {warm['round']:8.2f} {warm['peak_gb']:8.2f}   {cold['first_round']:26.1f} {cold['round']:9.2f}")
    if sizes[0] != sizes[-1]:
        ratio = rows[sizes[-1]][1]["round"] / rows[sizes[0]][1]["round"]
        print(f"round time at {sizes[-1]} / at {sizes[0]}: {ratio:.2f}")
    print(TARGETS)


if __name__ == "__main__":
    main()
