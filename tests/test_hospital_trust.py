"""What a real hospital keeps for itself: its lifetime privacy budget (over runs, whatever
run id the server uses; never reset by a damaged file), its data commitment (an HMAC
under a secret it may reveal to an auditor), and the refusals its operator is shown.
The nodes here are the real ClientApp on disk data with a site config, answered in
process (tests/inprocess.py)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import tomli_w
from rich.console import Console

from fedmed import config as config_mod
from fedmed.config import unflatten
from fedmed.data.export import export_demo
from fedmed.deployment.site import _show_refusals
from fedmed.errors import FedmedError
from fedmed.federation import client_app as fedmed_client
from fedmed.federation.wire import LEDGER_DIR, NAME_MISMATCH, SITE_CONFIG
from fedmed.ledger.budget import LifetimeBudget, Spend
from fedmed.ledger.chain import LedgerFile
from fedmed.ledger.keys import Signer, default_key_store
from fedmed.run.directory import RunDirectory

from .conftest import TINY, fedmed
from .inprocess import InProcessGrid, run_in_process

EPSILON = 8.0


@pytest.fixture(scope="module")
def images(cache_dir, tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("images")
    export_demo(config_mod.load(None, [*TINY, "data.test_per_hospital=8"], {"data.cache_dir": cache_dir}), root / "images")
    return root / "images"


def _site_config(folder: Path, images: Path, cache_dir: str, **site: object) -> Path:
    settings = {
        "data": {"source": "disk", "path": str(images / "hospital-01"), "image_size": 32, "cache_dir": cache_dir},
        "site": {"name": "hospital-01", "ledger_dir": str(folder / "ledgers"), **site},
    }
    path = folder / "hospital-01.toml"
    path.write_text(tomli_w.dumps(settings))
    return path


def _node_run(tiny_config, site_config: Path, *extra: str) -> Path:
    """One real node (hospital-01, enrolled) against the server, DP-SGD, 2 rounds."""
    cfg = tiny_config("data.hospitals=1", "privacy.mode=sample", f"privacy.epsilon={EPSILON}", "federation.fraction_evaluate=0.0", *extra)
    own = config_mod.load(site_config)
    grid = InProcessGrid(fedmed_client.app, 1, cfg.flat(), {SITE_CONFIG: str(site_config), LEDGER_DIR: own.site.ledger_dir})
    grid.contexts[1001].node_config.pop("partition-id")  # a real node has no partition
    return run_in_process(cfg, grid=grid, nodes={1001: "hospital-01"})


def _cap_after(rounds: int) -> float:
    from fedmed.privacy.accounting import epsilon_of
    from fedmed.privacy.dpsgd import plan

    p = plan(config_mod.load(None, [*TINY, "privacy.mode=sample", f"privacy.epsilon={EPSILON}"]), 24)
    return sum(epsilon_of(p.accountant, ((p.sigma, p.rate, p.steps_per_round * k),), p.delta) for k in (rounds, rounds + 1)) / 2


def test_the_lifetime_cap_counts_every_run_on_the_same_data(tiny_config, images, cache_dir, tmp_path):
    site = _site_config(tmp_path, images, cache_dir, max_epsilon=_cap_after(3))
    runs = [_node_run(tiny_config, site, "output.name=first"), _node_run(tiny_config, site, "output.name=second")]
    declined = [
        [d["reason"] for d in r["payload"]["declined"]]
        for run in runs
        for r in LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records
        if r["event"] == "train-round"
    ]
    assert declined[:3] == [[], [], []] and len(declined) == 4  # the second run's round 1 is its third round
    assert [reason.split(":")[0] for reason in declined[3]] == ["lifetime privacy budget"]
    report = fedmed("site", "budget", "--config", site)
    assert report.returncode == 0, report.stderr
    run_ids = {p.parent.name for p in (tmp_path / "ledgers").glob("*/hospital-01.jsonl")}
    assert len(run_ids) == 2 and all(run_id in report.stdout for run_id in run_ids)
    assert "(its data now)" in report.stdout


def _edit(path: Path) -> None:
    path.write_text(path.read_text().replace('"steps":3', '"steps":1'))


def _cut(path: Path) -> None:
    path.write_text("".join(path.read_text().splitlines(keepends=True)[:-1]))  # whole records: the chain still verifies


@pytest.mark.parametrize("damage", [_edit, _cut, Path.unlink], ids=["edited", "cut short", "deleted"])
def test_a_damaged_lifetime_budget_is_reported_and_training_declined_not_reset(tiny_config, images, cache_dir, tmp_path, capsys, damage):
    site = _site_config(tmp_path, images, cache_dir, max_epsilon=100.0)
    _node_run(tiny_config, site, "output.name=first")
    budget = next((tmp_path / "ledgers" / "budget").glob("*.jsonl"))
    damage(budget)
    kept = budget.read_bytes() if budget.exists() else None
    capsys.readouterr()
    run = _node_run(tiny_config, site, "federation.rounds=1", "output.name=second")
    record = next(r for r in LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records if r["event"] == "train-round")
    assert [d["reason"] for d in record["payload"]["declined"]] == ["this hospital's lifetime privacy budget does not verify (the reason is in its own log)"]
    assert str(tmp_path) not in json.dumps(record)  # where it lies stays in the hospital's log
    assert str(budget) in capsys.readouterr().err  # which is this process's
    assert (budget.read_bytes() if budget.exists() else None) == kept  # kept as it was, never reset


def test_a_budget_ledger_for_other_data_is_refused(tmp_path):
    signer = Signer.load_or_create(tmp_path / "keys", "hospital-01")
    LifetimeBudget.open(tmp_path, signer, "a" * 64, 24).spend(Spend("0123456789abcdef", 1, 1.0, 0.3, 3))
    assert LifetimeBudget.open(tmp_path, signer, "a" * 64, 24).history().entries == [(1.0, 0.3, 3)]
    assert LifetimeBudget.open(tmp_path, signer, "b" * 64, 24).history().entries == []  # another dataset, its own budget
    (tmp_path / "budget" / f"hospital-01-{'c' * 16}.jsonl").write_bytes((tmp_path / "budget" / f"hospital-01-{'a' * 16}.jsonl").read_bytes())
    with pytest.raises(FedmedError, match="belongs to another dataset"):
        LifetimeBudget.open(tmp_path, signer, "c" * 64, 24)


def test_the_lifetime_sum_is_taken_at_the_datasets_delta_whatever_delta_a_run_asks_for(tiny_config, images, cache_dir, tmp_path):
    from fedmed.privacy.accounting import epsilon_of
    from fedmed.privacy.dpsgd import plan

    cap = _cap_after(3)
    site = _site_config(tmp_path, images, cache_dir, max_epsilon=cap)
    _node_run(tiny_config, site, "output.name=first")  # two rounds
    loose = ["privacy.delta=0.01"]
    run = _node_run(tiny_config, site, "output.name=second", *loose)
    declined = [r["payload"]["declined"] for r in LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/server.jsonl"))).records if r["event"] == "train-round"]
    assert len(declined[0]) == 1 and "at delta 1.0e-05" in declined[0][0]["reason"]
    # Summed at the run's own delta, that round would have fitted under the cap.
    first, second = (plan(config_mod.load(None, [*TINY, "privacy.mode=sample", f"privacy.epsilon={EPSILON}", *extra]), 24) for extra in ([], loose))
    entries = ((first.sigma, first.rate, 2 * first.steps_per_round), (second.sigma, second.rate, second.steps_per_round))
    assert epsilon_of("prv", entries, 0.01) < cap


def test_the_audit_confirms_a_data_commitment_with_the_revealed_secret_and_nothing_without(tiny_config, tmp_path):
    cfg = tiny_config("federation.rounds=1")
    run = run_in_process(cfg)
    settings = tmp_path / "simulation.toml"
    settings.write_text(tomli_w.dumps(unflatten(cfg.flat())))
    keys = default_key_store()  # a simulated hospital's secret: in the user's key store, not the run
    audit = fedmed("audit", run, "--data-secret", keys / "hospital-02.data-secret", "--data", settings, "--out", tmp_path / "a")
    assert audit.returncode == 0, audit.stdout
    assert any("hospital-02's data commitment matches its data" in note for note in json.loads((tmp_path / "a" / "audit.json").read_text())["notes"])
    wrong = tmp_path / "hospital-02.data-secret"
    wrong.write_bytes((keys / "hospital-01.data-secret").read_bytes())  # not its secret
    wrong.chmod(0o600)
    audit = fedmed("audit", run, "--data-secret", wrong, "--data", settings, "--out", tmp_path / "b")
    findings = json.loads((tmp_path / "b" / "audit.json").read_text())["checks"]["data"]["findings"]
    assert audit.returncode == 1 and [f["message"].split(" in ")[0] for f in findings] == ["the data commitment does not match hospital-02's data"]


def test_the_node_operator_is_shown_each_kind_of_refusal_once(tmp_path):
    log = tmp_path / "node.log"
    line = f"fedmed: {NAME_MISMATCH}: the server enrolled this node's key as 'hospital-02', but its site config says site.name = 'hospital-01'"
    log.write_text(f"INFO: started\n{line}\n{line}\n{line[:20]}")  # the last line still being written
    console = Console(record=True, width=400)
    shown: set[str] = set()
    offset = _show_refusals(log, 0, shown, console)
    assert console.export_text().count(NAME_MISMATCH) == 1
    assert offset == len(log.read_bytes()) - len(line[:20])


def test_a_clientapp_process_imports_only_what_a_request_needs():
    """Every request starts a fresh ClientApp process: its imports are paid each time."""
    import subprocess
    import sys

    heavy = ["opacus", "scipy", "sklearn", "matplotlib"]
    code = f"import sys, fedmed.federation.client_app; print([m for m in {heavy!r} if m in sys.modules])"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]"


def test_a_real_hospitals_data_and_commitment_do_not_depend_on_the_servers_seed(images, cache_dir, tmp_path):
    """Images in class folders only (no Training/Testing): the hospital splits them itself."""
    import shutil

    from fedmed.federation.client_app import hospital_data
    from fedmed.ledger.digests import data_commitment

    flat = tmp_path / "flat"
    for split in ("Training", "Testing"):
        for folder in (images / "hospital-01" / split).iterdir():
            (flat / folder.name).mkdir(parents=True, exist_ok=True)
            for image in folder.iterdir():
                shutil.copy(image, flat / folder.name / f"{split}-{image.name}")
    own = config_mod.load(_site_config(tmp_path, images, cache_dir), [f"data.path='{flat}'"])
    commitments = set()
    for seed in (0, 1, 2):
        site, _ = hospital_data(config_mod.load(None, [*TINY, f"seed={seed}"], {"data.cache_dir": cache_dir}), own, 0)
        commitments.add(data_commitment(b"k" * 32, site.train.x, site.train.y, site.test.x, site.test.y))
    assert len(commitments) == 1
