"""The two references every study needs, trained with the same model and budget.

pooled: all hospitals' training data in one place; each "round" is
`train.local_epochs` passes over it, so it takes the same number of
sample-gradient steps as federated training with every hospital taking part.
local: each hospital alone for the same number of rounds, judged on the global
test set.
"""

from __future__ import annotations

import time

import numpy as np
import torch
from rich.console import Console

from fedmed.config import FedmedConfig
from fedmed.data.sites import SiteData, Split, describe, ensure_data, global_test, site_data
from fedmed.models import build_model
from fedmed.run import heterogeneity, interrupt
from fedmed.run.directory import RunDirectory, resolve_run_name
from fedmed.run.progress import RoundReporter, print_classes
from fedmed.run.record import round_record, summary
from fedmed.run.tensorboard import Scalars
from fedmed.seeds import derive_seed
from fedmed.training.loop import evaluate, predict, resolve_device, train
from fedmed.training.metrics import from_confusion
from fedmed.training.partial import known_labels


def _train_view(stats) -> dict:
    return {"loss": stats.loss, "accuracy": stats.accuracy, "steps": stats.steps, "sample_gradients": stats.examples}


def _eval_view(metrics: dict) -> dict:
    return {k: metrics[k] for k in ("loss", "accuracy", "macro_f1", "confusion", "examples")}


def pool(splits: list[Split]) -> Split:
    """All hospitals' training data in one place, partial labels included."""
    x, y = torch.cat([s.x for s in splits]), torch.cat([s.y for s in splits])
    if all(s.possible is None for s in splits):
        return Split(x, y)
    classes = next(s.possible.shape[1] for s in splits if s.possible is not None)

    def known(s: Split) -> tuple[torch.Tensor, torch.Tensor]:
        if s.possible is not None:
            return s.possible, s.annotated
        one_hot = torch.nn.functional.one_hot(s.y, classes).bool()
        return one_hot, torch.ones_like(one_hot)

    parts = [known(s) for s in splits]
    return Split(x, y, torch.cat([p for p, _ in parts]), torch.cat([a for _, a in parts]))


def run_pooled(cfg: FedmedConfig, out: RunDirectory, sites: list[SiteData], test: Split) -> dict:
    pooled = pool([s.train for s in sites])
    x, y = pooled.x, pooled.y
    model = build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed)
    reporter = RoundReporter(cfg.federation.rounds, f"fedmed: pooled baseline, {len(y)} images -> {out.path}")
    metrics: dict = {}
    for rnd in range(1, cfg.federation.rounds + 1):
        possible, annotated, _ = known_labels(cfg, model, pooled)
        stats = train(model, x, y, cfg.train, seed=derive_seed(cfg.seed, rnd, 10_000), possible=possible, annotated=annotated)
        metrics = evaluate(model, test.x, test.y, cfg.train.device)
        hospitals = {s.name: {"eval": _eval_view(evaluate(model, s.test.x, s.test.y, cfg.train.device))} for s in sites}
        took, elapsed = reporter.round_done(rnd, metrics)
        out.append_round(round_record(rnd, took, elapsed, metrics, hospitals, train=_train_view(stats)))
    if cfg.output.save_model:
        out.save_model(model.state_dict())
    out.save_scores(predict(model, test.x, cfg.train.device), test.y.numpy())
    per_hospital = {name: {"accuracy": h["eval"]["accuracy"], "macro_f1": h["eval"]["macro_f1"]} for name, h in hospitals.items()}
    held = pool([s.val for s in sites if s.val is not None]) if any(s.val is not None for s in sites) else None
    validation = _figures(evaluate(model, held.x, held.y, cfg.train.device)) if held is not None else None
    return {"test": metrics, "per_hospital": per_hospital, "validation": validation}


def _figures(metrics: dict) -> dict:
    return {"accuracy": metrics["accuracy"], "macro_f1": metrics["macro_f1"]}


