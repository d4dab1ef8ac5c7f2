"""The training loop and evaluation: what one hospital runs each round (and each
baseline runs), with or without DP-SGD."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmed.config import TrainConfig
from fedmed.errors import FedmedError
from fedmed.training import augment
from fedmed.training.metrics import classification_metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedmedError("train.device is `cuda` but no CUDA GPU is visible: use `cpu` or `auto`")
    return torch.device(name)


class PrivateTraining(Protocol):
    """DP-SGD as the loop sees it (`fedmed.privacy.dpsgd.DPSGD`): it takes over the
    optimizer, the loader and each step's backward pass and update."""

    def attach(
        self, model: nn.Module, optimizer: torch.optim.Optimizer, loader: DataLoader, seed: int
    ) -> tuple[torch.optim.Optimizer, DataLoader]: ...

    def watch(self, batch: torch.Tensor) -> torch.Tensor: ...

    def step(self, loss: torch.Tensor, batch: torch.Tensor, after_noise: Callable[[], None] | None = None) -> None: ...

    def detach(self) -> None: ...


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps taken
    accuracy: float  # running accuracy on the exactly labelled examples seen
    examples: int  # sample-gradient evaluations (examples x epochs)
    steps: int


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, *extra: torch.Tensor) -> DataLoader:
    """Batches of (images, labels, their indices, *extra), shuffled from `seed`."""
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y, torch.arange(len(y)), *extra), batch_size=batch_size, shuffle=True, generator=generator)


def set_loss(logits: torch.Tensor, possible: torch.Tensor, annotated: torch.Tensor) -> torch.Tensor:
    """-log P(class in `possible`), the softmax taken over each image's `annotated`
    classes only. A full label is cross-entropy; an image that may be any annotated
    class adds nothing; classes outside `annotated` get no gradient. Averaged over
    the images that carry information."""
    log_p = torch.log_softmax(logits.masked_fill(~annotated, float("-inf")), dim=1)
    per_image = -torch.logsumexp(log_p.masked_fill(~possible, float("-inf")), dim=1)
    informative = possible.sum(1) < annotated.sum(1)
    return per_image[informative].sum() / informative.sum().clamp(min=1)


@torch.no_grad()
def pseudo_label(
    model: nn.Module, x: torch.Tensor, possible: torch.Tensor, annotated: torch.Tensor, threshold: float, device_name: str = "cpu"
) -> tuple[torch.Tensor, torch.Tensor, int]:
    """Where the model is at least `threshold` sure of a class an image may be (one of its
    possible classes, or one its hospital does not annotate), take it as the label; the
    image then trains over every class. Returns the new possible and annotated sets and
    how many images were labelled."""
    unsure = (possible.sum(1) > 1).nonzero().flatten()
    if len(unsure) == 0:
        return possible, annotated, 0
    candidates = possible[unsure] | ~annotated[unsure]
    probs = torch.from_numpy(predict(model, x[unsure], device_name)).float() * candidates
    probs = probs / probs.sum(1, keepdim=True).clamp(min=1e-12)
    confidence, label = probs.max(1)
    sure = unsure[confidence >= threshold]
    new_possible, new_annotated = possible.clone(), annotated.clone()
    new_possible[sure] = torch.nn.functional.one_hot(label[confidence >= threshold], possible.shape[1]).bool()
    new_annotated[sure] = True
    return new_possible, new_annotated, len(sure)


