"""The stall rules: which process of a vLLM server is stuck, from its beacons.

Plain data in (status records, beacon views, the time), stalls out: the same
rules serve the monitor outside the server (:mod:`watchdog_kv.monitor.watcher`)
and the API server's guard inside it (:mod:`watchdog_kv.step.front`). Two rules:

* **overdue**: a process is in a phase (startup, step, connector call) for
  longer than the deadline it wrote when the phase began;
* **no progress**: an API server has requests outstanding for an engine rank,
  and that engine has neither started nor finished a phase for longer than its
  step deadline since the work arrived -- an engine stopped while idle shows
  nothing overdue, but it does not pick up the work either.

An idle engine with nothing outstanding is never stuck.
"""

from __future__ import annotations

import time
from collections.abc import Mapping
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from watchdog_kv.beacon import BeaconView, Phase
from watchdog_kv.telemetry import get_logger

__all__ = ["Stall", "StallRules", "engine_of", "engine_rank", "find_stalls"]

_log = get_logger("watchdog_kv.step")


@dataclass
class Stall:
    pid: int
    role: str
    rank: int | None
    server: str | None
    process_name: str
    reason: str  # "overdue" | "no_progress"
    phase: str
    what: str
    elapsed_s: float
    deadline_s: float
    tid: int
    seq: int
    outstanding: int = 0
    detected_wall: float = field(default_factory=time.time)
    detected_after_s: float = 0.0  # how long it had been stuck when it was detected
    starved_s: float = 0.0  # of which its thread waited for a CPU (not counted)
    incident: str | None = None

    @property
    def key(self) -> tuple[int, int, str]:
        return (self.pid, self.seq, self.reason)

    def describe(self) -> str:
        who = f"{self.server or 'server'} {self.role}"
        if self.rank is not None:
            who += f" rank {self.rank}"
        who += f" (pid {self.pid})"
        if self.reason == "no_progress":
            return (
                f"{who} has not stepped for {self.elapsed_s:.1f} s with {self.outstanding} "
                f"request(s) outstanding (step deadline {self.deadline_s:.1f} s)"
            )
        inside = f" in {self.what}" if self.what else ""
        return (
            f"{who} is stuck in its {self.phase}{inside} for {self.elapsed_s:.1f} s "
            f"(deadline {self.deadline_s:.1f} s)"
        )

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"message": self.describe()}


def find_stalls(
    records: list[dict[str, Any]],
    beacons: Mapping[int, BeaconView],
    now: float | None = None,
    *,
    front_stale_s: float = 5.0,
    starved: Mapping[int, float] | None = None,
) -> list[Stall]:
    """The stalls visible in ``beacons`` of the live processes in ``records``.

    ``starved`` gives, per pid, how long the phase's thread has waited for a CPU
    since the phase began (see :class:`StallRules`): that time does not count
    against the deadline -- a step starved of CPU is slow, not stuck. An engine
    core waiting on a worker that is itself in a phase within its deadline is
    not stuck either. A front end's outstanding numbers count only while its
    beacon is fresh (updated within ``front_stale_s``).
    """
    now = time.monotonic() if now is None else now
    starved = starved or {}
    alive = {int(r["pid"]): r for r in records if r.get("alive", True)}

    def late(pid: int, view: BeaconView) -> float | None:
        """Seconds past the deadline counted against it, or None if not overdue."""
        if view.phase is Phase.IDLE:
            return None
        counted = view.elapsed(now) - starved.get(pid, 0.0)
        return counted if counted > view.deadline_s else None

    overdue = {pid: late(pid, view) for pid, view in beacons.items() if pid in alive}
    # engine pid -> one of its workers is in a phase, within its deadline
    busy_children: dict[int, bool] = {}
    for pid, view in beacons.items():
        rec = alive.get(pid)
        if (
            rec is not None
            and rec.get("role") == "worker"
            and view.phase is not Phase.IDLE
            and overdue.get(pid) is None
        ):
            busy_children[int(rec.get("ppid", -1))] = True
    stalls: list[Stall] = []
    for pid, view in beacons.items():
        counted = overdue.get(pid)
        if counted is None or busy_children.get(pid):
            continue
        stall = _stall(alive[pid], view, "overdue", counted, view.deadline_s)
        stall.starved_s = round(starved.get(pid, 0.0), 3)
        stalls.append(stall)
    for pid, view in beacons.items():
        front = alive.get(pid)
        if front is None or not view.outstanding or now - view.updated > front_stale_s:
            continue
        for rank, (count, since) in view.outstanding.items():
            engine = engine_of(alive, pid, front.get("server"), rank)
            ev = beacons.get(int(engine["pid"])) if engine else None
            if engine is None or ev is None or ev.phase is not Phase.IDLE:
                continue
            quiet = now - max(since, ev.updated) - starved.get(int(engine["pid"]), 0.0)
            if ev.deadline_s > 0 and quiet > ev.deadline_s:
                stall = _stall(engine, ev, "no_progress", quiet, ev.deadline_s)
                stall.outstanding = count
                stalls.append(stall)
    return stalls


