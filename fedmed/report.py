"""`report.html`: one self-contained page of a run, drawn from what the run recorded
(metrics.jsonl, summary.json, scores.npz, heterogeneity.json, config.toml). Figures are
PNGs inline, styles in the page: it opens from disk, with no network.

Everything on it is an aggregate the run already wrote (accuracies, counts, epsilons, the
server's own test set's scores); nothing of a hospital's images or files."""

from __future__ import annotations

import base64
import io
import math
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from fedmed import config as config_mod
from fedmed.errors import FedmedError
from fedmed.run.directory import RunDirectory, atomic_write
from fedmed.training.metrics import ECE_BINS

if TYPE_CHECKING:
    import jinja2
    import matplotlib.figure

REPORT = "report.html"


@dataclass(frozen=True)
class Figure:
    title: str
    png: str  # base64
    caption: str


@dataclass(frozen=True)
class Table:
    title: str
    header: list[str]
    rows: list[list[str]]
    caption: str = ""


@dataclass
class Section:
    title: str
    figures: list[Figure] = field(default_factory=list)
    tables: list[Table] = field(default_factory=list)


def write_report(run: Path) -> Path:
    """Draw the run's report into `run`/report.html and return its path."""
    out = RunDirectory(run)
    if not (out / RunDirectory.SUMMARY).is_file():
        raise FedmedError(f"{run} holds no finished run (no {RunDirectory.SUMMARY}): a report is drawn once a run has finished")
    import matplotlib

    matplotlib.use("Agg")
    summary, rounds = out.summary(), out.rounds()
    classes = [str(c) for c in summary["classes"]]
    final = Section("The final model", [_confusion(np.asarray(summary["test"]["confusion"]), classes)], [_per_class(summary["test"], classes)])
    if (out / RunDirectory.SCORES).is_file():
        scores = np.load(out / RunDirectory.SCORES)
        final.figures += [_roc(scores["probs"], scores["labels"], classes), _reliability(scores["probs"], scores["labels"], summary["test"])]
    sections = [Section("Learning curves", [_curves(rounds)]), final]
    if summary.get("per_hospital"):
        sections.append(Section("Fairness across hospitals", tables=[_fairness(summary)]))
    privacy = summary.get("privacy")
    if privacy and privacy.get("hospitals"):
        sections.append(Section("Privacy", [_epsilon(rounds, privacy)], [_privacy(privacy)]))
    heterogeneity = out.heterogeneity()
    if heterogeneity:
        data = Section("Data", tables=[_heterogeneity(heterogeneity)])
        if (out / RunDirectory.HEATMAP).is_file():
            data.figures.append(Figure("Label distribution per hospital", base64.b64encode((out / RunDirectory.HEATMAP).read_bytes()).decode(), heterogeneity["index_name"]))
        sections.append(data)
    sections += [Section("Timing", [_timing(rounds)]), Section("Settings", tables=[_settings(out / RunDirectory.CONFIG)])]
    page = _template().render(run=run.name, summary=summary, headline=_headline(summary), sections=sections)
    path = out / REPORT
    atomic_write(path, page, private=False)
    return path


def _template() -> jinja2.Template:
    from jinja2 import Environment, select_autoescape

    source = resources.files("fedmed").joinpath("report.html.j2").read_text(encoding="utf-8")
    return Environment(autoescape=select_autoescape(default=True), trim_blocks=True, lstrip_blocks=True).from_string(source)


def _png(fig: matplotlib.figure.Figure) -> str:
    import matplotlib.pyplot as plt

    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=100, bbox_inches="tight")
    plt.close(fig)
    return base64.b64encode(buffer.getvalue()).decode()


