"""The supervisor side of the Ray backend: a vLLM server hosted by a Ray actor.

For each server, :class:`RayServer`:

1. reserves a placement group of one bundle (:data:`DEFAULT_BUNDLE` unless told
   otherwise, strategy ``STRICT_PACK``) named after the run directory and the
   server, and waits at most ``placement_timeout_s`` for Ray to place it. A
   bundle the cluster cannot hold in time is a
   :class:`~watchdog_kv.supervisor.ray.cluster.PlacementTimeout` naming the
   server, the bundle and what the cluster has free, and the placement group
   is removed again;
2. starts a :class:`~watchdog_kv.supervisor.ray.host.ServerHost` actor inside
   that bundle (normal lifetime, no Ray restarts: the supervisor owns the
   restart policy), which starts the server on its node's address, so
   :attr:`RayServer.url` is where the server really answers.

The supervisor sees a :class:`~watchdog_kv.supervisor.launch.ServerProcess`
like any other. :meth:`RayServer.poll` never waits on Ray: a thread asks the
actor every :data:`POLL_INTERVAL_S` for its server's exit code, the pids of the
server's tree and the last log lines, and caches the answer. An actor that dies
(killed, its node lost) reports :data:`ACTOR_LOST_EXIT_CODE` and the cause,
shown by :meth:`RayServer.where` and at the end of :meth:`RayServer.tail`.

Nothing outlives its host. When the actor is gone, :meth:`RayServer.stop`
sends :func:`~watchdog_kv.supervisor.ray.host.reap_tree` to the same node,
which stops whatever is left of the tree it last saw (checked by pid *and*
start time, so a reused pid is never hit). The actor shares the supervisor's
fate: Ray ends it when the supervisor's connection ends. :meth:`RayServer.stop`
then :meth:`RayServer.start` is a restart: a new placement group and a new
actor, possibly on another node. The supervisor's ``WATCHDOG_KV_*``,
``VLLM_*``, ``UCX_*`` (and similar, see :data:`FORWARDED_ENV_PREFIXES`)
variables are passed to the server.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import threading
import time
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from watchdog_kv.supervisor.ray.cluster import (
    PlacementTimeout,
    RayBackendError,
    connect,
    first_line,
    free_and_total,
    remote,
)
from watchdog_kv.supervisor.ray.host import TAIL_LINES, ServerHost, reap_tree
from watchdog_kv.supervisor.servers import ServerSpec
from watchdog_kv.telemetry import get_logger

__all__ = [
    "ACTOR_LOST_EXIT_CODE",
    "DEFAULT_BUNDLE",
    "FORWARDED_ENV_PREFIXES",
    "POLL_INTERVAL_S",
    "RayServer",
]

_log = get_logger("watchdog_kv.supervisor")

DEFAULT_BUNDLE: Mapping[str, float] = {"CPU": 1.0}
"""The resources reserved for one vLLM server (one placement-group bundle)."""

ACTOR_LOST_EXIT_CODE = -9
"""Exit code reported when the actor hosting a server died (its tree dies with it)."""

POLL_INTERVAL_S = 0.5
"""How often the background thread asks each actor for its server's state, seconds."""

FORWARDED_ENV_PREFIXES = (
    "WATCHDOG_KV_",
    "VLLM_",
    "UCX_",
    "NIXL_",
    "HF_",
    "TRANSFORMERS_",
    "OTEL_",
)
"""The supervisor's environment variables, by prefix, that reach the vLLM server."""

_CALL_TIMEOUT_S = 10.0  # one answer from a live actor (poll, tail, stop's margin)
_LAUNCH_TIMEOUT_S = 120.0  # the actor's worker process started and the server spawned


