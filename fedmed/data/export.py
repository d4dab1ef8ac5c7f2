"""`fedmed data make-demo`: the demo hospitals on disk, as a person (or another tool) sees them."""

from __future__ import annotations

import shutil
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

from fedmed.config import FedmedConfig
from fedmed.data import demo
from fedmed.data.phantom import CLASSES
from fedmed.errors import FedmedError, os_error_line

KAGGLE_SPLITS = {"train": "Training", "test": "Testing"}


def export_demo(cfg: FedmedConfig, out_dir: Path) -> Path:
    """Write OUT/<hospital>/{Training,Testing}/<class>/*.png; returns the contact sheet path."""
    out_dir = Path(out_dir)
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FedmedError(f"{out_dir} exists and is not an empty folder: choose a new folder so nothing there is overwritten")
    spec = demo.DemoSpec.from_config(cfg.data, cfg.seed, cfg.skew)
    existed = out_dir.exists()
    trains = []
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
        for h in range(spec.hospitals):
            sets = demo.hospital(spec, cfg.data.cache_dir, h)
            trains.append(sets[0])
            for images, folder in zip(sets, KAGGLE_SPLITS.values(), strict=True):
                for k, name in enumerate(CLASSES):
                    target = out_dir / demo.hospital_name(h) / folder / name
                    target.mkdir(parents=True, exist_ok=True)
                    for i, img in enumerate(images.images[images.labels == k]):
                        Image.fromarray(img).save(target / f"{name}_{i:04d}.png")
        sheet = out_dir / "contact_sheet.png"
        contact_sheet(trains, spec).save(sheet)
    except OSError as exc:  # a full disk: no half export is kept (its last image would be cut short)
        _remove_written(out_dir, existed)
        raise FedmedError(f"cannot write the demo images to {out_dir} (nothing was kept): {os_error_line(exc)}") from None
    return sheet


def _remove_written(out_dir: Path, existed: bool) -> None:
    """What a failed export wrote: the folder it made, or what it put in the empty folder it was given."""
    if not out_dir.is_dir():
        return
    for path in list(out_dir.iterdir()) if existed else [out_dir]:
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)


def contact_sheet(trains: list[demo.ImageSet], spec: demo.DemoSpec, per_cell: int = 3) -> Image.Image:
    """Rows: hospitals (with their scanner; `trains`: their training images); columns:
    classes, `per_cell` examples each."""
    size = spec.image_size
    label_w, header_h = 150, 22
    width = label_w + len(CLASSES) * per_cell * size
    height = header_h + spec.hospitals * size
    sheet = Image.new("L", (width, height), 0)
    draw = ImageDraw.Draw(sheet)
    for k, name in enumerate(CLASSES):
        draw.text((label_w + k * per_cell * size + 4, 4), name, fill=255)
    profiles = spec.profiles()
    for h, train in enumerate(trains):
        profile = profiles[h]
        y0 = header_h + h * size
        draw.text((4, y0 + 4), demo.hospital_name(h), fill=255)
        draw.text((4, y0 + 18), f"{profile.field_strength} noise {profile.noise:.2f}", fill=200)
        draw.text((4, y0 + 32), f"bias {profile.bias:.2f} blur {profile.blur:.1f}", fill=200)
        for k in range(len(CLASSES)):
            examples = train.images[train.labels == k][:per_cell]
            for j, img in enumerate(examples):
                sheet.paste(Image.fromarray(np.asarray(img)), (label_w + (k * per_cell + j) * size, y0))
    return sheet
