"""What watchdog_kv needs from NixlConnector beyond the connector interface.

The generic hooks (:mod:`watchdog_kv.kv.worker`) see requests enter and leave a
connector. Three things need the connector's insides, and this adapter is the
only module that touches them (tested against vLLM 0.32's NIXL connector):

* **phase** of a load: handshaking (the remote engine is not known yet) or
  pulling (a read is posted);
* **cancel** a load: release its transfer handles -- NIXL cancels an active
  read or refuses, in which case nothing is released and the caller retries --
  then forget the request and fence it, so a handshake that finishes later
  cannot post a read into blocks that went back to vLLM;
* the **lease** side on a prefill: which kept requests a decode reported as
  read, which expired, and reads reported for requests no longer kept.

Every wrapper here is an instance attribute (:mod:`watchdog_kv.patching`),
removed by :meth:`NixlAdapter.unhook`.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.kv.states import IllegalTransition, LeaseEvent, LeaseTable, RecentSet
from watchdog_kv.patching import InstancePatches
from watchdog_kv.telemetry import get_logger

__all__ = ["NixlAdapter", "nixl_worker_of"]

_log = get_logger("watchdog_kv.kv.nixl")


def nixl_worker_of(connector: Any) -> Any | None:
    """The NIXL worker object behind ``connector``, or None for any other connector."""
    worker = getattr(connector, "connector_worker", None)
    needed = ("_recving_transfers", "_recving_metadata", "_remote_agents", "nixl_wrapper")
    if worker is None or not all(hasattr(worker, name) for name in needed):
        return None
    return worker


class NixlAdapter:
    def __init__(
        self,
        worker: Any,
        leases: LeaseTable,
        stall_handshake_s: float,
        on_event: Callable[..., None],
    ) -> None:
        self.worker = worker
        self.leases = leases
        self.fenced = RecentSet()
        self._on_event = on_event
        self._patches = InstancePatches()
        self._patch(worker, "_read_blocks_for_req", self._read_blocks_for_req)
        self._patch(worker, "_reap_expired_send_leases", self._reap_expired_send_leases)
        self._patch(worker, "_get_new_notifs", self._get_new_notifs)
        self._patch(worker.nixl_wrapper, "get_new_notifs", self._raw_notifs)
        if stall_handshake_s > 0:
            self._stall_s = stall_handshake_s
            self._patch(worker, "_nixl_handshake", self._stalled_handshake)

    # --- wiring -------------------------------------------------------------
    def _patch(self, obj: Any, name: str, replacement: Callable[..., Any]) -> None:
        setattr(self, f"_orig_{name}", self._patches.replace(obj, name, replacement))

    def unhook(self) -> None:
        self._patches.undo()

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

    def _read_blocks_for_req(self, req_id: str, meta: Any) -> Any:
        fenced = False
        with contained("kv.nixl_fence"):
            fenced = req_id in self.fenced
        if fenced:
            # A handshake that finished after the load was cancelled: its blocks are
            # no longer this request's, so no read may be posted into them.
            self._on_event("kv.late_read_fenced", request_id=req_id)
            return None
        return self._orig__read_blocks_for_req(req_id, meta)  # type: ignore[attr-defined]

    def _stalled_handshake(self, *args: Any, **kwargs: Any) -> Any:
        # Runs on NIXL's handshake thread, as a peer that does not answer would.
        with contained("kv.nixl_fault"):
            self._on_event("kv.fault_injected", fault="stall_handshake", seconds=self._stall_s)
        time.sleep(self._stall_s)
        return self._orig__nixl_handshake(*args, **kwargs)  # type: ignore[attr-defined]

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

    def _raw_notifs(self) -> Any:
        notifs = self._orig_get_new_notifs()  # type: ignore[attr-defined]
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

    def _get_new_notifs(self) -> set[str]:
        read: set[str] = self._orig__get_new_notifs()  # type: ignore[attr-defined]
        with contained("kv.nixl_reads"):
            for req_id in read:
                if self._lease_apply(req_id, LeaseEvent.READ):
                    self._lease_apply(req_id, LeaseEvent.RELEASE)
        return read

    def _reap_expired_send_leases(self, done_sending: set[str]) -> None:
        before = set(self.worker._reqs_to_send)
        self._orig__reap_expired_send_leases(done_sending)  # type: ignore[attr-defined]
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
