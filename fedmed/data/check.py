"""`fedmed data check`: what a dataset holds and whether fedmed can train on it.

This report is for the person at the data's own machine, so it may name the files
it skipped. Nothing here is written anywhere or sent off-site.
"""

from __future__ import annotations

import numpy as np
from rich.console import Console
from rich.table import Table

from fedmed.config import DataConfig, SkewConfig
from fedmed.data.dataset import Dataset, load_dataset, resolve_root, usable
from fedmed.data.demo import hospital_name
from fedmed.data.partition import TEST, TRAIN, Assignment, assign, split_by_patient

SHOW_SKIPPED = 30


def check(data: DataConfig, skew: SkewConfig, seed: int, console: Console) -> None:
    """Print the report; raises FedmedError (after printing what it can) if unusable."""
    root = resolve_root(data)
    dataset = load_dataset(data, announce=lambda line: console.print(f"[dim]{line}[/dim]"))
    _overview(console, root, dataset)
    if len(dataset):
        _sources(console, dataset)
        split, _, duplicates = split_by_patient(dataset, data, seed)
        _counts(console, dataset, data, split)
        _patients(console, dataset, duplicates)
    _skipped(console, dataset)
    warnings = usable(dataset, data)  # raises with the reason when unusable
    parts = assign(dataset, data, skew, seed)  # raises if the hospitals cannot all get data
    _hospitals(console, dataset, data, parts)
    for line in warnings:
        console.print(f"[yellow]warning:[/yellow] {line}")
    console.print(
        f"[green]usable:[/green] {len(dataset)} images of {data.num_classes} classes, "
        f"for {data.hospitals} hospital(s) (data.partition = {data.partition})"
    )


def _overview(console: Console, root, dataset: Dataset) -> None:
    m = dataset.manifest
    console.print(
        f"dataset {root}\nformat {m['format']} · {m['files']} files · {len(dataset)} images "
        f"{dataset.images.shape[1]}x{dataset.images.shape[2]} · {sum(dataset.skip_counts().values())} files skipped · "
        f"cache key {m['digest']}"
    )


def _sources(console: Console, dataset: Dataset) -> None:
    m = dataset.manifest
    sizes, modes, (low, high) = m["source_sizes"], m["source_modes"], m["source_range"]
    table = Table(title="source images", show_header=False)
    table.add_row("sizes", f"{sizes['smallest'][0]}x{sizes['smallest'][1]} to {sizes['largest'][0]}x{sizes['largest'][1]} ({sizes['distinct']} distinct)")
    table.add_row("modes", ", ".join(f"{mode or '?'}: {n}" for mode, n in sorted(modes.items())))
    table.add_row("intensity range", f"{low:g} to {high:g}")
    images = np.asarray(dataset.images[: min(len(dataset), 2000)])
    table.add_row("stored (uint8)", f"mean {images.mean():.1f}, {100 * (images.reshape(len(images), -1).max(1) == 0).mean():.1f}% blank")
    console.print(table)


def _counts(console: Console, dataset: Dataset, data: DataConfig, split: np.ndarray) -> None:
    names = data.classes
    given = (dataset.split >= 0).any()
    table = Table(title="images per class" + ("" if given else f" (no Training/Testing folders: {data.test_fraction:.0%} of each class drawn for test, by patient)"))
    for column in ("class", "train", "test", "total"):
        table.add_column(column, justify="left" if column == "class" else "right")
    totals = np.bincount(dataset.labels, minlength=len(names))
    for k, name in enumerate(names):
        train = int(((dataset.labels == k) & (split == TRAIN)).sum())
        test = int(((dataset.labels == k) & (split == TEST)).sum())
        table.add_row(name, str(train), str(test), str(int(totals[k])))
    present = totals[totals > 0]
    table.add_row("[bold]all[/bold]", str(int((split == TRAIN).sum())), str(int((split == TEST).sum())), str(len(dataset)))
    console.print(table)
    ratio = present.max() / present.min()
    console.print(f"class imbalance: largest/smallest class = {ratio:.2f}" + ("  [yellow](imbalanced)[/yellow]" if ratio > 3 else ""))


def _hospitals(console: Console, dataset: Dataset, data: DataConfig, parts: Assignment) -> None:
    table = Table(title=f"split across {data.hospitals} hospital(s), by patient (data.partition = {data.partition})")
    for column in ("hospital", "folder", "train", "test"):
        table.add_column(column, justify="right" if column in ("train", "test") else "left")
    folders = dataset.manifest.get("sites", []) if data.partition == "folders" else []
    for h in range(data.hospitals):
        table.add_row(
            hospital_name(h), folders[h] if folders else "-", str(len(parts.indices(TRAIN, h))), str(len(parts.indices(TEST, h)))
        )
    console.print(table)


def _patients(console: Console, dataset: Dataset, duplicates: dict) -> None:
    console.print(f"patients (volumes, series, patient folders or single images): {len(np.unique(dataset.patient))}")
    console.print(
        f"exact duplicates: {duplicates['train_test']} test images copy a training image"
        + (f" ({duplicates['left_out']} left out: data.dedupe)" if duplicates["left_out"] else "")
        + f"; {duplicates['within_train']} repeats within train, {duplicates['within_test']} within test"
    )


def _skipped(console: Console, dataset: Dataset) -> None:
    skipped = dataset.skipped
    if not skipped:
        return
    table = Table(title="skipped files (shown here only: never logged or sent)")
    table.add_column("file")
    table.add_column("reason")
    for rel, reason in skipped[:SHOW_SKIPPED]:
        table.add_row(rel, reason)
    console.print(table)
    if len(skipped) > SHOW_SKIPPED:
        console.print(f"... and {len(skipped) - SHOW_SKIPPED} more")
    counts = ", ".join(f"{reason}: {n}" for reason, n in dataset.skip_counts().most_common())
    console.print(f"skipped: {counts}")
