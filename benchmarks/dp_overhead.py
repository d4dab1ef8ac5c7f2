"""The cost of DP-SGD in fedmed's own training: throughput (images/s) of one hospital's
local round with and without differential privacy, measured alternately in one
process after a warm-up, with fedmed's data (a demo hospital's training images),
loader, batch size, augmentation and, under DP, Poisson sampling, per-image clipping
and noise (Opacus, hooks mode).

    python benchmarks/dp_overhead.py [--batch-size 32] [--repeats 3] [--set section.key=value ...]

The last line is the ratio DP / non-DP.
"""

from __future__ import annotations

import argparse
import time

import torch

from fedmed import config as config_mod
from fedmed.data.sites import ensure_data, site_data
from fedmed.models import build_model
from fedmed.privacy.dpsgd import DPSGD, plan
from fedmed.training.loop import train


def throughput(cfg: config_mod.FedmedConfig, x: torch.Tensor, y: torch.Tensor, private: bool, seed: int) -> float:
    model = build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed)
    dp = DPSGD(plan(cfg, len(y))) if private else None
    start = time.perf_counter()
    stats = train(model, x, y, cfg.train, seed=seed, private=dp)
    return stats.examples / (time.perf_counter() - start)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--batch-size", type=int, default=32, help="the batch size of simulations/dp_tradeoff.toml")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--set", action="append", default=[], dest="overrides")
    args = parser.parse_args()
    cfg = config_mod.load(
        None, ["privacy.mode=sample", "privacy.accountant=rdp", f"train.batch_size={args.batch_size}", *args.overrides]
    )
    ensure_data(cfg, announce=print)
    site = site_data(cfg, 0)
    x, y = site.train.x, site.train.y
    p = plan(cfg, len(y))
    print(
        f"model {cfg.model.name} (width {cfg.model.width}), {cfg.data.image_size}x{cfg.data.image_size}, {len(y)} images, "
        f"batch {cfg.train.batch_size}, {torch.get_num_threads()} threads; DP: sigma {p.sigma:.3f}, q {p.rate:.4f}, clip {p.max_grad_norm}"
    )
    throughput(cfg, x, y, private=False, seed=0)  # warm-up: allocator, kernels, Opacus import
    throughput(cfg, x, y, private=True, seed=0)
    plain, private = [], []
    for i in range(args.repeats):
        plain.append(throughput(cfg, x, y, private=False, seed=i + 1))
        private.append(throughput(cfg, x, y, private=True, seed=i + 1))
        print(f"pass {i + 1}: without DP {plain[-1]:7.1f} img/s   with DP {private[-1]:7.1f} img/s")
    best_plain, best_private = sorted(plain)[len(plain) // 2], sorted(private)[len(private) // 2]
    print(f"median: without DP {best_plain:.1f} img/s, with DP {best_private:.1f} img/s")
    print(f"ratio (DP / non-DP): {best_private / best_plain:.3f}")


if __name__ == "__main__":
    main()
