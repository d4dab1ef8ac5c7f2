"""A hospital running modified fedmed: it trains with DP-SGD's clipping and sampling but
no noise, and logs the sigma it was asked for. Its ledger is signed and consistent; only
the empirical audit (the canaries) can catch it."""

from __future__ import annotations

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmed.federation import client_app as honest
from fedmed.privacy.dpsgd import DPSGD

app = ClientApp()
honest_attach = DPSGD.attach


def _noiseless(self, *args, **kwargs):
    optimizer, loader = honest_attach(self, *args, **kwargs)
    optimizer.noise_multiplier = 0.0
    return optimizer, loader


@app.train()
def train(msg: Message, context: Context) -> Message:
    DPSGD.attach = _noiseless
    try:
        return honest.train(msg, context)
    finally:
        DPSGD.attach = honest_attach


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    return honest.evaluate(msg, context)
