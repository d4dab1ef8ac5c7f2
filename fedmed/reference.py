"""The documents generated from the config schema, so they never drift from it: the
config reference (`docs/config.md`) and the Flower app's run config (the
`[tool.flwr.app.config]` table of `pyproject.toml`, which Flower 1.41 needs whole:
`flwr run --run-config` refuses a key the table lacks). `make reference` rewrites both;
a test fails when either is stale."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from fedmed.config import FedmedConfig, reference

FLOWER_TABLE = "[tool.flwr.app.config]"
INTRO = """# Config reference

A config is a TOML file with the sections below; every key is optional, so an empty
file is the quickstart. Any key can be overridden on the command line with
`--set section.key=value` (the value is read as TOML: `--set train.lr=0.003`,
`--set model.name=resnet18`). Unknown keys, wrong types and impossible values stop the
run before anything is written, with one line naming the key. List-valued settings
(`data.classes`, `data.class_map`, `labels.annotated`, `privacy.budgets`, `site.models`)
are written comma-separated, or as TOML arrays.

The simulation, a hospital's node (`sites/*.toml`) and the server
(`server/federation.toml`) all read this one schema; `[site]` and `[server]` matter only
to `fedmed site start` and `fedmed server start`.

This page is generated from `fedmed/config.py` (`make reference`).

| key | default | meaning |
| --- | --- | --- |
"""
OUTRO = """
Why the small batch: FedAvg's progress per round is set by how many steps each
hospital takes, and the GroupNorm CNN does not care about batch size, so small batches
give 150 steps per round from 600 images at little cost on a CPU.
"""


def config_markdown() -> str:
    rows = "".join(f"| `{key}` | `{default}` | {meaning} |\n" for key, default, meaning in reference())
    return INTRO + rows + OUTRO


def flower_table() -> str:
    """Every setting with its default, flat, as the app's run config."""
    lines = [f"{json.dumps(key) if '.' in key else key} = {_toml(value)}" for key, value in FedmedConfig().flat().items()]
    return FLOWER_TABLE + "\n" + "\n".join(lines) + "\n"


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    return json.dumps(value)


def with_flower_table(pyproject: str) -> str:
    """`pyproject` with its run config table replaced by the generated one (the table
    runs to the next table or the end of the file)."""
    start = pyproject.index(FLOWER_TABLE)
    end = pyproject.find("\n[", start + len(FLOWER_TABLE))
    tail = pyproject[end + 1 :] if end != -1 else ""
    return pyproject[:start] + flower_table() + ("\n" + tail if tail else "")


def sync(root: Path) -> list[Path]:
    """Rewrite both documents under the repository `root`; returns those that changed."""
    changed = []
    for path, text in ((root / "docs" / "config.md", config_markdown()), (root / "pyproject.toml", None)):
        current = path.read_text(encoding="utf-8") if path.exists() else ""
        new = text if text is not None else with_flower_table(current)
        if new != current:
            path.write_text(new, encoding="utf-8")
            changed.append(path)
    return changed


if __name__ == "__main__":
    for path in sync(Path(sys.argv[1] if len(sys.argv) > 1 else ".")):
        print(f"rewrote {path}")
