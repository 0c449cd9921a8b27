"""The KV connector: every connector vLLM builds, watched on both sides.

``KVConnectorFactory.create_connector`` -- every connector vLLM builds, of
whatever class the user's ``--kv-transfer-config`` names -- is attached to:

* on the scheduler side (engine core), a
  :class:`~watchdog_kv.kv.scheduler.SchedulerWatch`, told what the connector's
  ``get_num_new_matched_tokens``, ``update_state_after_alloc``,
  ``build_connector_meta`` and ``request_finished`` (or
  ``request_finished_all_groups``) did;
* on the worker side, a :class:`~watchdog_kv.kv.worker.WorkerWatch` around
  ``register_kv_caches``, ``start_load_kv`` and ``get_transfer_results`` (with
  :class:`~watchdog_kv.instrument.nixl.NixlTransport` for a NixlConnector), and,
  when the process has a step watch, the time of each connector call of a step
  (:data:`CONNECTOR_CALLS`) in its beacon.

Each is a layer of its own on the connector instance
(:func:`~watchdog_kv.instrument.base.wrap`): the KV watch and the step timing
both wrap ``start_load_kv`` and ``get_transfer_results`` and are undone in any
order. vLLM's calls run outside our bookkeeping, so its exceptions reach it
untouched. Others (fault injection) hear of each connector through
:attr:`ConnectorInstrumentor.on_connector`.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.instrument.base import Instrumentor, Layer, Target, Wrapper, unwrap, wrap
from watchdog_kv.instrument.nixl import NixlTransport, nixl_worker_of
from watchdog_kv.kv.scheduler import SchedulerWatch
from watchdog_kv.kv.worker import WorkerWatch
from watchdog_kv.step.watch import StepWatch
from watchdog_kv.telemetry import get_logger

__all__ = ["CONNECTOR_CALLS", "Attached", "ConnectorInstrumentor", "attach"]

FACTORY_MODULE = "vllm.distributed.kv_transfer.kv_connector.factory"
# The connector calls of a worker step that move KV or wait on its transport.
# vLLM 0.32's model runner asks get_transfer_results (NIXL's poll for the
# notifications of finished reads, a C call that holds the GIL); get_finished
# is what the base class's get_transfer_results calls for other connectors.
CONNECTOR_CALLS = (
    "handle_preemptions",
    "start_load_kv",
    "wait_for_save",
    "get_transfer_results",
    "get_finished",
    "get_block_ids_with_load_errors",
)

_log = get_logger("watchdog_kv.kv")


@dataclass
class Attached:
    """What is attached to one connector instance, to detach it again."""

    connector: Any
    side: str
    watch: Any = None
    transport: NixlTransport | None = None
    layers: list[Layer] = field(default_factory=list)

    def detach(self) -> None:
        for layer in reversed(self.layers):
            unwrap(layer)
        self.layers.clear()
        if self.transport is not None:
            self.transport.close()
        if self.watch is not None and hasattr(self.watch, "close"):
            self.watch.close()


def _side_channel_host() -> str:
    try:
        import vllm.envs as envs

        host = envs.VLLM_NIXL_SIDE_CHANNEL_HOST
    except Exception:
        host = "127.0.0.1"
    return "127.0.0.1" if host in ("localhost", "") else host


def _metadata(connector: Any) -> Any | None:
    has = getattr(connector, "has_connector_metadata", None)
    if has is not None and not has():
        return None
    return connector._get_connector_metadata()


def _num_blocks(connector: Any) -> int:
    cfg = getattr(connector, "_kv_cache_config", None) or getattr(
        connector, "kv_cache_config", None
    )
    return int(getattr(cfg, "num_blocks", 0) or 0)


def _block_size(connector: Any) -> int:
    cfg = getattr(connector, "_vllm_config", None)
    return int(getattr(getattr(cfg, "cache_config", None), "block_size", 0) or 0)


def _watch_scheduler(connector: Any, watch: SchedulerWatch) -> list[Layer]:
    def matched(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        request = args[0] if args else kwargs["request"]
        fixed = watch.check_params(
            request.request_id,
            request.kv_transfer_params,
            getattr(request, "prompt_token_ids", None),
        )
        if fixed is not None:
            request.kv_transfer_params = fixed
        result = wrapped(*args, **kwargs)
        with contained("kv.get_num_new_matched_tokens", on_error=watch._disable):
            count, load_async = result
            watch.matched(request.request_id, count or 0, bool(load_async))
        return result

    def allocated(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        result = wrapped(*args, **kwargs)
        with contained("kv.update_state_after_alloc", on_error=watch._disable):
            request, blocks, num_external = (
                args[i] if len(args) > i else kwargs[name]
                for i, name in enumerate(("request", "blocks", "num_external_tokens"))
            )
            local: list[int] = []
            size = 0
            if watch.awaiting(request.request_id) and num_external > 0:
                ids = blocks.get_block_ids()
                local = [int(b) for group in ids for b in group] if ids else []
                size = int(getattr(request, "block_size", 0) or _block_size(connector))
            watch.allocated(
                request.request_id, request.kv_transfer_params, local, num_external, size
            )
        return result

    def build_meta(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        metadata = wrapped(*args, **kwargs)
        with contained("kv.build_connector_meta", on_error=watch._disable):
            for name, value in watch.metadata_extras().items():
                setattr(metadata, name, value)
        return metadata

    def finished(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        request = args[0] if args else kwargs["request"]
        delay_free, params = wrapped(*args, **kwargs)
        params = watch.finished(
            request.request_id,
            bool(delay_free),
            params,
            request.kv_transfer_params,
            getattr(request, "prompt_token_ids", None),
        )
        return delay_free, params

    layers = [
        wrap(connector, "get_num_new_matched_tokens", matched),
        wrap(connector, "update_state_after_alloc", allocated),
        wrap(connector, "build_connector_meta", build_meta),
    ]
    # vLLM calls one or the other, depending on whether the connector supports HMA.
    for name in ("request_finished", "request_finished_all_groups"):
        if hasattr(connector, name):
            layers.append(wrap(connector, name, finished))
    return layers


def _watch_worker(connector: Any, watch: WorkerWatch) -> list[Layer]:
    def register(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        result = wrapped(*args, **kwargs)
        with contained("kv.register_kv_caches", on_error=watch._disable):
            caches = args[0] if args else kwargs["kv_caches"]
            total = sum(int(t.numel() * t.element_size()) for t in caches.values())
            watch.kv_caches_registered(total, _num_blocks(connector))
        return result

    def start_load(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        metadata = None
        with contained("kv.metadata"):
            metadata = _metadata(connector)
        watch.before_load(metadata)
        result = wrapped(*args, **kwargs)
        watch.after_load()
        return result

    def transfer_results(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        results = wrapped(*args, **kwargs)
        finished = args[0] if args else kwargs.get("finished_req_ids", set())
        watch.results(results.finished_recving, results.failed_recving, finished)
        return results

    return [
        wrap(connector, "register_kv_caches", register),
        wrap(connector, "start_load_kv", start_load),
        wrap(connector, "get_transfer_results", transfer_results),
    ]


def _time_calls(connector: Any, step: StepWatch) -> list[Layer]:
    def timed(name: str) -> Wrapper:
        def call(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            with step.connector_call(name):
                return wrapped(*args, **kwargs)

        return call

    return [
        wrap(connector, name, timed(name))
        for name in CONNECTOR_CALLS
        if callable(getattr(connector, name, None))
    ]


def attach(
    connector: Any,
    side: str,
    settings: Any,
    rank: int = 0,
    *,
    kv: bool = True,
    step: StepWatch | None = None,
) -> Attached:
    """Attach the KV watch of ``side`` (``scheduler`` or ``worker``) and, on a worker,
    the step timing to ``connector``."""
    name = type(connector).__name__
    got = Attached(connector, side)
    if side == "scheduler" and kv:
        got.watch = SchedulerWatch(settings, name)
        got.layers += _watch_scheduler(connector, got.watch)
    elif side == "worker":
        if kv:
            nixl_worker = nixl_worker_of(connector)
            if nixl_worker is not None:
                got.transport = NixlTransport(nixl_worker)
            got.watch = WorkerWatch(
                settings,
                rank,
                transport=got.transport,
                lease_host=_side_channel_host() if got.transport is not None else "127.0.0.1",
                connector=name,
            )
            if got.transport is not None:
                got.transport._on_event = got.watch._event
            got.layers += _watch_worker(connector, got.watch)
        if step is not None:  # outermost: the connector call's time includes the watch's
            got.layers += _time_calls(connector, step)
    return got


class ConnectorInstrumentor(Instrumentor):
    name = "kv.connector_factory"
    targets = (Target(FACTORY_MODULE, "KVConnectorFactory", "create_connector"),)

    def __init__(
        self,
        rank: int | None,
        publish: Callable[[dict[str, Any]], None] | None,
        step: StepWatch | None = None,
    ) -> None:
        super().__init__()
        self.rank = rank or 0
        self.publish = publish
        self.step = step
        self.attached: list[Attached] = []
        self.on_connector: list[Callable[[Attached], None]] = []
        self._held_back: set[int] = set()  # watches with a change not yet published
        self._publish_lock = threading.Lock()

    def hooks(self) -> list[str]:
        if not self.patched:
            return []
        return ["kv.connector_factory"] + (["step.connector"] if self.step is not None else [])

    def wrapper(self, target: Target) -> Wrapper:
        def create_connector(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            connector = wrapped(*args, **kwargs)
            role = kwargs.get("role", args[1] if len(args) > 1 else None)
            with contained("kv.attach"):
                self._attach(connector, str(getattr(role, "name", role)).lower())
            return connector

        return create_connector

    def _attach(self, connector: Any, side: str) -> None:
        if side not in ("scheduler", "worker") or not self.active:
            return
        got = attach(connector, side, self.settings, self.rank, step=self.step)
        if isinstance(got.watch, WorkerWatch):
            got.watch.on_change = self._throttled(got)
        self.attached.append(got)
        for listener in self.on_connector:
            with contained("kv.on_connector"):
                listener(got)
        _log.info("kv.watching", connector=type(connector).__name__, side=side)
        self._report(got)

    def teardown(self) -> None:
        for got in self.attached:
            got.detach()
        self.attached.clear()
        self._held_back.clear()

    def watches(self) -> list[Any]:
        return [a.watch for a in self.attached if a.watch is not None]

    # -- status ----------------------------------------------------------------------------
    def _report(self, got: Attached) -> None:
        """Publish the watch's status (workers have one) into the process's status record."""
        if self.publish is None or got.watch is None:
            return
        status = getattr(got.watch, "status", None)
        extra = status() if status is not None else {}
        self.publish({"side": got.side, "connector": type(got.connector).__name__, **extra})

    def _throttled(self, got: Attached) -> Callable[[], None]:
        """At most one status write a second from the engine step; a change held back is
        written by :meth:`flush`."""
        last = [0.0]

        def changed() -> None:
            now = time.monotonic()
            with self._publish_lock:
                if now - last[0] < 1.0:
                    self._held_back.add(id(got))
                    return
                last[0] = now
                self._held_back.discard(id(got))
            self._report(got)

        return changed

    def flush(self) -> None:
        """Publish the status changes the throttle held back (the plugin calls this every
        few seconds from its own thread), so the status record ends up with the last state."""
        with self._publish_lock:
            due = [a for a in self.attached if id(a) in self._held_back]
            self._held_back.clear()
        for got in due:
            with contained("kv.status"):
                self._report(got)
