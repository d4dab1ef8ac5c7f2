"""The Ray runtime under fedmed's simulations: one run's, or one shared by a sweep's runs.

Flower's Simulation Engine builds its Ray backend for every run and tears it down at the
end: its actors (each a Python process that imports torch and fedmed's ClientApp, seconds
apiece) are stopped, and Ray with them. A study of many short runs paid that each time.
Within `shared()`, fedmed's backend keeps Ray and its actor pool for the next run instead;
each run is still a run of its own (its LinkState, its nodes' contexts, its run
directory), and every actor forgets the data it cached for the previous run before it
serves the next. Flower 1.41 has no registry of backends: its engine builds
`raybackend.RayBackend` by name (vce_api.start_vce), so `installed()` puts fedmed's in that
name's place for the length of a run.

Actors are stopped with `ray.kill`, not Flower's `terminate` (which logs "Manually
terminating ClientAppActor" from every actor at the end of every run).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass

import ray
from flwr.clientapp import ClientApp
from flwr.server.superlink.fleet.vce.backend import raybackend
from flwr.simulation.ray_transport.ray_actor import BasicActorPool, VirtualClientEngineActor

from fedmed.data import sites
from fedmed.run import interrupt


@ray.remote
class HospitalActor(VirtualClientEngineActor):
    """Flower's ClientAppActor, plus `forget` between the runs of a shared pool."""

    def __init__(self, on_actor_init_fn: Callable[[], None] | None = None) -> None:
        if on_actor_init_fn:
            on_actor_init_fn()

    def forget(self) -> None:
        sites.forget()


@dataclass
class SharedRuntime:
    """What `shared()` keeps between runs: the actor pool, and the resources it was built for."""

    pool: BasicActorPool | None = None
    resources: dict | None = None
    pools_started: int = 0  # how many actor pools the runs built (1 when every run reused the first)

    def take(self, resources: dict) -> BasicActorPool | None:
        """The kept pool, its actors cleared of the last run's data; None (and the pool
        stopped) if it was built for other resources or an actor died."""
        pool, self.pool = self.pool, None
        if pool is None:
            return None
        if resources == self.resources:
            try:
                ray.get([actor.forget.remote() for actor in pool.pool])
                return pool
            except ray.exceptions.RayError:
                pass
        _stop_actors(pool)
        return None

    def keep(self, pool: BasicActorPool, resources: dict) -> None:
        self.pool, self.resources = pool, resources

    def close(self) -> None:
        if self.pool is not None:
            _stop_actors(self.pool)
            self.pool = None
        if ray.is_initialized():
            ray.shutdown()


_shared: SharedRuntime | None = None


def _stop_actors(pool: BasicActorPool) -> None:
    for actor in [*pool.pool, *pool._future_to_actor.values()]:
        try:
            ray.kill(actor, no_restart=True)
        except ray.exceptions.RayError:
            pass  # already gone
    pool.pool.clear()
    pool._future_to_actor.clear()


class FedmedRayBackend(raybackend.RayBackend):
    """Flower's Ray backend, with fedmed's actors: within `shared()`, its pool and Ray
    outlive the run; otherwise both are stopped quietly at its end."""

    def build(self, app_fn: Callable[[], ClientApp]) -> None:
        self.app_fn = app_fn
        self.pool = _shared.take(self.client_resources) if _shared is not None else None
        if self.pool is None:
            self.pool = BasicActorPool(actor_type=HospitalActor, client_resources=self.client_resources, actor_kwargs=self.actor_kwargs)
            self.pool.add_actors_to_pool(self.pool.actors_capacity)
            if _shared is not None:
                _shared.pools_started += 1

    def terminate(self) -> None:
        """Keep the pool for the next run when every actor is back and idle (a run that
        ended cleanly); stop it, and Ray, when the run was stopped by a signal."""
        pool, self.pool = self.pool, None
        if _shared is not None and interrupt.requested() is None:
            if pool is not None and not pool._future_to_actor and len(pool.pool) == pool.num_actors:
                _shared.keep(pool, self.client_resources)
            elif pool is not None:
                _stop_actors(pool)  # an actor still busy or lost: the next run starts a new pool
            return
        if pool is not None:
            _stop_actors(pool)
        ray.shutdown()


@contextmanager
def installed() -> Iterator[None]:
    """Flower's engine builds fedmed's backend for the runs started within."""
    original = raybackend.RayBackend
    raybackend.RayBackend = FedmedRayBackend
    try:
        yield
    finally:
        raybackend.RayBackend = original


@contextmanager
def shared() -> Iterator[SharedRuntime]:
    """The runs within share one Ray runtime (started by the first, or the cluster it
    attaches to) and one actor pool; both are stopped on the way out. Within another
    `shared()`, the outer one's, kept until it ends."""
    global _shared
    if _shared is not None:
        yield _shared
        return
    _shared = runtime = SharedRuntime()
    try:
        yield runtime
    finally:
        _shared = None
        runtime.close()