class RayServer:
    """A vLLM server hosted by a Ray actor in its own placement group.

    ``address`` is the cluster's (``None``: ``RAY_ADDRESS`` or the local one);
    ``placement_timeout_s`` bounds the wait for the placement group, seconds;
    ``bundle`` is the resources reserved for the server (default
    :data:`DEFAULT_BUNDLE`).
    """

    def __init__(
        self,
        spec: ServerSpec,
        run_dir: Path,
        *,
        address: str | None,
        placement_timeout_s: float,
        bundle: Mapping[str, float] | None = None,
    ) -> None:
        self.name = spec.name
        self.spec = spec  # once placed: the spec as started, host = the node's address
        self._planned = spec
        self.run_dir = run_dir
        self.address = address
        self.placement_timeout_s = placement_timeout_s
        self.bundle = dict(bundle if bundle is not None else DEFAULT_BUNDLE)
        self._pg: Any = None  # ray.util.placement_group.PlacementGroup
        self._actor: Any = None  # ray.actor.ActorHandle
        self._where: dict[str, Any] = {}
        self._pid: int | None = None
        self._state = _Observed()
        self._watch: _Watch | None = None
        self._generation = 0

    # -- ServerProcess -------------------------------------------------------------------
    @property
    def pid(self) -> int | None:
        """The vLLM API server's pid on its node (the last one, once it is gone)."""
        return self._pid

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def log_path(self) -> Path:
        """The server's log file, on the actor's node."""
        return self.run_dir / "logs" / f"{self.name}.log"

    def start(self) -> None:
        """Place, start the actor, spawn the server; returns once it is spawned.

        Blocks up to ``placement_timeout_s`` plus the actor's start-up. Raises
        :class:`RayBackendError` (a ``StartupError``) with the placement group
        and actor already cleaned up.
        """
        connect(self.address)
        self._drop_actor()
        self._state = _Observed()
        self._pid, self.spec = None, self._planned
        if self._pg is None:
            self._pg = self._place()
        try:
            self._launch()
        except BaseException:
            self._drop_actor()
            self._remove_pg()
            raise
        self._watch = _Watch(self.name, self._actor, self._state)
        self._watch.start()
        _log.info(
            "ray.server_started",
            server=self.name,
            url=self.url,
            pid=self._pid,
            **self._where,
        )

    def poll(self) -> int | None:
        """The server's exit code once it (or its actor) died, else None; never blocks."""
        return self._state.code

    def tail(self, lines: int = 20) -> list[str]:
        """The server's last log lines, as of the last poll; a dead actor's cause last."""
        with self._state.lock:
            cached, cause = list(self._state.tail), self._state.cause
        if lines > TAIL_LINES and self._actor is not None and cause is None:
            with contextlib.suppress(Exception):
                import ray

                cached = ray.get(self._actor.tail.remote(lines), timeout=2.0)
        out = cached[-lines:] if lines > 0 else []
        if cause is not None:
            out.append(f"[ray] {cause}")
        return out

    def stop(self, grace: float = 20.0) -> list[int]:
        """Stop the tree through its actor (or a task on its node if the actor is gone),
        then kill the actor and remove the placement group; the pids SIGKILLed.

        Bounded: never waits longer than ``grace`` plus a few Ray round trips.
        """
        if self._watch is not None:
            self._watch.halt()
            self._watch = None
        killed: list[int] = []
        if self._actor is not None:
            killed = self._stop_tree(grace)
        self._drop_actor()
        self._remove_pg()
        return killed

    def where(self) -> dict[str, Any]:
        """Backend, node, actor and placement group, and why the actor died if it did."""
        out: dict[str, Any] = {"backend": "ray", **self._where}
        if self._pg is not None:
            out["placement_group"] = self._pg.id.hex()
        if self._state.cause is not None:
            out["actor_died"] = self._state.cause
        return out

    # -- steps ---------------------------------------------------------------------------
    def _pg_name(self) -> str:
        return f"watchdog-kv:{self.run_dir.name}:{self.name}:{self._generation}"

    def _place(self) -> Any:
        import ray
        from ray.util.placement_group import placement_group

        self._generation += 1
        began = time.monotonic()
        pg = placement_group([self.bundle], strategy="STRICT_PACK", name=self._pg_name())
        ready, _ = ray.wait([pg.ready()], timeout=self.placement_timeout_s)
        if not ready:
            error = PlacementTimeout(
                self.name,
                self.bundle,
                self.placement_timeout_s,
                *free_and_total(),
            )
            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(pg)
            raise error
        _log.info(
            "ray.placed",
            server=self.name,
            placement_group=pg.id.hex(),
            bundle=self.bundle,
            after_s=round(time.monotonic() - began, 2),
        )
        return pg

    def _launch(self) -> None:
        import ray
        from ray.exceptions import GetTimeoutError, RayActorError, RayTaskError
        from ray.util.scheduling_strategies import PlacementGroupSchedulingStrategy

        custom = {k: v for k, v in self.bundle.items() if k not in ("CPU", "GPU", "memory")}
        self._actor = (
            remote(ServerHost)
            .options(
                num_cpus=self.bundle.get("CPU", 0),
                num_gpus=self.bundle.get("GPU", 0),
                memory=self.bundle.get("memory"),
                resources=custom or None,
                max_restarts=0,  # the supervisor restarts servers, not Ray
                max_task_retries=0,
                scheduling_strategy=PlacementGroupSchedulingStrategy(
                    placement_group=self._pg, placement_group_bundle_index=0
                ),
            )
            .remote()
        )
        forwarded = {k: v for k, v in os.environ.items() if k.startswith(FORWARDED_ENV_PREFIXES)}
        try:
            info = ray.get(
                self._actor.launch.remote(self._planned, self.run_dir, forwarded),
                timeout=_LAUNCH_TIMEOUT_S,
            )
        except GetTimeoutError:
            raise RayBackendError(
                f"the Ray actor for {self.name} did not start its server within "
                f"{_LAUNCH_TIMEOUT_S:g} s"
            ) from None
        except RayActorError as exc:
            raise RayBackendError(
                f"the Ray actor for {self.name} died while starting: {first_line(exc)}"
            ) from exc
        except RayTaskError as exc:
            raise RayBackendError(
                f"the Ray actor for {self.name} failed to start it: {first_line(exc.cause)}"
            ) from exc
        self._where = {k: info[k] for k in ("node_ip", "node_id", "actor_id", "actor_pid")}
        if "error" in info:
            raise RayBackendError(
                f"{self.name} cannot start on Ray node {info['node_ip']}: {info['error']}"
            )
        self.spec = info["spec"]
        self._pid = info["pid"]

    def _stop_tree(self, grace: float) -> list[int]:
        import ray
        from ray.exceptions import RayError

        if self._state.cause is None:  # the actor was alive at the last poll
            try:
                killed, code = ray.get(
                    self._actor.stop.remote(grace), timeout=grace + _CALL_TIMEOUT_S
                )
            except RayError as exc:
                _log.warning("ray.stop_failed", server=self.name, error=first_line(exc))
            else:
                with self._state.lock:
                    if self._state.code is None:
                        self._state.code = code if code is not None else -signal.SIGKILL
                return list(killed)
        killed = self._reap(grace)
        with self._state.lock:
            if self._state.code is None:
                self._state.code = ACTOR_LOST_EXIT_CODE
        return killed

    def _reap(self, grace: float) -> list[int]:
        """Stop the tree last seen from a task on its node (the actor can no longer)."""
        import ray
        from ray.exceptions import RayError
        from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

        with self._state.lock:
            tree = list(self._state.tree)
        node_id = self._where.get("node_id")
        if not tree or self._pid is None or node_id is None:
            return []
        task = remote(reap_tree).options(
            num_cpus=0,
            max_retries=0,
            scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
        )
        try:
            killed: list[int] = ray.get(
                task.remote(self._pid, tree, grace), timeout=grace + _LAUNCH_TIMEOUT_S
            )
        except RayError as exc:
            _log.warning(
                "ray.reap_failed",
                server=self.name,
                node_id=node_id,
                pids=[pid for pid, _ in tree],
                error=first_line(exc),
            )
            return []
        if killed:
            _log.warning("ray.reaped", server=self.name, node_id=node_id, pids=killed)
        return killed

    def _drop_actor(self) -> None:
        if self._watch is not None:
            self._watch.halt()
            self._watch = None
        actor, self._actor = self._actor, None
        if actor is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.kill(actor, no_restart=True)

    def _remove_pg(self) -> None:
        pg, self._pg = self._pg, None
        if pg is not None:
            import ray

            with contextlib.suppress(Exception):
                ray.util.remove_placement_group(pg)


