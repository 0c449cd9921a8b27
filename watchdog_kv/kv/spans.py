"""The KV hand-off's spans, driven by the watch's state machines.

Decode side (worker), under the router's ``decode`` call::

    kv.load                      admitted -> received / recomputed / failed / aborted
      kv.handshake               meeting the prefill's engine
      kv.pull                    the transfer posted -> done
      kv.lease_check             asking the prefill whether its lease held

Prefill side (worker), under the router's ``prefill`` call::

    kv.lease                     blocks kept for a decode -> released (read, expired, aborted)

Phase spans open and close on the transitions of :class:`~watchdog_kv.kv.states.RecvTable`
and :class:`~watchdog_kv.kv.states.LeaseTable`, so a span says exactly what the state
machine saw. Every detection and recovery the watch logs for a request is also an
event on its innermost open span, with ``watchdog.cause`` (transport, lease_expiry,
bad_input, fault) and ``watchdog.action``.

The parent of each root span is the ``traceparent`` the router put into the request's
``kv_transfer_params``; the scheduler side hands it to the workers (the decode's in the
load plan, the prefill's on the connector metadata). A request without one is not
traced here. Failures of this module stop its tracing only (logged).
"""

from __future__ import annotations

from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.kv.states import Lease, Recv
from watchdog_kv.telemetry.tracing import RequestSpans

__all__ = ["KVSpans", "cause_of"]

_PHASE_SPANS = {
    Recv.HANDSHAKING: "kv.handshake",
    Recv.PULLING: "kv.pull",
    Recv.VERIFYING: "kv.lease_check",
}
_TERMINAL = (Recv.RECEIVED, Recv.RECOMPUTED, Recv.FAILED, Recv.ABORTED)
_PHASE_FAILED = (Recv.TIMED_OUT, Recv.BROKEN, Recv.STALE)

# event name -> (cause, action) when the event itself does not say
_EVENTS = {
    "kv.deadline_missed": ("transport", "cancel the load"),
    "kv.transfer_broken": ("transport", "cancel the load"),
    "kv.stale_kv_refused": ("lease_expiry", "refuse the KV read"),
    "kv.recovered": ("transport", "recompute the prompt here"),
    "kv.failed_fast": ("transport", "fail the request"),
    "kv.cannot_cancel": ("transport", "wait for the transfer to end"),
    "kv.late_completion_fenced": ("transport", "drop the late completion"),
    "kv.late_read_fenced": ("transport", "post no read into released blocks"),
    "kv.fault_injected": ("fault", "injected"),
    "kv.lease_expired": ("lease_expiry", "release the blocks"),
    "kv.stale_read_detected": ("lease_expiry", "answer stale to the decode's check"),
}


def cause_of(raw: str | None, default: str) -> str:
    """A trace cause from the watch's own cause string (``deadline:handshake``...)."""
    if not raw:
        return default
    if raw.startswith("lease:"):
        return "lease_expiry"
    if raw.startswith(("deadline", "transport", "corrupt")):
        return "transport"
    return default


class KVSpans:
    def __init__(self) -> None:
        self.loads = RequestSpans("watchdog_kv.kv")
        self.leases = RequestSpans("watchdog_kv.kv")
        self._lease_parents: dict[str, str] = {}
        self.enabled = True

    def _off(self) -> None:
        self.enabled = False

    # -- decode side ------------------------------------------------------------------
    def load_admitted(self, req_id: str, traceparent: Any, **attrs: Any) -> None:
        if self.enabled:
            with contained("kv.trace", on_error=self._off):
                self.loads.start(req_id, "kv.load", traceparent, **attrs)

    def load_transition(self, req_id: str, old: str, new: str) -> None:
        if not self.enabled or req_id not in self.loads:
            return
        with contained("kv.trace", on_error=self._off):
            before, after = Recv(old), Recv(new)
            if before in _PHASE_SPANS:
                # the phase itself failed (the load above it may still recover)
                error = after.value if after in _PHASE_FAILED else None
                self.loads.leave(req_id, error=error, outcome=after.value)
            if after in _PHASE_SPANS:
                self.loads.enter(req_id, _PHASE_SPANS[after])
            if after in _TERMINAL:
                # recomputed is a recovery (the request goes on): only failed is an error
                error = after.value if after is Recv.FAILED else None
                self.loads.end(req_id, error=error, outcome=after.value)

    # -- prefill side -----------------------------------------------------------------
    def lease_parents(self, mapping: Any) -> None:
        """``{req_id: traceparent}`` from the connector metadata, before the leases start."""
        if self.enabled and isinstance(mapping, dict):
            self._lease_parents.update(mapping)
            if len(self._lease_parents) > 4096:  # announced but never leased
                for key in list(self._lease_parents)[:2048]:
                    del self._lease_parents[key]

    def lease_transition(self, req_id: str, old: str, new: str) -> None:
        if not self.enabled:
            return
        with contained("kv.trace", on_error=self._off):
            after = Lease(new)
            if after is Lease.LEASED and Lease(old) is Lease.HELD:
                parent = self._lease_parents.pop(req_id, None)
                self.leases.start(req_id, "kv.lease", parent)
            elif after is Lease.RELEASED:
                self.leases.end(req_id, outcome=Lease(old).value)

    # -- events -------------------------------------------------------------------------
    def label(self, event: str, fields: dict[str, Any]) -> None:
        req_id = fields.get("request_id")
        if not self.enabled or not isinstance(req_id, str) or event not in _EVENTS:
            return
        with contained("kv.trace", on_error=self._off):
            default_cause, action = _EVENTS[event]
            cause = cause_of(fields.get("cause"), default_cause)
            if fields.get("action") == "fail":
                action = "fail the request"
            skip = ("request_id", "action", "rank", "cause")
            extra = {k: v for k, v in fields.items() if k not in skip}
            if fields.get("cause"):
                extra["detail"] = fields["cause"]  # the watch's own words: deadline:handshake
            spans = self.leases if req_id in self.leases else self.loads
            spans.label(req_id, event, cause, action, **extra)
