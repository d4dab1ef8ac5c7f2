"""Each family of algorithms in a whole federation, in this process (tests/inprocess.py):
SCAFFOLD, a robust rule under attack, personalisation (Ditto, FedPer, fine-tuning). The
audit replays every round's aggregation from the saved updates: it passes on each run
and fails once a stored update, or the server state saved with it, is changed."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch

from fedmed.audit.report import audit
from fedmed.ledger.chain import LedgerFile
from fedmed.run.directory import RunDirectory

from .inprocess import run_in_process, run_until_crash_before_checkpoint

SGD = ("train.optimizer=sgd", "train.lr=0.05", "train.momentum=0")


def _copy_with(run: Path, tmp_path: Path, edit) -> Path:
    """A copy of the run with round 1's saved updates edited by `edit(arrays)`."""
    copy = tmp_path / "edited"
    shutil.copytree(run, copy)
    path = RunDirectory(copy).updates_of(1)
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    edit(arrays)
    np.savez(path, **arrays)
    return copy


def _audit(run: Path) -> tuple[int, str]:
    code = audit([run], out_dir=run / "audit")
    return code, (run / "audit" / "audit.json").read_text()


@pytest.fixture(scope="module")
def scaffold_run(cache_dir, tmp_path_factory) -> Path:
    from fedmed import config as config_mod

    from .conftest import TINY

    values = {"data.cache_dir": cache_dir, "output.dir": str(tmp_path_factory.mktemp("scaffold"))}
    return run_in_process(config_mod.load(None, [*TINY, "federation.strategy=scaffold", "federation.fraction_train=0.67", *SGD], values))


def test_scaffold_hospitals_keep_their_control_variates_and_the_audit_replays_the_server_step(scaffold_run):
    files = list((scaffold_run / RunDirectory.LEDGERS).glob("*/*.scaffold.pt"))
    kept = sorted(p.name for p in files)
    trained = sorted({h for r in RunDirectory(scaffold_run).rounds() for h, phases in r["hospitals"].items() if "train" in phases})
    assert kept == [f"{h}.scaffold.pt" for h in trained]
    variate = torch.load(files[0])["after"]  # with the one before the hospital's last round, for a round done again
    assert any(v.abs().sum() > 0 for v in variate.values())
    with np.load(RunDirectory(scaffold_run).updates_of(2)) as saved:
        assert any(name.startswith("@state/control/") for name in saved.files)  # the server's c before round 2's step
    code, report = _audit(scaffold_run)
    assert code == 0, report


def test_the_audit_fails_a_scaffold_run_whose_saved_control_changes_were_edited(scaffold_run, tmp_path):
    def edit(arrays):
        name = next(n for n in arrays if n.startswith("@control/"))
        arrays[name] = arrays[name] + 1.0

    code, report = _audit(_copy_with(scaffold_run, tmp_path, edit))
    assert code != 0 and "control variate change" in report


def test_the_audit_fails_a_run_whose_saved_server_state_was_edited(scaffold_run, tmp_path):
    copy = tmp_path / "state"
    shutil.copytree(scaffold_run, copy)
    path = RunDirectory(copy).updates_of(2)
    with np.load(path) as saved:
        arrays = {name: saved[name] for name in saved.files}
    name = next(n for n in arrays if n.startswith("@state/"))
    arrays[name] = arrays[name] * 2
    np.savez(path, **arrays)
    code, report = _audit(copy)
    assert code != 0 and "saved server state before this round's step is not the one the ledger recorded" in report


def test_a_median_under_a_sign_flip_attack_is_recorded_and_audited(tiny_config, tmp_path):
    run = run_in_process(tiny_config("federation.strategy=median", "attack.kind=sign_flip", 'attack.hospitals="hospital-02"'))
    summary = json.loads((run / RunDirectory.SUMMARY).read_text())
    assert summary["attack"] == {"kind": "sign_flip", "hospitals": ["hospital-02"]}
    assert (run / "config.toml").read_text().count("sign_flip") == 1  # in the run's config
    ledger = next((run / "ledgers").glob("*/hospital-02.jsonl")).read_text()
    assert '"attack":"sign_flip"' in ledger.replace(" ", "")
    code, report = _audit(run)
    assert code == 0, report

    def edit(arrays):
        name = next(n for n in arrays if n.startswith("hospital-01/"))
        arrays[name] = arrays[name] + 0.5

    code, report = _audit(_copy_with(run, tmp_path, edit))
    assert code != 0 and "saved update of hospital-01" in report


def test_multi_krum_records_the_updates_it_keeps(tiny_config):
    run = run_in_process(tiny_config("data.hospitals=5", "federation.strategy=multikrum", "federation.byzantine=1", "attack.kind=scale", "attack.factor=50", 'attack.hospitals="hospital-04"'))
    records = RunDirectory(run).rounds()
    assert all(len(r["selected"]) == 4 and "hospital-04" not in r["selected"] for r in records)  # the scaled update is left out
    code, report = _audit(run)
    assert code == 0, report