def _fmt(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    return f"{value:.{digits}f}" if isinstance(value, float) else str(value)


def _headline(summary: dict[str, Any]) -> list[tuple[str, str]]:
    test = summary["test"]
    rows = [("global test accuracy", _fmt(test["accuracy"])), ("macro-F1", _fmt(test["macro_f1"])), ("AUROC", _fmt(test.get("auroc"))),
            ("ECE", _fmt(test.get("ece"))), ("Brier score", _fmt(test.get("brier"))), ("rounds", str(summary["rounds"])),
            ("hospitals", str(summary["num_hospitals"])), ("wall time", f"{summary['wall_seconds']:.0f} s")]  # fmt: skip
    if summary.get("fairness"):
        f = summary["fairness"]
        rows.append(("worst hospital", f"{f['worst_hospital']} ({_fmt(f['worst_accuracy'])})"))
    return rows


def _curves(rounds: list[dict[str, Any]]) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ((acc, loss), (hosp, train)) = plt.subplots(2, 2, figsize=(10, 7))
    x = [r["round"] for r in rounds]
    acc.plot(x, [r["test"]["accuracy"] for r in rounds], "o-", label="global test set")
    pooled = [(r["round"], r["federated_eval"]["accuracy"]) for r in rounds if r.get("federated_eval")]
    if pooled:
        acc.plot(*zip(*pooled, strict=True), "s--", label="hospitals' test sets, pooled")
    acc.set(title="accuracy", xlabel="round", ylim=(0, 1))
    acc.legend(fontsize=8)
    loss.plot(x, [r["test"]["loss"] for r in rounds], "o-")
    loss.set(title="global test loss", xlabel="round")
    for site in sorted({s for r in rounds for s in r["hospitals"]}):
        evals = [(r["round"], r["hospitals"][site]["eval"]["accuracy"]) for r in rounds if "eval" in r["hospitals"].get(site, {})]
        trains = [(r["round"], r["hospitals"][site]["train"]["loss"]) for r in rounds if "train" in r["hospitals"].get(site, {})]
        if evals:
            hosp.plot(*zip(*evals, strict=True), ".-", label=site)
        if trains:
            train.plot(*zip(*trains, strict=True), ".-", label=site)
    hosp.set(title="each hospital's test set", xlabel="round", ylim=(0, 1))
    train.set(title="training loss", xlabel="round")
    for ax in (hosp, train):
        if ax.lines and len(ax.lines) <= 12:
            ax.legend(fontsize=7)
    for ax in (acc, loss, hosp, train):
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    fig.tight_layout()
    return Figure("Learning curves", _png(fig), "Per round: the global model on the server's test set and on each hospital's own test split; each hospital's local training loss.")


def _confusion(cm: np.ndarray, classes: list[str]) -> Figure:
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4.2))
    rows = cm.sum(axis=1, keepdims=True)
    normalised = np.divide(cm, rows, out=np.zeros(cm.shape), where=rows > 0)
    for ax, values, title, fmt in ((axes[0], cm, "counts", "d"), (axes[1], normalised, "row-normalised (recall)", ".2f")):
        ax.imshow(values, cmap="Blues", vmin=0, vmax=values.max() or 1)
        for i in range(cm.shape[0]):
            for j in range(cm.shape[1]):
                ax.text(j, i, format(values[i, j], fmt), ha="center", va="center", fontsize=8, color="white" if values[i, j] > values.max() / 2 else "black")
        ax.set(title=title, xticks=range(len(classes)), yticks=range(len(classes)), xlabel="predicted", ylabel="true")
        ax.set_xticklabels(classes, rotation=30, ha="right", fontsize=8)
        ax.set_yticklabels(classes, fontsize=8)
    fig.tight_layout()
    return Figure("Confusion matrix", _png(fig), "The final global model on the server's test set.")


def _per_class(test: dict[str, Any], classes: list[str]) -> Table:
    rows = [[name, _fmt(p), _fmt(r), _fmt(f)] for name, p, r, f in zip(classes, test["per_class_precision"], test["per_class_recall"], test["per_class_f1"], strict=True)]
    return Table("Per class", ["class", "precision", "recall", "F1"], rows, "The final global model on the server's test set; – where a class was never predicted (precision) or is absent (recall).")


def _roc(probs: np.ndarray, labels: np.ndarray, classes: list[str]) -> Figure:
    import matplotlib.pyplot as plt
    from sklearn.metrics import auc, roc_curve

    fig, ax = plt.subplots(figsize=(5.5, 5))
    for k, name in enumerate(classes):
        positive = labels == k
        if positive.all() or not positive.any():
            continue  # one-vs-rest needs both
        fpr, tpr, _ = roc_curve(positive, probs[:, k])
        ax.plot(fpr, tpr, label=f"{name} (AUC {auc(fpr, tpr):.3f})")
    ax.plot([0, 1], [0, 1], ":", color="grey")
    ax.set(title="ROC, one class against the rest", xlabel="false positive rate", ylabel="true positive rate")
    ax.legend(fontsize=8)
    return Figure("ROC curves", _png(fig), "From the final model's class probabilities on the server's test set (scores.npz).")