@dataclasses.dataclass
class _Observed:
    """What the watch thread last learned about one actor and its server."""

    code: int | None = None
    cause: str | None = None  # why the actor died, if it did
    tree: list[tuple[int, float]] = dataclasses.field(default_factory=list)
    tail: list[str] = dataclasses.field(default_factory=list)
    lock: threading.Lock = dataclasses.field(default_factory=threading.Lock)


class _Watch(threading.Thread):
    """Asks one actor for its server's state every :data:`POLL_INTERVAL_S`; caches it.

    Stops once the server has exited or the actor has died (neither changes
    again) or when halted.
    """

    def __init__(self, name: str, actor: Any, state: _Observed) -> None:
        super().__init__(name=f"ray-watch-{name}", daemon=True)
        self._server = name
        self._actor = actor
        self._state = state
        self._halted = threading.Event()

    def halt(self) -> None:
        """Stop asking (an answer still in flight is dropped)."""
        self._halted.set()

    def run(self) -> None:
        import ray
        from ray.exceptions import (
            ActorUnavailableError,
            GetTimeoutError,
            RayActorError,
            RayError,
        )

        while not self._halted.is_set():
            try:
                reply = ray.get(self._actor.poll.remote(), timeout=_CALL_TIMEOUT_S)
            except (GetTimeoutError, ActorUnavailableError):
                reply = None  # busy or briefly unreachable: ask again
            except RayActorError as exc:
                self._actor_died(_death_cause(exc))
                return
            except RayError as exc:
                _log.warning("ray.poll_failed", server=self._server, error=first_line(exc))
                reply = None
            if reply is not None:
                with self._state.lock:
                    self._state.tree = reply["tree"] or self._state.tree
                    self._state.tail = reply["tail"]
                    self._state.code = reply["code"]
                if reply["code"] is not None:
                    return
            self._halted.wait(POLL_INTERVAL_S)

    def _actor_died(self, cause: str) -> None:
        if self._halted.is_set():
            return  # stopped on purpose
        with self._state.lock:
            self._state.cause = f"the actor hosting {self._server} died: {cause}"
            self._state.code = ACTOR_LOST_EXIT_CODE
        _log.error("ray.actor_died", server=self._server, cause=cause)


def _death_cause(exc: BaseException) -> str:
    """Why Ray says an actor died, without its identity lines and generic advice."""
    lines = [ln.strip() for ln in str(exc).splitlines() if ln.strip() and not ln[0].isspace()]
    text = " ".join(lines[1:]) or (lines[0] if lines else type(exc).__name__)
    return text.split(" Some common causes include")[0][:400]
