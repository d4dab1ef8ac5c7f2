"""Local training and evaluation: what one hospital (or a baseline) runs."""

from __future__ import annotations

import warnings
from dataclasses import dataclass

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from fedmed.config import TrainConfig
from fedmed.errors import FedmedError
from fedmed.privacy.dpsgd import QUIET, Plan, make_private
from fedmed.training.metrics import classification_metrics


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name == "cuda" and not torch.cuda.is_available():
        raise FedmedError("train.device is `cuda` but no CUDA GPU is visible: use `cpu` or `auto`")
    return torch.device(name)


@dataclass(frozen=True)
class TrainStats:
    loss: float  # mean training loss over the steps taken
    accuracy: float  # running accuracy on the exactly labelled examples seen
    examples: int  # sample-gradient evaluations (examples x epochs)
    steps: int


def _flip_half(x: torch.Tensor) -> torch.Tensor:
    """Mirror a random half of the batch left-right (the brain is near-symmetric)."""
    flip = torch.rand(len(x), device=x.device) < 0.5
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def make_optimizer(model: nn.Module, cfg: TrainConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adam":
        return torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    return torch.optim.SGD(model.parameters(), lr=cfg.lr, momentum=cfg.momentum, weight_decay=cfg.weight_decay)


def make_loader(x: torch.Tensor, y: torch.Tensor, batch_size: int, seed: int, *extra: torch.Tensor) -> DataLoader:
    generator = torch.Generator().manual_seed(seed)
    return DataLoader(TensorDataset(x, y, *extra), batch_size=batch_size, shuffle=True, generator=generator)


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
    private: Plan | None = None,
) -> TrainStats:
    """`epochs` (default cfg.local_epochs) passes with a fresh optimizer, as each FedAvg round does.
    With `proximal_mu` > 0 (FedProx) the loss adds mu/2 ||w - w_start||^2, w_start being
    the weights the round began with (the global model). With a `private` plan, DP-SGD:
    Poisson-sampled batches, each image's gradient clipped, Gaussian noise added."""
    device = resolve_device(cfg.device)
    model.to(device).train()
    start = [p.detach().clone() for p in model.parameters()] if proximal_mu > 0 else []
    optimizer = make_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss()
    partial = () if possible is None else (possible, annotated if annotated is not None else torch.ones_like(possible))
    loader = make_loader(x, y, cfg.batch_size, seed, *partial)
    cleanup = None
    if private is not None:
        optimizer, loader, cleanup = make_private(model, optimizer, loader, private, seed)
    total_loss, correct, labelled, seen, steps = 0.0, 0, 0, 0, 0
    try:
        with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
            warnings.filterwarnings(**QUIET)
            torch.manual_seed(seed)
            for _ in range(epochs or cfg.local_epochs):
                for xb, yb, *known in loader:
                    xb, yb = xb.to(device, non_blocking=True), yb.to(device, non_blocking=True)
                    if cfg.augment:
                        xb = _flip_half(xb)
                    if private is not None:
                        xb.requires_grad_()  # see _step: the gradient is taken towards the input
                    optimizer.zero_grad(set_to_none=True)
                    logits = model(xb)
                    if len(yb) == 0:  # Poisson sampling can draw an empty batch: the step is noise only
                        loss = logits.sum()
                    elif known:
                        loss = set_loss(logits, *(k.to(device) for k in known))
                    else:
                        loss = loss_fn(logits, yb)
                    _step(model, optimizer, loss, start, proximal_mu, xb if private is not None else None)
                    total_loss += float(loss.detach()) * len(yb)
                    correct += int((logits.argmax(1) == yb).sum())
                    labelled += int((yb >= 0).sum())  # y = -1: not known exactly, so no accuracy to count
                    seen += len(yb)
                    steps += 1
    finally:
        if cleanup is not None:
            cleanup()
    return TrainStats(loss=total_loss / max(seen, 1), accuracy=correct / max(labelled, 1), examples=seen, steps=steps)


def _step(model: nn.Module, optimizer: torch.optim.Optimizer, loss: torch.Tensor, start: list[torch.Tensor], mu: float, private_input: torch.Tensor | None) -> None:
    """One optimizer step, with FedProx's proximal term when `start` is given.

    Under DP (`private_input`: the batch) Opacus's hooks compute each image's gradient
    from the layers' inputs and output gradients, and the optimizer replaces .grad by
    their clipped, noised mean: so backward runs towards the input only, which spares
    autograd the (discarded) summed weight gradients, about a fifth of a private step.
    The (data-free) proximal gradient mu (w - w0) is then added after the noise."""
    if private_input is None:
        if start:
            loss = loss + mu / 2 * sum(((p - p0) ** 2).sum() for p, p0 in zip(model.parameters(), start))
        loss.backward()
        optimizer.step()
        return
    loss.backward(inputs=[private_input])
    if optimizer.pre_step():  # clip, noise, average
        if start:
            with torch.no_grad():
                for p, p0 in zip(model.parameters(), start):
                    if p.grad is not None:
                        p.grad.add_(p - p0, alpha=mu)
        optimizer.original_optimizer.step()


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
