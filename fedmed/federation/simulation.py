"""Run the ServerApp and ClientApp on Flower's Simulation Engine (Ray backend).

`flwr run` reaches the same engine through a detached SuperLink of its own on a fixed
port; fedmed calls the engine's entry point in-process instead (the function the
SuperLink's simulation process calls), so a run needs no background service and
the run config is passed straight to the ServerApp.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from fedmed import config as config_mod
from fedmed.config import PATH_KEYS, REDACTED, FedmedConfig
from fedmed.data.demo import cache_root
from fedmed.data.sites import ensure_data, train_sizes
from fedmed.errors import FedmedError
from fedmed.federation import checkpoint, sampling
from fedmed.ledger.keys import KeyStore, default_key_store
from fedmed.privacy.accounting import check_delta
from fedmed.run import interrupt
from fedmed.run.directory import RunDirectory, resolve_run_name, run_path
from fedmed.training.loop import resolve_device

if TYPE_CHECKING:
    from flwr.clientapp import ClientApp

SETTLE_S = 5.0  # after a signal: how long the ServerApp's thread may take to record where the run stopped
# A local Ray's shared-memory object store. Ray's default is 30% of the machine's memory;
# a round's messages (a model and its metrics, each way, for the hospitals training at
# once) need far less: 45 MB for a ResNet-18, 0.25 MB for the quickstart's CNN. Ray's
# floor is 75 MiB (ray_constants.OBJECT_STORE_MINIMUM_MEMORY_BYTES); more spills to disk.
OBJECT_STORE_BYTES = 192 * 1024 * 1024


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
    """A cluster given by address keeps its own settings; a local Ray starts without its
    dashboard and with a small object store (OBJECT_STORE_BYTES)."""
    sim = cfg.simulation
    init_args: dict = (
        {"address": sim.ray_address}
        if sim.ray_address
        else {"num_cpus": os.cpu_count() or 1, "include_dashboard": False, "object_store_memory": OBJECT_STORE_BYTES}
    )
    return {
        "client_resources": {"num_cpus": sim.cpus_per_hospital, "num_gpus": sim.gpus_per_hospital},
        "init_args": init_args,
    }


def prepare(cfg: FedmedConfig, resume: bool = False) -> FedmedConfig:
    """What a simulated run settles before its first round: its run directory's name (a
    resumed run's is its own), the device, absolute data and cache paths (every Ray worker
    must find the same, whatever its working directory), the data generated or decoded and
    cached, and each hospital's delta checked."""
    cfg = cfg if resume else resolve_run_name(cfg)
    resolve_device(cfg.train.device)
    absolute = {"cache_dir": str(cache_root(cfg.data.cache_dir).resolve())}
    if cfg.data.path:
        absolute["path"] = str(Path(cfg.data.path).expanduser().resolve())
    cfg = cfg.model_copy(update={"data": cfg.data.model_copy(update=absolute)})
    ensure_data(cfg, announce=print)
    if cfg.privacy.mode == "sample" and cfg.privacy.delta:  # each hospital checks too; fail before starting Ray
        check_delta(cfg.privacy.delta, max(train_sizes(cfg)), "training images at a hospital")
    return cfg


def resume_config(run: Path, overrides: list[str] | None = None, values: dict[str, Any] | None = None) -> FedmedConfig:
    """The settings to continue the simulated run in `run` with (`fedmed simulate --resume`):
    its config.toml, with the paths on this machine it does not record given again
    (`overrides`, `values`: --set, --ray-address), and its output its own directory.
    One line (FedmedError) if it cannot be continued: not a run directory, a baseline,
    finished, no checkpoint, or settings that differ from those it started with."""
    out = RunDirectory(run)
    if not (out / RunDirectory.CONFIG).is_file():
        raise FedmedError(f"{run} is not a run directory (no {RunDirectory.CONFIG}): nothing to resume")
    where = run.resolve()
    cfg = config_mod.load(out / RunDirectory.CONFIG, overrides, {**(values or {}), "output.dir": str(where.parent), "output.name": where.name})
    if cfg.federation.mode != "federated":
        raise FedmedError(f"{run} is a {cfg.federation.mode} baseline: baselines keep no checkpoint to resume from; run it again")
    status = out.status() or {}
    if status.get("state") == "finished" or (out / RunDirectory.SUMMARY).is_file():
        raise FedmedError(f"{run} has finished: nothing to resume")
    flat = cfg.flat()
    unrecorded = [key for key in PATH_KEYS if flat[key] == REDACTED]
    for key in unrecorded:
        if key == "data.cache_dir":  # a cache only: the default one serves (the data is made again if needed)
            flat[key] = ""
        else:
            raise FedmedError(f"{run} does not record {key} (a path on the machine it ran on): give it again with --set {key}=PATH")
    cfg = config_mod.from_flat(flat)
    previous = checkpoint.load(out, KeyStore(default_key_store()))  # one line if no round finished, or signed by another key
    if previous.config_sha256 != cfg.digest():
        raise FedmedError(f"the settings differ from those {run} started with: resume it with its own (only paths, data.workers and simulation settings may change)")
    out.checked_rounds()
    return cfg


