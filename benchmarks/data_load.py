"""Dataset loading: the first load of a Kaggle-sized image folder against the cached load.

Writes a seeded, Kaggle-shaped brain-MRI image folder (ROOT/{Training,Testing}/
{glioma,meningioma,notumor,pituitary}/*.jpg: 5712 + 1311 JPEGs of mixed sizes,
about 10% RGB, the rest grayscale), then times `load_dataset` on it in fresh
processes: once with an empty cache (every image decoded) and three times from
that cache (median reported). Only the call itself is timed, not Python start-up
or imports; each timed call also reads every 97th image of the memmap, so the
cached figure touches the pixels. The JPEGs were just written, so the first load
reads them from the OS page cache: it measures decoding, not the disk. Passes when
the first load takes at least 10 times as long as the cached one.

    .venv/bin/python benchmarks/data_load.py [--images N] [--size S] [--workers W] [--seed N] [--dir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

ROOT = Path(__file__).resolve().parents[1]
# The Kaggle brain tumour MRI set (Nickparvar): images per split and class folder.
KAGGLE = {
    "Training": {"glioma": 1321, "meningioma": 1339, "notumor": 1595, "pituitary": 1457},
    "Testing": {"glioma": 300, "meningioma": 306, "notumor": 405, "pituitary": 300},
}
PREFIX = {"Training": "Tr", "Testing": "Te"}
RGB_SHARE = 0.10
CACHED_REPEATS = 3
TARGET = 10.0
NOISE_SIDE = 1024  # a worker's noise tile; each image takes a crop at its own offset

# Runs in a fresh interpreter: argv[1] is the dataset, argv[2] the cache, argv[3] a JSON of overrides.
LOAD_CODE = """
import json, sys, time
from fedmed import config as config_mod
from fedmed.data.dataset import load_dataset
overrides = {"data.source": "disk", "data.path": sys.argv[1], "data.cache_dir": sys.argv[2], **json.loads(sys.argv[3])}
cfg = config_mod.load(None, [], overrides)
start = time.perf_counter()
ds = load_dataset(cfg.data)
checksum = int(ds.images[::97].sum())
seconds = time.perf_counter() - start
print("RESULT " + json.dumps({"seconds": seconds, "images": len(ds), "checksum": checksum,
      "distinct": len(set(ds.hashes.tolist())), "skipped": len(ds.skipped)}))
