"""The step watch inside an engine-core or worker process: phases into the beacon.

Driven by :mod:`watchdog_kv.instrument.engine_core`, :mod:`~watchdog_kv.instrument.worker`
and :mod:`~watchdog_kv.instrument.connector`. Each phase writes its start and its
deadline into the beacon before vLLM's code runs, so the outside monitor can
tell it is late even if this process never runs Python again. At the end of a
phase its duration teaches the deadlines (:mod:`watchdog_kv.step.deadlines`).

* startup: from registration until vLLM's busy loop begins (the engine core's
  ``run_busy_loop``, the worker's ``worker_busy_loop``), and then the first
  ``STARTUP_STEPS`` steps, which compile and allocate;
* step: each ``_process_engine_step`` (engine core) or ``execute_model`` /
  ``sample_tokens`` / ``execute_dummy_batch`` (worker); only steps that ran the
  model count towards the startup allowance and teach the deadline;
* connector: each KV-connector call inside a worker step (inside the first
  steps, held to the startup deadline).

Only a process with work enters a step: an idle engine waits in vLLM's input
queue and shows idle.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from watchdog_kv.beacon import Beacon, Phase
from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.step.deadlines import Kind, Limits, StepDeadlines
from watchdog_kv.telemetry import get_logger, metrics

__all__ = ["STARTUP_STEPS", "StepWatch", "limits_from"]

STARTUP_STEPS = 3

_log = get_logger("watchdog_kv.step")


def limits_from(settings: Settings) -> dict[Kind, Limits]:
    return {
        Kind.STARTUP: Limits(settings.startup_floor_s, settings.startup_cap_s),
        Kind.STEP: Limits(settings.step_floor_s, settings.step_cap_s),
        Kind.CONNECTOR: Limits(settings.connector_floor_s, settings.connector_cap_s),
    }


@dataclass
class StepNote:
    model_ran: bool = True


class StepWatch:
    """Phases of one process, written to its beacon (thread-safe)."""

    def __init__(self, settings: Settings, role: str, *, pid: int | None = None) -> None:
        self.settings = settings
        self.role = role
        self.beacon = Beacon(settings.state_dir, pid)
        self.deadlines = StepDeadlines(limits_from(settings), slack=settings.step_slack)
        self._learned = settings.state_dir / "beacons" / "learned.json"
        self._learn_key = f"{settings.server or 'server'}/{role}"
        self.deadlines.load_startup(self._learned, self._learn_key)
        self._startup_steps = STARTUP_STEPS
        self._startup_started: float | None = None
        self._lock = threading.Lock()
        self.enabled = True
        self._begin_startup()

    # -- startup --------------------------------------------------------------------------
    def _begin_startup(self) -> None:
        deadline = self.deadlines.deadline(Kind.STARTUP)
        self._startup_started = self.beacon.enter(Phase.STARTUP, deadline, "startup")
        self.beacon.set_idle_deadline(self.deadlines.deadline(Kind.STEP))

    def end_startup(self) -> None:
        """vLLM's busy loop begins: initialisation is over."""
        with self._lock:
            started, self._startup_started = self._startup_started, None
        if started is None:
            return
        seconds = self.beacon.exit(started)
        self.deadlines.observe(Kind.STARTUP, seconds)
        self.deadlines.save_startup(self._learned, self._learn_key, seconds)
        _log.info(
            "step.startup_done",
            seconds=round(seconds, 3),
            deadlines=self.deadlines.snapshot(),
        )

    # -- phases ---------------------------------------------------------------------------
    @contextlib.contextmanager
    def step(self, what: str, work: int | None = None) -> Iterator[StepNote]:
        """A model step (engine core or worker). The caller says on the yielded note
        whether the model ran: only such steps use up the startup allowance and teach
        the step deadline (an engine waiting for remote KV steps every millisecond
        without running anything)."""
        note = StepNote()
        if not self.enabled:
            yield note
            return
        started = None
        with contained("step.enter", on_error=self.disable):
            if self._startup_started is not None:
                self.end_startup()
            kind = Kind.STARTUP if self._startup_steps > 0 else Kind.STEP
            if work is not None:
                self.beacon.set_work(work)
            deadline = self.deadlines.deadline(kind)
            started = self.beacon.enter(Phase.STEP, deadline, what)
        try:
            yield note
        finally:
            if started is not None:
                with contained("step.exit", on_error=self.disable):
                    self._end_step(started, kind, what, deadline, note.model_ran)

    def _learn(self, kind: Kind, seconds: float, deadline: float, what: str) -> None:
        """Teach the deadlines, except with a phase that overran its deadline: that was
        a stall, and learning from it would stretch the deadline that must catch the next."""
        if seconds > deadline:
            _log.warning(
                "step.overran",
                kind=kind.value,
                what=what,
                seconds=round(seconds, 3),
                deadline_s=deadline,
            )
            return
        self.deadlines.observe(kind, seconds)

    def _end_step(
        self, started: float, kind: Kind, what: str, deadline: float, model_ran: bool
    ) -> None:
        seconds = self.beacon.exit(started, step_done=True)
        if not model_ran:
            return
        metrics.local().observe("step_seconds", seconds, metrics.STEP_BUCKETS)
        if kind is Kind.STARTUP:
            self._startup_steps -= 1
        self._learn(kind, seconds, deadline, what)
        step_deadline = self.deadlines.deadline(Kind.STEP)
        self.beacon.set_idle_deadline(step_deadline)
        if kind is Kind.STEP and 0.5 * step_deadline < seconds <= deadline:
            _log.warning(
                "step.slow", what=what, seconds=round(seconds, 3), deadline_s=step_deadline
            )

    @contextlib.contextmanager
    def connector_call(self, what: str) -> Iterator[None]:
        """One KV-connector call, inside a worker step."""
        if not self.enabled:
            yield
            return
        started = None
        with contained("step.connector_enter", on_error=self.disable):
            # inside the first steps, connector calls set themselves up too (NIXL
            # registrations, first handshakes): they are held to the startup deadline
            kind = Kind.STARTUP if self._startup_steps > 0 else Kind.CONNECTOR
            deadline = self.deadlines.deadline(kind)
            started = self.beacon.enter(Phase.CONNECTOR, deadline, what)
        try:
            yield
        finally:
            if started is not None:
                with contained("step.connector_exit", on_error=self.disable):
                    seconds = self.beacon.exit(started)
                    if kind is Kind.CONNECTOR:
                        self._learn(kind, seconds, deadline, what)

    def record(self, event: dict[str, Any]) -> None:
        """Flight recorder sink for this process's log events."""
        if self.enabled:
            self.beacon.record(event)

    def disable(self) -> None:
        """Our own failure: stop writing (the beacon then shows idle, never a false stall)."""
        if not self.enabled:
            return
        self.enabled = False
        with contextlib.suppress(Exception):
            self.beacon.reset()  # the beacon shows idle
        _log.error("step.watch_disabled", pid=os.getpid())