def run_local(cfg: FedmedConfig, out: RunDirectory, sites: list[SiteData], test: Split) -> dict:
    models = {s.name: build_model(cfg.model, cfg.data.num_classes, seed=cfg.seed) for s in sites}
    reporter = RoundReporter(cfg.federation.rounds, f"fedmed: local-only baseline, {len(sites)} hospitals -> {out.path}")
    hospitals: dict = {}
    for rnd in range(1, cfg.federation.rounds + 1):
        hospitals = {}
        for s in sites:
            model = models[s.name]
            possible, annotated, _ = known_labels(cfg, model, s.train)
            seed = derive_seed(cfg.seed, rnd, s.index)
            stats = train(model, s.train.x, s.train.y, cfg.train, seed=seed, possible=possible, annotated=annotated)
            hospitals[s.name] = {
                "train": _train_view(stats),
                "eval": _eval_view(evaluate(model, s.test.x, s.test.y, cfg.train.device)),
                "global_test": evaluate(model, test.x, test.y, cfg.train.device),
            }
        mean = _mean_test(hospitals)
        took, elapsed = reporter.round_done(rnd, mean, "  (mean over hospitals)")
        out.append_round(round_record(rnd, took, elapsed, mean, hospitals))
    per_hospital = {
        name: {"accuracy": h["eval"]["accuracy"], "macro_f1": h["eval"]["macro_f1"], "global_test_accuracy": h["global_test"]["accuracy"]}
        for name, h in hospitals.items()
    }
    # each hospital's model on its own validation split, pooled as a federation's evaluations are
    confusions = [evaluate(models[s.name], s.val.x, s.val.y, cfg.train.device)["confusion"] for s in sites if s.val is not None]
    validation = _figures(from_confusion(np.sum(confusions, axis=0))) if confusions else None
    return {"test": _mean_test(hospitals), "per_hospital": per_hospital, "validation": validation}


def _mean_test(hospitals: dict) -> dict:
    """Each local model's global-test metrics, averaged over hospitals."""
    tests = [h["global_test"] for h in hospitals.values()]
    mean = {k: sum(t[k] for t in tests) / len(tests) for k in ("accuracy", "macro_f1", "loss", "ece", "brier")}
    aurocs = [t["auroc"] for t in tests if t["auroc"] is not None]
    mean["auroc"] = sum(aurocs) / len(aurocs) if aurocs else None
    return mean


def run_baseline(cfg: FedmedConfig) -> RunDirectory:
    started = time.time()
    cfg = resolve_run_name(cfg)
    resolve_device(cfg.train.device)
    ensure_data(cfg, announce=print)
    out = RunDirectory.create(cfg)
    scalars = Scalars(out) if cfg.output.tensorboard else None
    out.on_round = scalars.round if scalars else None
    rounds = cfg.federation.rounds
    out.write_status("running", 0, rounds)
    sites = [site_data(cfg, i) for i in range(cfg.data.hospitals)]
    counts = {s.name: np.bincount(s.train.y[s.train.y >= 0].numpy(), minlength=cfg.data.num_classes).tolist() for s in sites}
    rep = heterogeneity.report(counts, cfg.data.classes)
    heterogeneity.write(out, rep)
    test = global_test(cfg)
    runner = run_pooled if cfg.federation.mode == "pooled" else run_local
    try:  # until a signal stops it (`fedmed simulate` takes SIGINT and SIGTERM over)
        result = runner(cfg, out, sites, test)
    except interrupt.Stop as stop:
        if scalars is not None:
            scalars.close()
        done, name = len(out.rounds()), interrupt.signal_name(stop.signum)
        out.write_status("interrupted", done, rounds, name)
        raise interrupt.Interrupted(
            f"interrupted ({name}) after round {done} of {rounds}: a {cfg.federation.mode} baseline keeps no checkpoint; run it again ({out.path})", stop.signum
        ) from None
    print_classes(Console(highlight=False, soft_wrap=True), result["test"], cfg.data.classes)
    extra = {"validation": result["validation"]} if result["validation"] else {}
    out.write_summary(summary(cfg, describe(cfg), result["test"], result["per_hospital"], time.time() - started, **extra))
    out.write_status("finished", rounds, rounds)
    if scalars is not None:
        scalars.close()
    print(f"run directory: {out.path}")
    return out
