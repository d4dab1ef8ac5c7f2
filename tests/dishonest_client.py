"""A hospital running modified fedmed: it trains with DP-SGD's clipping and sampling but
no noise, and logs the sigma it was asked for. Its ledger is signed and consistent; only
the empirical audit (the canaries) can catch it."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmed.federation import client_app as honest
from fedmed.training import local

app = ClientApp()


def _noiseless(*args, **kwargs):
    optimizer, loader, cleanup = honest_make_private(*args, **kwargs)
    optimizer.noise_multiplier = 0.0
    return optimizer, loader, cleanup


honest_make_private = local.make_private


@app.train()
def train(msg: Message, context: Context) -> Message:
    local.make_private = _noiseless
    try:
        return honest.train(msg, context)
    finally:
        local.make_private = honest_make_private


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