"""

_noise: np.ndarray | None = None


def plan(total: int) -> list[tuple[str, str, int]]:
    """(split, class folder, count) for `total` images in the Kaggle proportions."""
    kaggle_total = sum(n for split in KAGGLE.values() for n in split.values())
    cells = [(split, name, n) for split, classes in KAGGLE.items() for name, n in classes.items()]
    exact = [n * total / kaggle_total for _, _, n in cells]
    counts = [int(x) for x in exact]
    # Largest remainders get the images left over, so the counts add up to `total`.
    for i in sorted(range(len(cells)), key=lambda i: exact[i] - counts[i], reverse=True)[: total - sum(counts)]:
        counts[i] += 1
    return [(split, name, n) for (split, name, _), n in zip(cells, counts, strict=True)]


def _init_worker(seed: int) -> None:
    global _noise
    rng = np.random.default_rng([seed, 2**31])
    _noise = np.rint(rng.normal(0.0, 7.0, (NOISE_SIDE, NOISE_SIDE))).astype(np.int16)


def _ellipse(draw: ImageDraw.ImageDraw, cx: float, cy: float, rx: float, ry: float, fill: int) -> None:
    draw.ellipse((cx - rx, cy - ry, cx + rx, cy + ry), fill=fill)


def write_image(task: tuple[str, str, int, bool, int]) -> int:
    """Draw one MRI-like slice (skull ring, brain, a few structures, a lesion unless
    `notumor`, blur and noise) and save it as a JPEG; returns the bytes written."""
    path, cls, index, rgb, seed = task
    rng = np.random.default_rng([seed, index])
    if rng.random() < 0.75:
        w = h = int(rng.integers(200, 513))
    else:
        w, h = (int(s) for s in rng.integers(200, 513, 2))
    img = Image.new("L", (w, h), 0)
    draw = ImageDraw.Draw(img)
    cx, cy = w * rng.uniform(0.45, 0.55), h * rng.uniform(0.45, 0.55)
    rx, ry = w * rng.uniform(0.34, 0.45), h * rng.uniform(0.36, 0.46)
    _ellipse(draw, cx, cy, rx, ry, int(rng.integers(150, 230)))  # skull
    skull = rng.uniform(0.05, 0.09)
    rx, ry = rx * (1 - skull), ry * (1 - skull)
    _ellipse(draw, cx, cy, rx, ry, int(rng.integers(60, 110)))  # brain
    for _ in range(int(rng.integers(2, 6))):  # ventricles, grey matter and the like
        ox, oy = rng.uniform(-0.5, 0.5, 2)
        _ellipse(draw, cx + ox * rx, cy + oy * ry, rx * rng.uniform(0.05, 0.25), ry * rng.uniform(0.05, 0.25),
                 int(rng.integers(30, 170)))
    if cls != "notumor":
        if cls == "pituitary":  # low and central
            ox, oy = rng.uniform(-0.1, 0.1), rng.uniform(0.2, 0.4)
        elif cls == "meningioma":  # against the skull
            angle = rng.uniform(0, 2 * np.pi)
            ox, oy = 0.75 * np.cos(angle), 0.75 * np.sin(angle)
        else:  # glioma: anywhere in the brain
            ox, oy = rng.uniform(-0.55, 0.55, 2)
        size = rng.uniform(0.06, 0.2)
        _ellipse(draw, cx + ox * rx, cy + oy * ry, rx * size, ry * size * rng.uniform(0.7, 1.3), int(rng.integers(170, 250)))
    img = img.filter(ImageFilter.BoxBlur(int(rng.integers(1, 3))))
    assert _noise is not None
    x0, y0 = (int(v) for v in rng.integers(0, NOISE_SIDE - 512, 2))
    pixels = np.asarray(img, dtype=np.int16) + _noise[y0 : y0 + h, x0 : x0 + w]
    img = Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8))
    if rgb:
        img = img.convert("RGB")
    img.save(path, "JPEG", quality=int(rng.integers(80, 95)))
    return os.path.getsize(path)


def generate(root: Path, total: int, seed: int) -> tuple[int, int]:
    """Write the dataset under root; returns (files, bytes)."""
    rng = np.random.default_rng(seed)
    rgb = set(rng.choice(total, round(total * RGB_SHARE), replace=False).tolist())
    tasks, index = [], 0
    for split, cls, n in plan(total):
        folder = root / split / cls
        folder.mkdir(parents=True, exist_ok=True)
        for k in range(n):
            tasks.append((str(folder / f"{PREFIX[split]}-{cls[:2]}_{k + 1:04d}.jpg"), cls, index, index in rgb, seed))
            index += 1
    with ProcessPoolExecutor(os.cpu_count() or 1, initializer=_init_worker, initargs=(seed,)) as pool:
        written = sum(pool.map(write_image, tasks, chunksize=64))
    return len(tasks), written


def load(root: Path, cache: Path, overrides: dict) -> dict:
    """Time `load_dataset` in a fresh interpreter; the result line it prints."""
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
    proc = subprocess.run([sys.executable, "-c", LOAD_CODE, str(root), str(cache), json.dumps(overrides)],
                          capture_output=True, text=True, env=env, cwd=ROOT)
    lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
    if proc.returncode != 0 or not lines:
        sys.exit(f"load_dataset failed (exit {proc.returncode}):\n{proc.stdout}{proc.stderr}")
    return json.loads(lines[-1].removeprefix("RESULT "))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--images", type=int, default=sum(n for s in KAGGLE.values() for n in s.values()),
                        help="images in all (train and test, 81/19 as in the Kaggle set)")
    parser.add_argument("--size", type=int, default=64, help="data.image_size")
    parser.add_argument("--workers", type=int, default=0, help="data.workers (0: one per CPU core)")
    parser.add_argument("--seed", type=int, default=0, help="seed for the generated images")
    parser.add_argument("--dir", type=Path, help="work here (kept) instead of in a temporary folder")
    parser.add_argument("--keep", action="store_true", help="keep the temporary folder (the dataset and caches)")
    args = parser.parse_args()
    if args.images < 8:
        parser.error("--images must be 8 or more")

    work = args.dir.resolve() if args.dir else Path(tempfile.mkdtemp(prefix="fedmed-load-bench-"))
    work.mkdir(parents=True, exist_ok=True)
    data_root = work / "data"
    try:
        if data_root.exists():
            shutil.rmtree(data_root)
        start = time.perf_counter()
        files, written = generate(data_root, args.images, args.seed)
        gen_s = time.perf_counter() - start
        print(f"wrote {files} JPEGs ({written / 2**20:.0f} MiB) in {gen_s:.1f} s under {data_root}")

        cache = Path(tempfile.mkdtemp(prefix="cache-", dir=work))  # fresh and empty: the first load decodes
        overrides = {"data.image_size": args.size, "data.workers": args.workers}
        first = load(data_root, cache, overrides)
        cached = [load(data_root, cache, overrides) for _ in range(CACHED_REPEATS)]
    finally:
        if not args.dir and not args.keep:
            shutil.rmtree(work, ignore_errors=True)
        elif args.keep or args.dir:
            print(f"kept {work}")

    if any(c["checksum"] != first["checksum"] or c["images"] != first["images"] for c in cached):
        sys.exit("the cached load returned other images than the first load")
    cached_s = statistics.median(c["seconds"] for c in cached)
    ratio = first["seconds"] / cached_s
    n = first["images"]

    from rich.console import Console
    from rich.table import Table

    table = Table(title=f"load_dataset, image_size {args.size}, workers {args.workers or os.cpu_count()}")
    table.add_column("")
    table.add_column("seconds", justify="right")
    table.add_column("images/s", justify="right")
    table.add_row("first load (decode)", f"{first['seconds']:.3f}", f"{n / first['seconds']:,.0f}")
    table.add_row(f"cached (median of {CACHED_REPEATS})", f"{cached_s:.4f}", f"{n / cached_s:,.0f}")
    console = Console()
    console.print(f"files: {files}, images decoded: {n}, distinct: {first['distinct']}, skipped: {first['skipped']}")
    console.print(table)
    runs = ", ".join(f"{c['seconds']:.4f}" for c in cached)
    console.print(f"cached runs: {runs} s "
                  f"(each includes reading every 97th image, checksum {first['checksum']})")
    verdict = "PASS" if ratio >= TARGET else "FAIL"
    console.print(f"first / cached: {ratio:.1f}x (target >= {TARGET:.0f}x) {verdict}")
    if verdict == "FAIL":
        sys.exit(1)


if __name__ == "__main__":
    main()