def _run_delay_s(pid: int, tid: int) -> float | None:
    """Total time thread ``tid`` of ``pid`` has waited on a run queue (schedstat)."""
    try:
        fields = Path(f"/proc/{pid}/task/{tid or pid}/schedstat").read_text().split()
        return int(fields[1]) / 1e9
    except (OSError, ValueError, IndexError):
        return None


class StallRules:
    """:func:`find_stalls` with CPU starvation taken out.

    For each phase it sees (a beacon's pid and sequence number, or an engine's
    wait for outstanding work), it remembers how long the thread had waited for
    a CPU when first seen, and subtracts what it waited since: a thread that is
    runnable but not running is starved, not stuck (docs/step-watchdog.md has
    the measurement). A thread blocked in C
    (sleeping, GIL held or not), a stopped process or a spinning loop gains no
    run-queue wait, so those are judged on wall time.
    """

    def __init__(self, front_stale_s: float = 5.0) -> None:
        self.front_stale_s = front_stale_s
        self._base: dict[tuple[int, int], float] = {}

    def find(
        self,
        records: list[dict[str, Any]],
        beacons: Mapping[int, BeaconView],
        now: float | None = None,
    ) -> list[Stall]:
        starved: dict[int, float] = {}
        seen: set[tuple[int, int]] = set()
        for pid, view in beacons.items():
            key = (pid, view.seq)
            tid = view.tid if view.phase is not Phase.IDLE else pid
            delay = _run_delay_s(pid, tid)
            if delay is None:
                continue
            seen.add(key)
            base = self._base.setdefault(key, delay)
            starved[pid] = max(0.0, delay - base)
        for key in [k for k in self._base if k not in seen]:
            del self._base[key]
        return find_stalls(records, beacons, now, front_stale_s=self.front_stale_s, starved=starved)


def engine_of(
    alive: Mapping[int, dict[str, Any]], front_pid: int, server: str | None, rank: int
) -> dict[str, Any] | None:
    """The engine core of DP ``rank`` under the front end ``front_pid``.

    vLLM starts the engine cores from the API server, so its children come
    first; an engine started elsewhere is matched by server name.
    """
    engines = [
        r for r in alive.values() if r.get("role") == "engine_core" and (r.get("rank") or 0) == rank
    ]
    for candidates in (
        [r for r in engines if r.get("ppid") == front_pid],
        [r for r in engines if server is not None and r.get("server") == server],
    ):
        if len(candidates) == 1:
            return candidates[0]
    return None


def _stall(
    rec: Mapping[str, Any], view: BeaconView, reason: str, elapsed: float, deadline: float
) -> Stall:
    return Stall(
        pid=int(rec["pid"]),
        role=str(rec.get("role")),
        rank=rec.get("rank"),
        server=rec.get("server"),
        process_name=str(rec.get("process_name", "")),
        reason=reason,
        phase=view.phase.name.lower(),
        what=view.what,
        elapsed_s=round(elapsed, 3),
        deadline_s=round(deadline, 3),
        tid=view.tid,
        seq=view.seq,
        outstanding=0,
        detected_after_s=round(elapsed, 3),
    )


def engine_rank(stall: Stall, records: list[dict[str, Any]]) -> int:
    """The data-parallel rank a stalled process serves (a worker: its engine core's)."""
    if stall.role == "engine_core":
        return int(stall.rank or 0)
    by_pid = {int(r["pid"]): r for r in records}
    parent = by_pid.get(int(by_pid.get(stall.pid, {}).get("ppid", -1)))
    if parent is not None and parent.get("role") == "engine_core":
        return int(parent.get("rank") or 0)
    return 0