def train(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainConfig,
    seed: int,
    epochs: int | None = None,
    proximal_mu: float = 0.0,
    possible: torch.Tensor | None = None,
    annotated: torch.Tensor | None = None,
    private: PrivateTraining | None = None,
    anchor: dict[str, torch.Tensor] | None = None,
    correction: dict[str, torch.Tensor] | None = None,
) -> TrainStats:
    """`epochs` (default cfg.local_epochs) passes with a fresh optimizer, as each FedAvg round does.
    With `proximal_mu` > 0 (FedProx, Ditto) the loss adds mu/2 ||w - w_0||^2, w_0 being
    `anchor` (Ditto: the global model) or else the weights the round began with (FedProx:
    the global model). `correction` (SCAFFOLD's c - c_i, by parameter name) is added to
    every step's gradient. With `private` (DP-SGD): Poisson-sampled batches, each image's
    gradient clipped, Gaussian noise added; the proximal pull and the correction, which
    use no data, after the noise."""
    device = resolve_device(cfg.device)
    model.to(device).train()
    if proximal_mu > 0:
        start = [(anchor[name] if anchor is not None else p).detach().clone().to(device) for name, p in model.named_parameters()]
    else:
        start = []
    shift = [correction[name].to(device) if correction is not None and name in correction else None for name, _ in model.named_parameters()]
    optimizer = make_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    partial = () if possible is None else (possible, annotated if annotated is not None else torch.ones_like(possible))
    loader = make_loader(x, y, cfg.batch_size, seed, *partial)

    def proximal_pull() -> None:
        """The proximal term's gradient mu (w - w_0), data-free: added after DP's noise."""
        with torch.no_grad():
            for p, p0 in zip(model.parameters(), start, strict=True):
                if p.grad is not None:
                    p.grad.add_(p - p0, alpha=proximal_mu)

    def corrected() -> None:
        """SCAFFOLD: every gradient shifted by c - c_i."""
        with torch.no_grad():
            for p, c in zip(model.parameters(), shift, strict=True):
                if p.grad is not None and c is not None:
                    p.grad.add_(c)

    def after_noise() -> None:
        if start:
            proximal_pull()
        corrected()

    if private is not None:
        optimizer, loader = private.attach(model, optimizer, loader, seed)
    transform = augment.per_image(cfg.augment, seed)
    total_loss, correct, labelled, seen, steps = 0.0, 0, 0, 0, 0
    try:
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            for epoch in range(epochs or cfg.local_epochs):
                for xb, yb, index, *known in loader:
                    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                    if "flip" in cfg.augment:
                        xb = augment.flip_half(xb)
                    if transform is not None:
                        xb = transform(xb, index, epoch)
                    if private is not None:
                        xb = private.watch(xb)
                    optimizer.zero_grad(set_to_none=True)
                    logits = model(xb)
                    if len(yb) == 0:  # Poisson sampling can draw an empty batch: the step is noise only
                        loss = logits.sum()
                    elif known:
                        loss = set_loss(logits, *(k.to(device) for k in known))
                    else:
                        loss = loss_fn(logits, yb)
                    if private is not None:
                        private.step(loss, xb, after_noise if start or correction else None)
                    else:
                        objective = loss
                        if start:
                            objective = loss + proximal_mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start, strict=True))
                        objective.backward()
                        corrected()
                        optimizer.step()
                    total_loss += float(loss.detach()) * len(yb)
                    correct += int((logits.argmax(1) == yb).sum())
                    labelled += int((yb >= 0).sum())  # y = -1: not known exactly, so no accuracy to count
                    seen += len(yb)
                    steps += 1
    finally:
        if private is not None:
            private.detach()
    return TrainStats(loss=total_loss / max(seen, 1), accuracy=correct / max(labelled, 1), examples=seen, steps=steps)


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor, device_name: str = "cpu", batch_size: int = 256) -> np.ndarray:
    """Class probabilities (N, C)."""
    device = resolve_device(device_name)
    model.to(device).eval()
    out = [torch.softmax(model(x[i : i + batch_size].to(device)), dim=1).cpu() for i in range(0, len(x), batch_size)]
    probs = torch.cat(out).double()
    return (probs / probs.sum(dim=1, keepdim=True)).numpy()


def evaluate(model: nn.Module, x: torch.Tensor, y: torch.Tensor, device_name: str = "cpu") -> dict[str, object]:
    return classification_metrics(y.numpy(), predict(model, x, device_name))
