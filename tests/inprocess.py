"""Federation logic without Ray: Flower's Grid answered by calling fedmed's ClientApp in
this process. `server_app.run(grid, cfg)` and the ClientApp are the code the Simulation
Engine and a real SuperNode run; only the transport differs. Ray, Flower's engine and
real SuperLink/SuperNode processes are tested elsewhere (test_simulation, test_deployment)."""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterable, Iterator
from pathlib import Path
from uuid import uuid4

import torch
from flwr.app import Context, Error, Message, RecordDict
from flwr.clientapp import ClientApp
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode
from flwr.serverapp import Grid
from flwr.supercore.task_identity import TaskIdentity

from fedmed.config import FedmedConfig
from fedmed.federation import client_app as fedmed_client
from fedmed.federation import server_app, simulation
from fedmed.run.directory import run_path

RUN_ID = 1
FIRST_NODE = 1001


class InProcessGrid(Grid):
    """One Context per simulated hospital (node config `partition-id`, as the engine sets
    it), kept across rounds; each message answered at once, an exception in the ClientApp
    turned into an error reply as the engine does."""

    def __init__(self, client_app: ClientApp, hospitals: int, run_config: dict, node_config: dict | None = None) -> None:
        """`node_config`: more for every node (a deployed node's `ledger-dir`)."""
        self.client_app = client_app
        self.contexts = {
            FIRST_NODE + i: Context(
                run_id=RUN_ID, node_id=FIRST_NODE + i, node_config={"partition-id": i, "num-partitions": hospitals, **(node_config or {})},
                state=RecordDict(), run_config=run_config,
            )
            for i in range(hospitals)
        }
        self.replies: dict[str, Message] = {}  # by the request they answer

    def set_run(self, run) -> None:  # the engine's concern
        raise NotImplementedError

    @property
    def run(self):
        raise NotImplementedError

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None) -> Message:
        return Message(content, dst_node_id, message_type, ttl=ttl, group_id=group_id)

    def get_node_ids(self) -> Iterable[int]:
        return list(self.contexts)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        """Answered at once; the replies wait to be pulled."""
        with one_thread():  # as a simulated hospital's Ray actor, with its one CPU
            replies = self._answer(messages)
        self.replies.update({r.metadata.reply_to_message_id: r for r in replies})
        return [r.metadata.reply_to_message_id for r in replies]

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return [self.replies.pop(i) for i in list(message_ids) if i in self.replies]

    def send_and_receive(self, messages: Iterable[Message], *, timeout: float | None = None) -> Iterable[Message]:
        return self.pull_messages(self.push_messages(messages))

    def _answer(self, messages: Iterable[Message]) -> list[Message]:
        replies = []
        for message in messages:
            message.metadata.__dict__["_message_id"] = str(uuid4())
            try:
                reply = self.client_app(message, self.contexts[message.metadata.dst_node_id])
            except Exception as exc:  # noqa: BLE001 - the engine reports any ClientApp error as an error reply
                reason = str(type(exc)) + ":<'" + str(exc) + "'>"
                reply = Message(Error(code=ErrorCode.CLIENT_APP_RAISED_EXCEPTION, reason=reason), reply_to=message)
            reply.metadata.__dict__["_message_id"] = str(uuid4())
            replies.append(reply)
        return replies


@contextlib.contextmanager
def one_thread() -> Iterator[None]:
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


@contextlib.contextmanager
def server_identity() -> Iterator[None]:
    """Messages are stamped with the task that creates them; the engine sets this."""
    saved = (TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id)
    TaskIdentity.task_id, TaskIdentity.run_id, TaskIdentity.node_id = 1, RUN_ID, SUPERLINK_NODE_ID
    try:
        yield
    finally:
        TaskIdentity._task_id, TaskIdentity._run_id, TaskIdentity._node_id = saved


def run_in_process(
    cfg: FedmedConfig, client_app: ClientApp | None = None, grid: InProcessGrid | None = None, resume: Path | None = None,
    nodes: dict[int, str] | None = None,
) -> Path:
    """`fedmed simulate` without Ray: the same preparation, ServerApp and ClientApp. With
    `nodes` (hospital names by node id, FIRST_NODE onwards), the server treats the nodes
    as a deployment's enrolled ones."""
    logging.getLogger("flwr").setLevel(logging.WARNING)  # as `fedmed simulate` without --verbose
    cfg = simulation.prepare(cfg) if resume is None else cfg
    with server_identity():
        server_app.run(grid or InProcessGrid(client_app or fedmed_client.app, cfg.data.hospitals, cfg.flat()), cfg, resume, nodes)
    return resume or run_path(cfg)


class Crash(Exception):
    """The server process dying mid-run."""


def run_until_crash_before_checkpoint(cfg: FedmedConfig, crash_round: int, monkeypatch) -> Path:
    """`cfg`'s run (already prepared) in this process until the server dies just before
    saving round `crash_round`'s checkpoint, the round's requests answered; its run directory."""
    import pytest

    from fedmed.federation import checkpoint

    save = checkpoint.save

    def crash(out, state, signer):
        if state.round == crash_round:
            raise Crash
        save(out, state, signer)

    monkeypatch.setattr(checkpoint, "save", crash)
    with pytest.raises(Crash):
        run_in_process(cfg)
    monkeypatch.setattr(checkpoint, "save", save)
    return Path(cfg.output.dir) / cfg.output.name
