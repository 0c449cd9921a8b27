"""Worker side: deadlines, recovery and the lease check of the loads of a KV connector.

:class:`WorkerWatch` is told, on plain data, what the worker-side connector
vLLM built does each step (:mod:`watchdog_kv.instrument.connector` wraps the
connector's methods and calls it; NixlConnector's insides are reached through a
:class:`Transport`, :mod:`watchdog_kv.instrument.nixl`). It only *edits the
transfer results* vLLM's scheduler receives each step (the sets of finished and
failed loads):

* a load that finished is held back while the prefill's lease check runs, then
  reported finished (valid) or failed (stale, unknown, no answer);
* a load past its phase deadline is cancelled and, once the transport confirmed
  nothing more can land, reported failed;
* a load the transport reported failed is recorded as such;
* a completion for a load already settled is dropped (fenced).

A failed load is what vLLM's own connectors report when a transfer breaks
(``failed_recving``); with ``WATCHDOG_KV_KV_RECOVERY=recompute`` the scheduler
is told to recompute such requests locally (see :mod:`watchdog_kv.kv.scheduler`),
otherwise vLLM fails them with an error. Its own failures disable the watch
for this connector (logged); vLLM carries on as if it was not there.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from typing import Any, Protocol

from watchdog_kv import wire
from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.kv.deadlines import DeadlineConfig, Deadlines, Phase
from watchdog_kv.kv.lease import LeaseClient, LeaseServer
from watchdog_kv.kv.spans import KVSpans
from watchdog_kv.kv.states import (
    IllegalTransition,
    LeaseTable,
    RecentSet,
    Recv,
    RecvEvent,
    RecvTable,
    Verdict,
)
from watchdog_kv.telemetry import get_logger, metrics
from watchdog_kv.wire import RecvPlan

__all__ = ["FaultHook", "Transport", "WorkerWatch"]

_log = get_logger("watchdog_kv.kv")

_DETECTED = (Recv.TIMED_OUT, Recv.BROKEN, Recv.STALE)

_PHASE_OF = {
    Recv.WAITING: Phase.FIRST_PROGRESS,
    Recv.HANDSHAKING: Phase.HANDSHAKE,
    Recv.PULLING: Phase.TRANSFER,
    Recv.VERIFYING: Phase.VERIFY,
}


class Transport(Protocol):
    """What the watch needs of a connector's transport beyond the connector interface
    (NixlConnector's: :class:`watchdog_kv.instrument.nixl.NixlTransport`)."""

    leases: LeaseTable
    fenced: RecentSet

    def phase(self, req_id: str, remote_engine_id: str | None) -> str:
        """``pulling`` (a read is posted), ``handshaking`` (the remote is not known
        yet) or ``waiting``."""

    def cancel(self, req_id: str) -> bool:
        """Stop the load; False when the transport could not cancel it (retry later)."""

    def observe_metadata(self, metadata: Any) -> None:
        """The prefill side: requests kept and leased, from the step's metadata."""

    def close(self) -> None: ...


class FaultHook(Protocol):
    """Rehearsals only (:mod:`watchdog_kv.instrument.faults`): what happens to a load
    the connector reported finished -- ``("corrupt" | "drop" | "delay", seconds)`` or
    None."""

    def on_completed(self, req_id: str, plan: RecvPlan) -> tuple[str, float] | None: ...


@dataclass
class _Load:
    plan: RecvPlan
    nbytes: int
    posted_at: float | None = None
    done_at: float | None = None
    release_at: float | None = None  # fault "delay": report no earlier than this
    dropped: bool = False  # fault "drop": the completion is swallowed
    cancel_wait_logged: bool = False
    asked_at: float | None = None  # when the prefill's lease server was asked


class WorkerWatch:
    def __init__(
        self,
        settings: Settings,
        rank: int,
        *,
        transport: Transport | None = None,
        lease_host: str = "127.0.0.1",
        connector: str = "",
    ) -> None:
        self.connector = connector  # the connector's class name
        self.settings = settings
        self.rank = rank
        self.enabled = True
        self.spans = KVSpans()
        self.recv = RecvTable(on_transition=self._on_transition)
        self.leases = LeaseTable(on_transition=self._on_lease_transition)
        self.deadlines = Deadlines(
            DeadlineConfig(
                floor_s=settings.kv_deadline_floor_s,
                cap_s=settings.kv_deadline_cap_s,
                assumed_bandwidth_bps=settings.kv_assumed_bandwidth_mbps * 1e6,
            )
        )
        self.faults: FaultHook | None = None
        self._loads: dict[str, _Load] = {}
        self._settled = RecentSet()  # loads we reported; later completions are fenced
        self._orphans: set[str] = set()  # held completions to hand back after a disable
        self._ready_ok: set[str] = set()  # settled this step: report finished
        self._ready_failed: set[str] = set()  # settled this step: report finished + failed
        self._bytes_per_block = 0
        self.adapter: Transport | None = transport
        self.leases_tracked = True
        self.lease_server: LeaseServer | None = None
        self.lease_client = LeaseClient()
        self.on_change: Any = None  # called after each step's results (throttled by the caller)
        if transport is not None:
            transport.leases = self.leases
            self.lease_server = LeaseServer(self.leases, lease_host)

    # --- wiring -------------------------------------------------------------
    def close(self) -> None:
        if self.lease_server is not None:
            self.lease_server.close()
        self.lease_client.close()

    def _stop_lease_tracking(self) -> None:
        # Without bookkeeping every answer would be wrong: stop answering. Decodes
        # then get no answer and recompute (fail closed), after their verify deadline.
        self.leases_tracked = False
        if self.lease_server is not None:
            self.lease_server.close()
        _log.error("kv.lease_tracking_stopped", reason="internal error")

    def _disable(self) -> None:
        """Stop editing results. Completions we were holding go back to vLLM as failed
        loads (recomputed) on the next step, so no request is left waiting for them."""
        self.enabled = False
        self._orphans = {r for r, load in self._loads.items() if load.done_at is not None}
        _log.error(
            "kv.watch_disabled",
            reason="internal error; the connector runs unwatched",
            handed_back=sorted(self._orphans),
        )

    def _event(self, event: str, **fields: Any) -> None:
        self.spans.label(event, fields)
        _log.warning(event, rank=self.rank, **fields)

    def _on_transition(self, req_id: str, event: str, old: str, new: str) -> None:
        _log.debug("kv.transition", request_id=req_id, kv_event=event, old=old, new=new)
        self.spans.load_transition(req_id, old, new)

    def _on_lease_transition(self, req_id: str, event: str, old: str, new: str) -> None:
        self.spans.lease_transition(req_id, old, new)

    # --- what the connector did ---------------------------------------------
    def kv_caches_registered(self, total_bytes: int, num_blocks: int) -> None:
        """The worker's KV caches: ``total_bytes`` over ``num_blocks`` blocks."""
        with contained("kv.register_kv_caches", on_error=self._disable):
            if num_blocks:
                self._bytes_per_block = total_bytes // num_blocks

    def before_load(self, metadata: Any | None) -> None:
        """A step's ``start_load_kv`` is about to run with ``metadata`` (the connector's
        metadata of this step, opaque here but for the attributes of :mod:`~watchdog_kv.wire`)."""
        if self.adapter is not None and self.leases_tracked:
            # The prefill's lease bookkeeping: kept even if the decode side disabled
            # itself, since decodes elsewhere rely on the answers.
            with contained("kv.lease_tracking", on_error=self._stop_lease_tracking):
                if metadata is not None:
                    self.spans.lease_parents(getattr(metadata, wire.LEASE_TRACES, None))
                    self.adapter.observe_metadata(metadata)
        self._answer_lease_questions()
        if self.enabled and metadata is not None:
            with contained("kv.start_load_kv", on_error=self._disable):
                self._admit_new_loads(getattr(metadata, wire.RECV_PLANS, None) or {})

    def after_load(self) -> None:
        """The step's ``start_load_kv`` returned: reads may have been posted."""
        if self.enabled:
            with contained("kv.start_load_kv", on_error=self._disable):
                self._observe_phases()

    def results(self, done: set[str], failed: set[str], finished_req_ids: set[str]) -> None:
        """Edit, in place, the loads the connector reports finished (``done``) and failed
        (``failed``) this step; ``finished_req_ids``: the requests vLLM ended."""
        self._answer_lease_questions()
        if self.enabled:
            said_done, said_failed = set(done), set(failed)
            edited = False
            with contained("kv.get_transfer_results", on_error=self._disable):
                self._edit_results(done, failed, finished_req_ids)
                edited = True
            if not edited:  # half-edited: what the connector said, minus what we reported
                done.clear()
                done.update(r for r in said_done if r not in self._settled)
                failed.clear()
                failed.update(r for r in said_failed if r not in self._settled)
        if self._orphans:
            done.update(self._orphans)
            failed.update(self._orphans)
            self._orphans = set()

    def _answer_lease_questions(self) -> None:
        # The step holds the GIL the lease server's thread may wait seconds for.
        if self.lease_server is not None and self.adapter is not None and self.leases_tracked:
            with contained("kv.lease_tracking", on_error=self._stop_lease_tracking):
                self.lease_server.answer_pending()

    # --- the watch ----------------------------------------------------------
    def _admit_new_loads(self, plans: dict[str, Any]) -> None:
        for req_id, raw in plans.items():
            if req_id in self._loads or req_id in self._settled:
                continue
            plan = RecvPlan.from_dict(raw)
            self.recv.start(req_id)
            self._loads[req_id] = _Load(plan, plan.num_blocks * self._bytes_per_block)
            self.spans.load_admitted(
                req_id,
                plan.trace,
                remote_request_id=plan.remote_request_id,
                remote_engine_id=plan.remote_engine_id,
                blocks=plan.num_blocks,
                bytes=plan.num_blocks * self._bytes_per_block,
                lease_checked=bool(plan.lease and self.settings.kv_lease_check),
            )

    def _observe_phases(self) -> None:
        if self.adapter is None:
            for req_id, load in self._loads.items():
                transfer = self.recv.get(req_id)
                if transfer is not None and transfer.state is Recv.WAITING:
                    self._try(req_id, RecvEvent.POSTED)
                    load.posted_at = time.monotonic()
            return
        for req_id, load in self._loads.items():
            transfer = self.recv.get(req_id)
            if transfer is None:
                continue
            phase = self.adapter.phase(req_id, load.plan.remote_engine_id)
            if phase == "handshaking" and transfer.state is Recv.WAITING:
                self._try(req_id, RecvEvent.HANDSHAKE)
            elif phase == "pulling" and transfer.state in (Recv.WAITING, Recv.HANDSHAKING):
                self._learn(
                    req_id, _PHASE_OF[transfer.state], time.monotonic() - transfer.phase_started
                )
                self._try(req_id, RecvEvent.POSTED)
                load.posted_at = time.monotonic()

    def _learn(self, req_id: str, phase: Phase, seconds: float, nbytes: int = 0) -> None:
        if not self.deadlines.observe(phase, seconds, nbytes or None):
            _log.warning(
                "kv.phase_overran",
                rank=self.rank,
                request_id=req_id,
                phase=phase.value,
                seconds=round(seconds, 3),
                deadline_s=round(self.deadlines.deadline(phase, nbytes), 3),
                note="not learned: this worker was held past the deadline",
            )

    def _try(self, req_id: str, event: RecvEvent, cause: str | None = None) -> bool:
        try:
            self.recv.apply(req_id, event, cause=cause)
            return True
        except IllegalTransition:
            return False

    def _edit_results(self, done: set[str], failed: set[str], finished_req_ids: set[str]) -> None:
        now = time.monotonic()
        # 1. Completions of loads we already settled: fenced, never reported twice.
        for req_id in list(done):
            if req_id in self._settled:
                done.discard(req_id)
                failed.discard(req_id)
                self._event("kv.late_completion_fenced", request_id=req_id)
        # 2. Requests vLLM ended (aborted) while loading. vLLM frees their blocks when
        # the load is reported finished: a completion we hold is reported now; one
        # still in the connector's hands is left for the connector to report.
        for req_id in finished_req_ids & set(self._loads):
            held = self._loads[req_id].done_at is not None
            if self._try(req_id, RecvEvent.ABORT):
                if held:
                    done.add(req_id)
                self._forget(req_id, settled=held)
        # 3. New completions and transport failures from the connector.
        for req_id in list(done):
            load = self._loads.get(req_id)
            if load is None:
                continue
            done.discard(req_id)
            transfer = self.recv.get(req_id)
            if transfer is not None and transfer.state in _DETECTED:
                # Past its deadline and not cancellable: the connector is done with the
                # blocks only now, so only now can they go back.
                failed.discard(req_id)
                load.done_at = now
                self._recover(req_id, transfer_done=True)
            elif req_id in failed:
                failed.discard(req_id)
                load.done_at = now
                self._detected(req_id, RecvEvent.ERROR, "transport", transport_done=True)
            else:
                self._completed(req_id, load, now)
        # 4. Held completions: fault delays, lease checks.
        answers = self.lease_client.answers()
        for req_id, load in list(self._loads.items()):
            transfer = self.recv.get(req_id)
            if transfer is None or transfer.state is not Recv.VERIFYING:
                continue
            if load.dropped or (load.release_at is not None and now < load.release_at):
                continue
            if load.asked_at is None:
                self._start_check(req_id, load)
            verdict = answers.get(load.plan.remote_request_id or "")
            if load.asked_at is not None and verdict is not None:
                self._finish_check(req_id, load, verdict)
        # 5. Deadlines.
        for req_id, load in list(self._loads.items()):
            transfer = self.recv.get(req_id)
            if transfer is None:
                continue
            if transfer.state in _PHASE_OF:
                phase = _PHASE_OF[transfer.state]
                limit = self.deadlines.deadline(phase, load.nbytes)
                if load.release_at is not None:
                    limit += max(0.0, load.release_at - transfer.phase_started)
                elapsed = now - transfer.phase_started
                if elapsed > limit:
                    metrics.local().count("kv_deadline_misses", phase.value)
                    self._event(
                        "kv.deadline_missed",
                        request_id=req_id,
                        phase=phase.value,
                        deadline_s=round(limit, 3),
                        elapsed_s=round(elapsed, 3),
                        nbytes=load.nbytes,
                    )
                    self._detected(
                        req_id,
                        RecvEvent.DEADLINE,
                        f"deadline:{phase.value}",
                        transport_done=load.done_at is not None,
                    )
            elif transfer.state in _DETECTED:  # a cancel refused or impossible before
                self._recover(req_id, transfer_done=load.done_at is not None)
        # 6. Report what was settled this step.
        for req_id in list(self._loads):
            if req_id in self._ready_ok:
                done.add(req_id)
                self._forget(req_id)
            elif req_id in self._ready_failed:
                done.add(req_id)
                failed.add(req_id)
                self._forget(req_id)
        self._ready_ok.clear()
        self._ready_failed.clear()
        if self.on_change is not None:
            self.on_change()

    def _completed(self, req_id: str, load: _Load, now: float) -> None:
        transfer = self.recv.get(req_id)
        if transfer is None or not self._try(req_id, RecvEvent.DONE):
            return
        started = load.posted_at or transfer.started
        self._learn(req_id, Phase.TRANSFER, now - started, load.nbytes)
        metrics.local().observe("kv_transfer_seconds", now - started, metrics.TRANSFER_BUCKETS)
        load.done_at = now
        fault = self.faults.on_completed(req_id, load.plan) if self.faults is not None else None
        if fault is None:
            return
        kind, seconds = fault
        self._event("kv.fault_injected", fault=kind, request_id=req_id, seconds=seconds)
        if kind == "corrupt":  # what arrived was overwritten: only a recompute is right
            self._try(req_id, RecvEvent.LEASE_STALE, cause="corrupt")
            self._recover(req_id, transfer_done=True, cause="transport")
        elif kind == "drop":
            load.dropped = True  # never reported: the verify deadline must catch it
        elif kind == "delay":
            load.release_at = now + seconds

    def _start_check(self, req_id: str, load: _Load) -> None:
        plan = load.plan
        if not (self.settings.kv_lease_check and plan.lease and plan.remote_request_id):
            self._try(req_id, RecvEvent.LEASE_OK, cause="unchecked")
            self._ready_ok.add(req_id)
            return
        endpoint = plan.lease[min(self.rank, len(plan.lease) - 1)]
        load.asked_at = time.monotonic()
        _log.debug("kv.lease_asked", request_id=req_id, remote_request_id=plan.remote_request_id)
        if not self.lease_client.ask(endpoint, plan.remote_request_id):
            _log.warning("kv.lease_ask_failed", request_id=req_id, endpoint=endpoint)

    def _finish_check(self, req_id: str, load: _Load, verdict: Verdict) -> None:
        assert load.asked_at is not None
        waited = time.monotonic() - load.asked_at
        self._learn(req_id, Phase.VERIFY, waited)
        why = verdict.value
        _log.debug("kv.lease_checked", request_id=req_id, verdict=why, waited_s=waited)
        if verdict is Verdict.VALID:
            self._try(req_id, RecvEvent.LEASE_OK)
            self._ready_ok.add(req_id)
            return
        self._event(
            "kv.stale_kv_refused",
            request_id=req_id,
            remote_request_id=load.plan.remote_request_id,
            verdict=why,
        )
        if self._try(req_id, RecvEvent.LEASE_STALE, cause=f"lease:{verdict.value}"):
            self._recover(req_id, transfer_done=True)

    def _detected(
        self, req_id: str, event: RecvEvent, cause: str, transport_done: bool = False
    ) -> None:
        if self._try(req_id, event, cause=cause):
            if event is RecvEvent.ERROR:
                self._event("kv.transfer_broken", request_id=req_id)
            self._recover(req_id, transfer_done=transport_done)

    def _recover(self, req_id: str, transfer_done: bool, cause: str | None = None) -> None:
        """Cancel the load, then hand the request to vLLM's recompute or failure path."""
        transfer = self.recv.get(req_id)
        if transfer is None:
            return
        if transfer_done:
            cancelled = True
            if self.adapter is not None:
                self.adapter.fenced.add(req_id)
        elif self.adapter is not None:
            cancelled = self.adapter.cancel(req_id)
        else:
            cancelled = False  # this connector has no cancel: wait for its completion
            if not self._loads[req_id].cancel_wait_logged:
                self._loads[req_id].cancel_wait_logged = True
                self._event("kv.cannot_cancel", request_id=req_id, connector=self.connector)
        if not cancelled:
            return  # the blocks stay this request's until the transfer is really over
        self._try(req_id, RecvEvent.CANCELLED)
        recompute = self.settings.kv_recovery == "recompute"
        self._event(  # before the last transition, which ends the load's span
            "kv.recovered" if recompute else "kv.failed_fast",
            request_id=req_id,
            cause=cause or transfer.cause,
            action="recompute" if recompute else "fail",
            after_s=round(time.monotonic() - transfer.started, 3),
        )
        self._try(req_id, RecvEvent.RECOMPUTE if recompute else RecvEvent.FAIL)
        metrics.local().count("kv_recoveries", "recompute" if recompute else "fail")
        self._ready_failed.add(req_id)

    def _forget(self, req_id: str, settled: bool = True) -> None:
        """Stop watching ``req_id``; ``settled``: we reported it, so fence what comes later."""
        self._loads.pop(req_id, None)
        if settled:
            self._settled.add(req_id)

    def status(self) -> dict[str, Any]:
        return {
            "loading": {t.req_id: t.state.value for t in self.recv.live()},
            "outcomes": dict(self.recv.outcomes),
            "fenced": self.recv.fenced,
            "leases_kept": len(self.leases.kept()),
            "lease_counts": dict(self.leases.counts),
            "stale_reads": self.leases.stale_reads,
            "deadlines": self.deadlines.snapshot(),
            "lease_endpoint": self.lease_server.endpoint if self.lease_server else None,
            "lease_answers": dict(self.lease_server.answered) if self.lease_server else None,
        }
