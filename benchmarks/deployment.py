"""A deployed round against a simulated one: three hospitals on loopback (real SuperLink
with TLS and node authentication, real SuperNodes, `fedmed server start` and `fedmed
site start`), tiny data, 3 rounds; then the same settings in `fedmed simulate`.

Prints each round's wall time side by side. Round 1 of the deployment includes the
hospitals connecting; rounds 2 and 3 are the steady state a federation lives in.

    python benchmarks/deployment.py [--rounds 3]
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # the deployment tests' federation helper

from fedmed.run.directory import RunDirectory  # noqa: E402
from tests.deployment import HOSPITALS, Federation, make_world  # noqa: E402


def deployed(root: Path, rounds: int) -> tuple[list[float], float]:
    fed = Federation(root, str(root / "cache"), "bench")
    try:
        started = time.monotonic()
        fed.start_server(fed.server_config(rounds=rounds))
        for name in HOSPITALS:
            fed.start_site(name)
        code = fed.finish(limit=1800)
        wall = time.monotonic() - started
        if code != 0:
            raise SystemExit(f"the deployed run failed (exit {code}):\n{fed.output('server')[-2000:]}")
        return [r["time_s"] for r in fed.rounds_done()], wall
    finally:
        fed.stop_all()


def simulated(root: Path, rounds: int) -> list[float]:
    """The deployment's settings (tests/deployment.py) as a simulation: three hospitals of
    24 training and 8 test images, 32 px, batch 8."""
    settings = [
        "data.image_size=32", "data.hospitals=3", "data.train_per_hospital=24", "data.test_per_hospital=8", "data.global_test_size=24",
        f"data.cache_dir='{root / 'cache'}'", f"federation.rounds={rounds}", "train.batch_size=8", "output.name='simulated'",
    ]
    command = [sys.executable, "-m", "fedmed.cli", "simulate", "--out", str(root / "runs-sim")]
    for item in settings:
        command += ["--set", item]
    done = subprocess.run(command, env={**os.environ, "FLWR_TELEMETRY_ENABLED": "0"}, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"the simulation failed:\n{done.stdout[-2000:]}{done.stderr[-2000:]}")
    return [r["time_s"] for r in RunDirectory(root / "runs-sim" / "simulated").rounds()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--keep", type=Path, help="Work in this (new) folder and keep its logs, instead of a temporary one.")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="fedmed-bench-") as tmp:
        root = Path(tmp) if args.keep is None else args.keep.resolve()
        root.mkdir(parents=True, exist_ok=args.keep is None)
        make_world(root, str(root / "cache"))
        deploy, wall = deployed(root, args.rounds)
        sim = simulated(root, args.rounds)
    print(f"three hospitals, {args.rounds} rounds, 24 training images each (32 px), {os.cpu_count()} CPUs")
    print(f"{'round':>5}  {'deployed (s)':>12}  {'simulated (s)':>13}")
    for i, (d, s) in enumerate(zip(deploy, sim, strict=True), start=1):
        print(f"{i:>5}  {d:>12.1f}  {s:>13.1f}")
    steady = deploy[1:] or deploy
    print(f"deployed: {sum(steady) / len(steady):.1f} s per round after the first; {wall:.0f} s from `server start` to its exit")


if __name__ == "__main__":
    main()
