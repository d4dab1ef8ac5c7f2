"""fedmed's ClientApp, as a real node runs it, that first writes down what the node was
given: its Flower run config (`Context.run_config`) and each request's config, in
`<ledger-dir>/received-<node id>.jsonl`. The deployment tests name it as the federation's
ClientApp (`FEDMED_CLIENTAPP`) to check what a hospital is told."""

from __future__ import annotations

import json
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

from fedmed.federation import client_app as fedmed_client
from fedmed.federation import wire

app = ClientApp()


def _write_down(msg: Message, context: Context) -> None:
    seen = {"run_config": dict(context.run_config), "request": dict(msg.content[wire.CONFIG])}
    folder = Path(str(context.node_config[wire.LEDGER_DIR]))
    with (folder / f"received-{context.node_id}.jsonl").open("a") as out:
        out.write(json.dumps(seen, sort_keys=True) + "\n")


@app.train()
def train(msg: Message, context: Context) -> Message:
    _write_down(msg, context)
    return fedmed_client.train(msg, context)


@app.evaluate()
def evaluate(msg: Message, context: Context) -> Message:
    _write_down(msg, context)
    return fedmed_client.evaluate(msg, context)
