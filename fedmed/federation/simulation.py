"""Run the ServerApp and ClientApp on Flower's Simulation Engine (Ray backend).

`flwr run` reaches the same engine through a detached SuperLink of its own on a fixed
port; fedmed calls the engine's entry point in-process instead (the function the
SuperLink's simulation process calls), so a run needs no background service and
the run config is passed straight to the ServerApp.
"""

from __future__ import annotations

import logging
import os
import socket
from pathlib import Path
from typing import TYPE_CHECKING

from fedmed.config import FedmedConfig
from fedmed.data.demo import cache_root
from fedmed.data.sites import ensure_data, site_data
from fedmed.errors import FedmedError
from fedmed.privacy.accounting import check_delta
from fedmed.run.directory import resolve_run_name, run_path
from fedmed.training.loop import resolve_device

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp


def check_ray_address(address: str, timeout: float = 3.0) -> None:
    """Fail fast, with one clear line, when a given Ray cluster cannot be reached."""
    if not address:
        return
    hostport = address.removeprefix("ray://")
    host, sep, port = hostport.rpartition(":")
    if not sep or not host or not port.isdigit():
        raise FedmedError(f"ray address {address!r} is not HOST:PORT (e.g. 127.0.0.1:6379)")
    try:
        with socket.create_connection((host, int(port)), timeout=timeout):
            pass
    except OSError as exc:
        reason = exc.strerror or type(exc).__name__
        raise FedmedError(
            f"cannot reach a Ray cluster at {address} ({reason}): start one with "
            "`ray start --head` or leave simulation.ray_address empty to start one on this machine"
        ) from None


def backend_config(cfg: FedmedConfig) -> dict:
    sim = cfg.simulation
    init_args: dict = {"address": sim.ray_address} if sim.ray_address else {"num_cpus": os.cpu_count() or 1}
    return {
        "client_resources": {"num_cpus": sim.cpus_per_hospital, "num_gpus": sim.gpus_per_hospital},
        "init_args": init_args,
    }


def prepare(cfg: FedmedConfig) -> FedmedConfig:
    """What a simulated run settles before its first round: its run directory's name, the
    device, absolute data and cache paths (every Ray worker must find the same, whatever
    its working directory), the data generated or decoded and cached, and each hospital's
    delta checked."""
    cfg = resolve_run_name(cfg)
    resolve_device(cfg.train.device)
    absolute = {"cache_dir": str(cache_root(cfg.data.cache_dir).resolve())}
    if cfg.data.path:
        absolute["path"] = str(Path(cfg.data.path).expanduser().resolve())
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=absolute)})
    ensure_data(cfg, announce=print)
    if cfg.privacy.mode == "sample" and cfg.privacy.delta:  # each hospital checks too; fail before starting Ray
        for index in range(cfg.data.hospitals):
            check_delta(cfg.privacy.delta, len(site_data(cfg, index).train.y), "training images at a hospital")
    return cfg


def run_simulation(cfg: FedmedConfig, verbose: bool = False, client_app: ClientApp | None = None) -> Path:
    """Simulate `cfg.data.hospitals` hospitals; returns the run directory. `client_app`
    replaces fedmed's own at every hospital (the audit's tests run a dishonest one)."""
    check_ray_address(cfg.simulation.ray_address)  # before seconds of imports
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedmed.federation import client_app as fedmed_client
    from fedmed.federation import server_app

    cfg = prepare(cfg)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.flat())
    # A ServerApp error (e.g. a FedmedError) is re-raised here as it is.
    _run_simulation(
        num_supernodes=cfg.data.hospitals,
        exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
        client_app=client_app or fedmed_client.app,
        server_app=server_app.app,
        backend_name="ray",
        backend_config=backend_config(cfg),
        server_app_context=context,
        verbose_logging=verbose,
    )
    return run_path(cfg)
