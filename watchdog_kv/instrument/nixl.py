"""NIXL: its agent's progress thread, and what the KV watch needs of NixlConnector.

:class:`NixlInstrumentor` wraps the ``nixlAgent`` binding of NIXL's Python API,
which creates every agent with ``pthrDelay = 0``, so its UCX progress thread
polls with a zero timeout: a busy loop taking one full core per vLLM worker,
idle or not. With ``WATCHDOG_KV_NIXL_PROGRESS_DELAY_US`` > 0 the agent gets that
poll timeout instead; the thread still wakes on UCX's event file descriptors, so
transfers and notifications are not delayed by it.

The connector watch (:mod:`watchdog_kv.kv.worker`) sees requests enter and leave
a connector. Three things need NixlConnector's insides, and
:class:`NixlTransport` is the only code that touches them (:data:`WORKER_TARGETS`,
checked against the installed vLLM):

* **phase** of a load: handshaking (the remote engine is not known yet) or
  pulling (a read is posted);
* **cancel** a load: release its transfer handles -- NIXL cancels an active
  read or refuses, in which case nothing is released and the caller retries --
  then forget the request and fence it, so a handshake that finishes later
  cannot post a read into blocks that went back to vLLM;
* the **lease** side on a prefill: which kept requests a decode reported as
  read, which expired, and reads reported for requests no longer kept.

Every wrapper of :class:`NixlTransport` is a layer on the NIXL worker object
(:func:`watchdog_kv.instrument.base.wrap`), removed by :meth:`NixlTransport.close`.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.instrument.base import Instrumentor, Layer, Target, Wrapper, unwrap, wrap
from watchdog_kv.kv.states import IllegalTransition, LeaseEvent, LeaseTable, RecentSet
from watchdog_kv.telemetry import get_logger

__all__ = ["WORKER_TARGETS", "NixlInstrumentor", "NixlTransport", "nixl_worker_of"]

_log = get_logger("watchdog_kv.kv.nixl")

NIXL_BINDINGS = ("nixl_cu12._bindings", "nixl_cu13._bindings", "nixl_rocm._bindings")
_NIXL = "vllm.distributed.kv_transfer.kv_connector.v1.nixl"
# The NIXL worker's methods the transport wraps on each instance.
WORKER_TARGETS = (
    Target(f"{_NIXL}.pull_worker", "NixlPullConnectorWorker", "_read_blocks_for_req"),
    Target(f"{_NIXL}.base_worker", "NixlBaseConnectorWorker", "_reap_expired_send_leases"),
    Target(f"{_NIXL}.base_worker", "NixlBaseConnectorWorker", "_get_new_notifs"),
    Target(f"{_NIXL}.base_worker", "NixlBaseConnectorWorker", "_nixl_handshake"),
)
# ... and the state it reads and edits.
WORKER_STATE = (
    "_recving_transfers",
    "_recving_metadata",
    "_remote_agents",
    "_recv_failures",
    "_pending_recv_notifs",
    "_reqs_to_send",
    "_reqs_to_process",
    "nixl_wrapper",
)


class NixlInstrumentor(Instrumentor):
    """The progress-delay setting of every NIXL agent created here."""

    name = "kv.nixl_progress_delay"
    targets = tuple(Target(m, "", "nixlAgent", optional=True) for m in NIXL_BINDINGS)

    def wrapper(self, target: Target) -> Wrapper:
        delay = self.settings.nixl_progress_delay_us

        def nixl_agent(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            with contained("kv.nixl_progress_delay"):
                config = args[1] if len(args) > 1 else kwargs.get("agent_config")
                if getattr(config, "pthrDelay", None) == 0:
                    config.pthrDelay = delay
                    _log.info(
                        "kv.nixl_progress_delay", agent=args[0] if args else "", delay_us=delay
                    )
            return wrapped(*args, **kwargs)

        return nixl_agent


def nixl_worker_of(connector: Any) -> Any | None:
    """The NIXL worker object behind ``connector``, or None for any other connector (or a
    NixlConnector without the state this module reads: logged by name)."""
    worker = getattr(connector, "connector_worker", None)
    if worker is None or not hasattr(worker, "_recving_transfers"):
        return None
    missing = [n for n in WORKER_STATE if not hasattr(worker, n)]
    missing += [t.label for t in WORKER_TARGETS if not callable(getattr(worker, t.name, None))]
    if missing:
        _log.error(
            "watchdog_kv.instrumentor_off",
            instrumentor="kv.nixl_transport",
            missing=missing,
            consequence="loads are watched without NIXL's phases, cancel or lease side",
        )
        return None
    return worker


class NixlTransport:
    def __init__(self, worker: Any, on_event: Callable[..., None] | None = None) -> None:
        self.worker = worker
        self.leases = LeaseTable()  # the watch puts its own in place
        self.fenced = RecentSet()
        self._on_event = on_event or (lambda event, **fields: None)
        self._layers: list[Layer] = []
        self._orig: dict[str, Callable[..., Any]] = {}
        self._patch(worker, "_read_blocks_for_req", self._read_blocks_for_req)
        self._patch(worker, "_reap_expired_send_leases", self._reap_expired_send_leases)
        self._patch(worker, "_get_new_notifs", self._get_new_notifs)
        self._patch(worker.nixl_wrapper, "get_new_notifs", self._raw_notifs)

    # --- wiring -------------------------------------------------------------
    def _patch(self, obj: Any, name: str, replacement: Callable[..., Any]) -> None:
        def layer(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            return replacement(wrapped, *args, **kwargs)

        self._layers.append(wrap(obj, name, layer))

    def close(self) -> None:
        for layer in reversed(self._layers):
            unwrap(layer)
        self._layers.clear()

    # --- decode side --------------------------------------------------------
    def phase(self, req_id: str, remote_engine_id: str | None) -> str:
        """``pulling`` when a read is posted, ``handshaking`` while the remote is unknown."""
        if self.worker._recving_transfers.get(req_id):
            return "pulling"
        if remote_engine_id is not None and remote_engine_id not in self.worker._remote_agents:
            return "handshaking"
        return "waiting"

    def cancel(self, req_id: str) -> bool:
        """Stop the load of ``req_id``; False if NIXL could not cancel a read (retry later)."""
        self.fenced.add(req_id)
        handles = self.worker._recving_transfers.get(req_id, [])
        kept = []
        for handle in handles:
            try:
                self.worker.nixl_wrapper.release_xfer_handle(handle)
            except Exception as exc:  # NIXL: the read is active and could not be cancelled
                kept.append(handle)
                _log.warning("kv.cancel_refused", request_id=req_id, error=str(exc))
        if kept:
            self.worker._recving_transfers[req_id] = kept
            return False
        self.worker._recving_transfers.pop(req_id, None)
        self.worker._recving_metadata.pop(req_id, None)
        self.worker._recv_failures.discard(req_id)
        self.worker._pending_recv_notifs.pop(req_id, None)
        return True

    def _read_blocks_for_req(self, original: Any, req_id: str, meta: Any) -> Any:
        fenced = False
        with contained("kv.nixl_fence"):
            fenced = req_id in self.fenced
        if fenced:
            # A handshake that finished after the load was cancelled: its blocks are
            # no longer this request's, so no read may be posted into them.
            self._on_event("kv.late_read_fenced", request_id=req_id)
            return None
        return original(req_id, meta)

    # --- prefill side -------------------------------------------------------
    def observe_metadata(self, metadata: Any) -> None:
        """Kept and leased requests announced to this worker by its scheduler."""
        for req_id in getattr(metadata, "reqs_in_batch", ()):
            self.leases.hold(req_id)
        for req_id in getattr(metadata, "reqs_to_send", {}):
            # NIXL ignores an expiry for a request a decode already read (async
            # scheduling); hold() does not bring a released entry back either.
            self.leases.hold(req_id)
            self._lease_apply(req_id, LeaseEvent.LEASE)
        for req_id in getattr(metadata, "reqs_not_processed", ()):
            if self._lease_apply(req_id, LeaseEvent.ABORT):
                self._lease_apply(req_id, LeaseEvent.RELEASE)

    def _raw_notifs(self, original: Any) -> Any:
        notifs = original()
        with contained("kv.nixl_notifs"):
            self._see_stale_reads(notifs)
        return notifs

    def _see_stale_reads(self, notifs: Any) -> None:
        kept = set(self.worker._reqs_to_send) | set(self.worker._reqs_to_process)
        for messages in notifs.values():
            for raw in messages:
                msg = raw.decode("utf-8", "replace")
                if msg.startswith("HB:"):
                    continue
                req_id = msg.rsplit(":", 1)[0]
                if req_id not in kept:
                    before = self.leases.stale_reads
                    self._lease_apply(req_id, LeaseEvent.READ)
                    if self.leases.stale_reads > before:
                        self._on_event("kv.stale_read_detected", request_id=req_id)

    def _get_new_notifs(self, original: Any) -> set[str]:
        read: set[str] = original()
        with contained("kv.nixl_reads"):
            for req_id in read:
                if self._lease_apply(req_id, LeaseEvent.READ):
                    self._lease_apply(req_id, LeaseEvent.RELEASE)
        return read

    def _reap_expired_send_leases(self, original: Any, done_sending: set[str]) -> None:
        before = set(self.worker._reqs_to_send)
        original(done_sending)
        with contained("kv.nixl_expiry"):
            for req_id in before - set(self.worker._reqs_to_send):
                self._on_event("kv.lease_expired", request_id=req_id)
                if self._lease_apply(req_id, LeaseEvent.EXPIRE):
                    self._lease_apply(req_id, LeaseEvent.RELEASE)

    def _lease_apply(self, req_id: str, event: LeaseEvent) -> bool:
        try:
            self.leases.apply(req_id, event)
            return True
        except IllegalTransition:
            return False
