"""A real hospital's policy, applied by the ClientApp beside it: the hospital's own
settings (its data, its name, what it accepts), read from its site config on its own
machine (the node config's `site-config`), never from the server."""

from __future__ import annotations

import sys
from typing import Any

from fedmed.config import FedmedConfig, LabelsConfig, SkewConfig, load
from fedmed.errors import FedmedError
from fedmed.federation import wire


def site_settings(node_config: dict[str, Any]) -> FedmedConfig | None:
    """The hospital's own config, or None for a simulated hospital. (Each request runs in
    a fresh ClientApp process: read once per request.)"""
    if wire.SITE_CONFIG not in node_config:
        return None
    try:
        return load(str(node_config[wire.SITE_CONFIG]))
    except FedmedError as exc:
        # The reason names paths on this machine: it stays in this node's log; the server learns only that it failed.
        print(f"fedmed: this node's site config cannot be used: {exc}", file=sys.stderr)
        raise FedmedError("this node's site config cannot be used (the reason is in the hospital's own log)") from None


def check_name(own: FedmedConfig, enrolled: object) -> None:
    """A node answers only under the name its key was enrolled under, which the server
    sends with every request: the server refuses any other. The line goes to this node's
    log too, where `fedmed site start` shows it to the hospital's operator."""
    if enrolled is None:
        raise FedmedError("the server sent no enrolled name: it runs an older fedmed; upgrade the server")
    if own.site.name != enrolled:
        line = (
            f"{wire.NAME_MISMATCH}: the server enrolled this node's key as {enrolled!r}, but its site config says "
            f"site.name = {own.site.name!r}: set site.name = \"{enrolled}\" (or have the server's operator enrol the key as "
            f"{own.site.name!r}) and restart the node"
        )
        print(f"fedmed: {line}", file=sys.stderr, flush=True)
        raise FedmedError(line)


def hospital_config(federation: FedmedConfig, own: FedmedConfig) -> FedmedConfig:
    """The settings to load this hospital's own data with: all of it its own (one
    hospital, no simulated skew or label hiding), split with its own seed, so the server
    cannot change which images it holds out (nor its data commitment, and with it the
    lifetime budget kept per commitment)."""
    theirs, mine = federation.data, own.data
    if mine.image_size != theirs.image_size:
        raise FedmedError(f"the federation trains on {theirs.image_size} px images; this hospital's site config says data.image_size = {mine.image_size}")
    if mine.classes != theirs.classes:
        raise FedmedError(
            f"the federation's classes are {','.join(theirs.classes)}; this hospital's site config says data.classes = {','.join(mine.classes)}"
        )
    data = mine.model_copy(update={"hospitals": 1})
    return federation.model_copy(update={"data": data, "skew": SkewConfig(), "labels": LabelsConfig(), "seed": own.seed})


def refusal(own: FedmedConfig, federation: FedmedConfig, server_round: int, architecture: str, sigma: float | None) -> str | None:
    """Why this hospital's policy declines a training request, if it does. The reason goes
    to the server and into the hospital's ledger: it names settings, never patients."""
    policy = own.site
    if policy.max_rounds and server_round > policy.max_rounds:
        return f"this hospital trains in rounds 1-{policy.max_rounds} only (site.max_rounds); this is round {server_round}"
    if policy.models and architecture not in policy.models:
        return f"model architecture {architecture[:16]} is not one this hospital accepts (site.models)"
    if not (policy.max_epsilon or policy.min_noise):
        return None
    if federation.privacy.mode != "sample":
        return f"this hospital requires sample-level DP (its site.max_epsilon / site.min_noise); the server asked for privacy.mode = {federation.privacy.mode}"
    if federation.privacy.reproducible:
        return "this hospital refuses privacy.reproducible: noise drawn from the run's seed could be removed by anyone who has it"
    if policy.min_noise and sigma is not None and sigma < policy.min_noise:
        return f"noise multiplier {sigma:.3f} is below this hospital's minimum of {policy.min_noise:g} (site.min_noise)"
    return None