def _reliability(probs: np.ndarray, labels: np.ndarray, test: dict[str, Any]) -> Figure:
    import matplotlib.pyplot as plt

    confidence, correct = probs.max(axis=1), probs.argmax(axis=1) == labels
    which = np.minimum((confidence * ECE_BINS).astype(int), ECE_BINS - 1)
    centres = (np.arange(ECE_BINS) + 0.5) / ECE_BINS
    used = [b for b in range(ECE_BINS) if (which == b).any()]
    fig, ax = plt.subplots(figsize=(5.5, 5))
    ax.bar(centres[used], [correct[which == b].mean() for b in used], width=1 / ECE_BINS, edgecolor="black", alpha=0.7, label="accuracy in the bin")
    ax.plot([0, 1], [0, 1], ":", color="grey", label="perfect calibration")
    ax.set(title=f"ECE {_fmt(test.get('ece'))}, Brier {_fmt(test.get('brier'))}", xlabel="confidence (top class)", ylabel="accuracy", xlim=(0, 1), ylim=(0, 1))
    ax.legend(fontsize=8)
    return Figure("Calibration", _png(fig), f"Reliability diagram over {ECE_BINS} equal-width confidence bins; expected calibration error over the same bins.")


def _fairness(summary: dict[str, Any]) -> Table:
    per = summary["per_hospital"]
    personal = any("personal_accuracy" in h for h in per.values())
    header = ["hospital", "accuracy", "macro-F1", *(["personal accuracy"] if personal else [])]
    rows = [[site, _fmt(h.get("accuracy")), _fmt(h.get("macro_f1")), *([_fmt(h.get("personal_accuracy"))] if personal else [])] for site, h in sorted(per.items())]
    f = summary.get("fairness") or {}
    caption = f"Worst: {f['worst_hospital']} at {_fmt(f['worst_accuracy'])}; best-worst gap {_fmt(f['gap'])}; standard deviation {_fmt(f['std'])}." if f else ""
    return Table("Fairness across hospitals (final model, each hospital's own test split)", header, rows, caption)


def _epsilon(rounds: list[dict[str, Any]], privacy: dict[str, Any]) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 4))
    for site in sorted(privacy["hospitals"]):
        points = [(r["round"], r["hospitals"][site]["train"]["dp_epsilon"]) for r in rounds if "dp_epsilon" in r["hospitals"].get(site, {}).get("train", {})]
        if points:
            (line,) = ax.plot(*zip(*points, strict=True), "o-", label=site)
            budget = privacy["hospitals"][site].get("budget")
            if budget:
                ax.axhline(budget, linestyle="--", color=line.get_color(), linewidth=0.8)
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title=f"epsilon spent ({privacy.get('accountant', '?')} accountant)", xlabel="round", ylabel="epsilon")
    if ax.lines:
        ax.legend(fontsize=8)
    return Figure("Privacy", _png(fig), "Each hospital's epsilon after every round it trained; dashed: its budget, where it has one.")


def _privacy(privacy: dict[str, Any]) -> Table:
    rows = [[site, _fmt(h.get("epsilon")), _fmt(h.get("budget")), f"{h.get('delta', math.nan):.1e}", _fmt(h.get("sigma")), str(h.get("rounds_trained", "–"))]
            for site, h in sorted(privacy["hospitals"].items())]  # fmt: skip
    return Table("Privacy at the end of the run", ["hospital", "epsilon", "budget", "delta", "sigma", "rounds trained"], rows, f"Accountant: {privacy.get('accountant', '?')}.")


def _heterogeneity(report: dict[str, Any]) -> Table:
    rows = [[site, str(size), *map(str, counts)] for site, size, counts in zip(report["hospitals"], report["sizes"], report["label_counts"], strict=True)]
    return Table("Data per hospital", ["hospital", "images", *map(str, report["classes"])], rows, f"{report['index_name']}: {_fmt(report['index'])}.")


def _timing(rounds: list[dict[str, Any]]) -> Figure:
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, ax = plt.subplots(figsize=(6.5, 3.2))
    ax.bar([r["round"] for r in rounds], [r["time_s"] for r in rounds])
    ax.xaxis.set_major_locator(MaxNLocator(integer=True))
    ax.set(title="wall time per round", xlabel="round", ylabel="seconds")
    return Figure("Timing", _png(fig), "Each round from its requests to its record.")


def _settings(config_file: Path) -> Table:
    run, defaults = config_mod.load(config_file).shareable(), config_mod.load(None).shareable()
    rows = [[key, repr(value), repr(defaults.get(key))] for key, value in sorted(run.items()) if defaults.get(key) != value]
    return Table("Settings that differ from the defaults", ["setting", "this run", "default"], rows)