def ray_environment() -> None:
    """Settings Ray reads from the environment, some as it is imported: set before."""
    os.environ.setdefault("FLWR_TELEMETRY_ENABLED", "0")
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    # Stopping on a signal: Ray's C++ failure handler would take SIGTERM from fedmed's (and
    # abort with a stack dump), and a driver whose Ray processes a signal to the process
    # group stopped first would wait 5 s to flush its task events to them.
    os.environ.setdefault("RAY_DISABLE_FAILURE_SIGNAL_HANDLER", "1")
    os.environ.setdefault("RAY_task_events_shutdown_flush_timeout_ms", "500")


def run_simulation(cfg: FedmedConfig, verbose: bool = False, client_app: ClientApp | None = None, resume: Path | None = None) -> Path:
    """Simulate `cfg.data.hospitals` hospitals; returns the run directory. `client_app`
    replaces fedmed's own at every hospital (the audit's tests run a dishonest one).
    `resume`: the run directory to continue (its settings from `resume_config`).
    Within `interrupt.stop_on_signals()`, a signal stops the run: Ray and its workers
    are stopped, the run directory is marked interrupted, and Interrupted says where.
    Within `ray_runtime.shared()`, Ray and its actors are kept for the next run."""
    check_ray_address(cfg.simulation.ray_address)  # before seconds of imports
    ray_environment()
    from flwr.app import Context, RecordDict
    from flwr.simulation.run_simulation import _run_simulation
    from flwr.supercore.telemetry import EventType

    from fedmed.federation import client_app as fedmed_client
    from fedmed.federation import ray_runtime, server_app

    cfg = prepare(cfg, resume=resume is not None)
    if not verbose:
        logging.getLogger("flwr").setLevel(logging.WARNING)
    context = Context(run_id=0, node_id=0, node_config={}, state=RecordDict(), run_config=cfg.flat())
    before = set(threading.enumerate())
    if resume is not None:
        os.environ[server_app.RESUME_RUN] = str(resume)
    else:
        os.environ.pop(server_app.RESUME_RUN, None)
    try:
        # A ServerApp error (e.g. a FedmedError) is re-raised here as it is. A signal
        # raises interrupt.Stop here (in this, the main thread): the engine stops Ray on
        # its way out, and the ServerApp's thread, seeing it, records where the run stopped.
        with _our_sigterm(), ray_runtime.installed():
            _run_simulation(
                num_supernodes=sampling.seats_needed(cfg.data.hospitals, cfg.federation.fraction_train, cfg.federation.fraction_evaluate),
                exit_event=EventType.PYTHON_API_RUN_SIMULATION_LEAVE,
                client_app=client_app or fedmed_client.app,
                server_app=server_app.app,
                backend_name="ray",
                backend_config=backend_config(cfg),
                server_app_context=context,
                verbose_logging=verbose,
            )
    except interrupt.Stop:
        pass
    except SystemExit as exc:  # Ray's SIGTERM handler after all (see _our_sigterm): it exits
        if exc.code != signal.SIGTERM or not interrupt.record(signal.SIGTERM):
            raise
    finally:
        os.environ.pop(server_app.RESUME_RUN, None)
    signum = interrupt.requested()
    if signum is None:
        return run_path(cfg)
    interrupt.take_over()  # a second signal, while the run settles, is only recorded
    _settle(before)
    interrupt.end_started(grace=1.0)  # a local Ray's workers that its shutdown left running
    stopped = _interrupted(cfg, signum)
    if stopped is None:  # the run had finished when the signal came
        return run_path(cfg)
    raise stopped


@contextmanager
def _our_sigterm() -> Iterator[None]:
    """`ray.init` installs a SIGTERM handler of its own, which exits at once, leaving the
    ServerApp's thread running on and Ray's processes to abort: while fedmed stops the
    run on signals (`interrupt.stop_on_signals`), Ray is kept from replacing fedmed's."""
    if not interrupt.watching():
        yield
        return
    from ray._private import utils

    original = getattr(utils, "set_sigterm_handler", None)
    if original is not None:
        utils.set_sigterm_handler = lambda handler: None
    try:
        yield
    finally:
        if original is not None:
            utils.set_sigterm_handler = original


def _settle(before: set[threading.Thread]) -> None:
    """Wait (SETTLE_S at most) for the threads the run started: the ServerApp's records
    where it stopped, the engine's workers end."""
    deadline = time.monotonic() + SETTLE_S
    for thread in set(threading.enumerate()) - before:
        if not thread.daemon and thread is not threading.current_thread():
            thread.join(max(0.0, deadline - time.monotonic()))


def _interrupted(cfg: FedmedConfig, signum: int) -> interrupt.Interrupted | None:
    """The line saying where the run stopped, from its status file (its checkpoint if the
    ServerApp could not write it in time); None if the run had finished."""
    path = run_path(cfg)
    out = RunDirectory(path)
    status = out.status() or {}
    if status.get("state") == "finished":
        return None
    after = status.get("after_round")
    if status.get("state") != "interrupted" or not isinstance(after, int):
        try:
            after = checkpoint.load(out, KeyStore(default_key_store())).round
        except FedmedError:
            after = 0
    how, rounds = f"interrupted ({interrupt.signal_name(signum)})", cfg.federation.rounds
    if after < 1:
        return interrupt.Interrupted(f"{how} before round 1 of {rounds} finished: nothing to resume; run it again", signum)
    return interrupt.Interrupted(f"{how} after round {after} of {rounds}: run `fedmed simulate --resume {path}` to continue", signum)