def test_ditto_reports_personal_next_to_global_accuracy_per_hospital(tiny_config):
    run = run_in_process(tiny_config("personal.method=ditto", "personal.ditto_lambda=0.1"))
    last = RunDirectory(run).rounds()[-1]
    assert all({"accuracy", "personal_accuracy"} <= set(phases["eval"]) for phases in last["hospitals"].values())
    summary = json.loads((run / RunDirectory.SUMMARY).read_text())
    assert all("personal_accuracy" in h for h in summary["per_hospital"].values())
    assert summary["personal"]["method"] == "ditto" and summary["personal"]["hospitals"] == 3
    code, report = _audit(run)
    assert code == 0, report


def test_fedper_keeps_the_head_at_each_hospital(tiny_config):
    run = run_in_process(tiny_config("personal.method=fedper"))
    with np.load(RunDirectory(run).updates_of(1)) as saved:
        assert not any(name.endswith("head.2.weight") and not name.startswith("sent/") for name in saved.files)
    model = torch.load(run / RunDirectory.MODEL)
    from fedmed.config import load
    from fedmed.models import build_model

    initial = build_model(load(run / RunDirectory.CONFIG).model, 4, seed=0).state_dict()
    assert torch.equal(model["head.2.weight"], initial["head.2.weight"])  # the global head never moves
    assert len(list((run / "ledgers").glob("*/*.fedper.pt"))) == 3
    code, report = _audit(run)
    assert code == 0, report


def test_fine_tuning_reports_personal_figures_after_the_last_round_only(tiny_config):
    run = run_in_process(tiny_config("personal.method=finetune", "personal.epochs=1", "federation.rounds=2"))
    first, last = RunDirectory(run).rounds()
    assert all("personal_accuracy" not in phases.get("eval", {}) for phases in first["hospitals"].values())
    assert all("personal_accuracy" in phases["eval"] for phases in last["hospitals"].values())


@pytest.mark.parametrize("settings", [("federation.strategy=scaffold", *SGD), ("personal.method=ditto",)], ids=["scaffold", "ditto"])
def test_a_crashed_and_resumed_run_ends_as_an_uninterrupted_one_hospital_state_included(tiny_config, monkeypatch, settings):
    """The server crashes after round 2's requests were answered but before its checkpoint:
    round 2 is done again, and each hospital starts it from the state it had before it
    (its SCAFFOLD variate, its Ditto model), not from the one round 2 left."""
    from fedmed.federation import simulation

    whole = run_in_process(tiny_config("federation.rounds=3", "output.name=whole", *settings))
    cfg = simulation.prepare(tiny_config("federation.rounds=3", "output.name=crashed", *settings))
    crashed = run_until_crash_before_checkpoint(cfg, 2, monkeypatch)
    run_in_process(cfg, resume=crashed)
    a, b = torch.load(whole / RunDirectory.MODEL), torch.load(crashed / RunDirectory.MODEL)
    assert all(torch.equal(a[k], b[k]) for k in a)
    what = "scaffold" if "federation.strategy=scaffold" in settings else "ditto"
    for mine in (whole / RunDirectory.LEDGERS).glob(f"*/*.{what}.pt"):
        theirs = next((crashed / RunDirectory.LEDGERS).glob(f"*/{mine.name}"))
        x, y = torch.load(mine)["after"], torch.load(theirs)["after"]
        assert all(torch.equal(x[k], y[k]) for k in x)


@pytest.mark.parametrize(
    "settings",
    [
        ("federation.strategy=fedadam", "federation.rounds=3"),
        ("federation.strategy=fedyogi", "federation.rounds=3"),
        ("federation.strategy=fedadagrad", "federation.rounds=3"),
        ("federation.strategy=fedavgm", "federation.rounds=3"),
        ("federation.strategy=krum", "data.hospitals=5"),
        ("federation.strategy=bulyan", "data.hospitals=7"),
        ("federation.strategy=fedprox",),
    ],
    ids=lambda s: s[0].split("=")[1],
)
def test_every_rule_recomputes_in_the_audit(tiny_config, settings):
    """Server optimisers from the moments saved before each step, selections, means."""
    code, report = _audit(run_in_process(tiny_config(*settings)))
    assert code == 0, report


def test_the_hospitals_train_each_round_at_the_schedules_learning_rate(tiny_config):
    run = run_in_process(tiny_config("train.lr=0.01", "train.schedule=step", "train.step_rounds=1", "train.step_gamma=0.5", "federation.rounds=3"))
    ledger = LedgerFile.read(next((run / RunDirectory.LEDGERS).glob("*/hospital-01.jsonl")))
    lrs = [r["payload"]["settings"]["lr"] for r in ledger.records if r["event"] == "train"]
    assert lrs == pytest.approx([0.01, 0.005, 0.0025])
