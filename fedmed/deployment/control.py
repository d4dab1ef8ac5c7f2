"""The SuperLink's Control API, asked from this process: what `flwr list` and `flwr
supernode register | unregister | list` answer, without starting a `flwr` process (about
2 s of CPU each) for every question. The operator's terminal asks every few seconds
while a run goes on; on a machine that also runs hospitals' nodes that CPU is theirs.

Starting a run stays `flwr run`: it builds and signs the app bundle."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import TypeVar

import httpx
from cryptography.exceptions import UnsupportedAlgorithm
from cryptography.hazmat.primitives import serialization
from flwr.proto.control_pb2 import (  # pylint: disable=no-name-in-module
    ListNodesRequest,
    ListRunsRequest,
    RegisterNodeRequest,
    UnregisterNodeRequest,
)
from flwr.supercore.control import ControlHttpClient
from flwr.supercore.error import FlowerError
from flwr.supercore.interceptors.http.runtime_version import RuntimeVersionHttpInterceptor
from flwr.supercore.primitives.asymmetric import public_key_to_bytes

from fedmed.errors import FedmedError

T = TypeVar("T")


@dataclass(frozen=True)
class RunStatus:
    """A run as the SuperLink has it: `status` as `flwr list` prints it
    ("running", "finished:completed", "finished:failed", ...)."""

    status: str
    details: str

    @property
    def finished(self) -> bool:
        return self.status.startswith("finished")

    @property
    def completed(self) -> bool:
        return self.status == "finished:completed"


@dataclass(frozen=True)
class Node:
    node_id: str
    status: str  # "online", "offline", "registered", "unregistered"


class Control:
    """One HTTPS client to the SuperLink's Control API (verified against the federation's
    CA). Every failure is a `FedmedError` naming the SuperLink's log."""

    def __init__(self, address: str, ca_cert: Path, log: Path, timeout: float = 30) -> None:
        self.address, self.log = address, log
        try:
            trust = ssl.create_default_context(cafile=ca_cert)
        except (OSError, ssl.SSLError) as exc:
            raise FedmedError(f"cannot read the CA certificate {ca_cert} ({exc.strerror or exc}): is server.certs the folder `fedmed certs init` wrote?") from None
        self.client = ControlHttpClient(
            f"https://{address}", verify=trust, timeout=timeout,
            interceptors=[RuntimeVersionHttpInterceptor(component_name="fedmed")],
        )

    def run(self, run_id: str) -> RunStatus:
        answer = self._ask("list runs", lambda: self.client.ListRuns(ListRunsRequest(run_id=int(run_id))))
        if int(run_id) not in answer.run_dict:
            raise FedmedError(f"the SuperLink at {self.address} has no run {run_id}: was its database (server.state) replaced?")
        status = answer.run_dict[int(run_id)].status
        return RunStatus(f"{status.status}:{status.sub_status}" if status.sub_status else status.status, status.details)

    def nodes(self) -> list[Node]:
        answer = self._ask("list nodes", lambda: self.client.ListNodes(ListNodesRequest()))
        return [Node(str(node.node_id), node.status) for node in answer.nodes_info]

    def register(self, public_key: Path) -> str:
        """The node id of a hospital's key: Flower reads the key as OpenSSH text, as `flwr
        supernode register` does."""
        try:
            key = public_key_to_bytes(serialization.load_ssh_public_key(public_key.read_bytes()))
        except (OSError, ValueError, UnsupportedAlgorithm) as exc:
            raise FedmedError(f"{public_key} is not a hospital's public key ({exc}): enrol the NAME.pub that `fedmed certs site NAME` wrote") from None
        return str(self._ask("register a node", lambda: self.client.RegisterNode(RegisterNodeRequest(public_key=key))).node_id)

    def unregister(self, node_id: str) -> None:
        self._ask("unregister a node", lambda: self.client.UnregisterNode(UnregisterNodeRequest(node_id=int(node_id))))

    def _ask(self, what: str, call: Callable[[], T]) -> T:
        try:
            return call()
        except httpx.RequestError as exc:
            raise FedmedError(f"the SuperLink at {self.address} did not answer ({what}: {type(exc).__name__}): is it running? (log: {self.log})") from None
        except httpx.HTTPStatusError as exc:
            error = FlowerError.from_json(exc.response.text)
            reason = error.message if error is not None else f"HTTP {exc.response.status_code}"
            raise FedmedError(f"the SuperLink refused to {what}: {reason} (log: {self.log})") from None

    def close(self) -> None:
        self.client.close()

    def __enter__(self) -> Control:
        return self

    def __exit__(self, *_: type[BaseException] | BaseException | TracebackType | None) -> None:
        self.close()
