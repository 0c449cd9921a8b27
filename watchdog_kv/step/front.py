"""The stall guard in a vLLM API server: outstanding work out, stalled ranks acted on.

The API server is the process that knows which requests wait on which engine
rank, and the only one that can answer them. Once its ``AsyncLLM`` exists
(hook on ``AsyncLLM.__init__``), a thread of ours (allowed on every CPU) does,
every ``WATCHDOG_KV_MONITOR_INTERVAL``:

1. publishes, in this process's beacon, how many requests are outstanding per
   engine rank and since when -- the monitor's *no progress* rule needs it to
   see an engine stopped while idle;
2. reads the beacons of its own engine cores and their workers (its child
   processes) and finds the stalled ones, with the monitor's own rules;
3. on a newly stalled rank, unless the action is ``observe``: every request
   in flight on that rank that has not produced anything yet is *moved* to a
   healthy data-parallel rank -- aborted on the stalled engine and sent again,
   under a new internal id, to the healthy one, its client none the wiser
   (:meth:`FrontGuard._move`); the rest (a request already streaming tokens, one
   pinned to its rank, one of n > 1, or any when no rank is left) is failed at
   once with HTTP 503 and a message naming the rank, the phase and the deadline
   (a streamed response gets an error event, then ``[DONE]``; the router
   continues such a stream on a healthy rank), and vLLM is told to abort it
   there. While the rank stays stalled, new requests go to another rank; with
   no rank left, they are refused with 503 at once instead of hanging.

vLLM's own ``/health`` tells the truth with the guard in place
(``AsyncLLM.check_health``): 503 naming the stalls while every rank of the
server is stalled, and 503 naming the processes that are gone once its engine
is dead (vLLM's own answer to that is an empty 503).

This module decides on plain data (status records, beacons, requests per
rank); what it decides is done in vLLM by :class:`EngineFront`
(:mod:`watchdog_kv.instrument.api_server`), never from the guard's own thread:
the moving and failing run on the API server's event loop, through vLLM's own
calls.
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from typing import Any, Protocol

from watchdog_kv import process as procrecords
from watchdog_kv import threads
from watchdog_kv.beacon import Beacon, beacon_path, depth, read_beacon
from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.stalls import Stall, StallRules, engine_of, engine_rank
from watchdog_kv.telemetry import get_logger

__all__ = ["EngineFront", "FrontGuard", "engine_rank"]

_log = get_logger("watchdog_kv.step")


class EngineFront(Protocol):
    """What the guard needs done in the API server's engine client."""

    def requests_by_rank(self) -> dict[str, int]:
        """Every request in flight, with the engine rank it waits on."""

    def ranks(self) -> list[int]:
        """The engine ranks of this server."""

    async def act_on_rank(self, rank: int, stall: Stall, healthy: list[int], message: str) -> int:
        """Move the requests of the stalled ``rank`` to ``healthy`` ranks where they can
        be moved, fail the rest with ``message``; the number of requests acted on."""

    def close(self) -> None: ...


class FrontGuard:
    def __init__(
        self, front: EngineFront, settings: Settings, loop: asyncio.AbstractEventLoop
    ) -> None:
        self.front, self.settings, self.loop = front, settings, loop
        self.pid = os.getpid()
        self.beacon = Beacon(settings.state_dir)
        self.stalled: dict[int, Stall] = {}
        self._since: dict[int, float] = {}
        self._unacked: dict[int, tuple[int, float]] = {}  # rank -> (requests, acted at)
        self._rules = StallRules()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._thread = threads.start(self._run, "wkv-front-guard")

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.settings.monitor_interval_s):
            with contained("step.front_guard"):
                self.tick()

    def stop(self) -> None:
        self._stop.set()
        self.front.close()

    def tick(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        records = [r for r in procrecords.read_records(self.settings.state_dir) if r.get("alive")]
        mine = _descendants(records, self.pid)
        by_pid = {int(r["pid"]): r for r in mine}
        beacons = {}  # of this API server's own processes only
        for pid in by_pid:
            got = read_beacon(beacon_path(self.settings.state_dir, pid))
            if got is not None:
                beacons[pid] = got[0]
        counts = Counter(self.front.requests_by_rank().values())
        # Requests we failed on a stalled rank stay its outstanding work until that
        # engine moves again: vLLM forgets them at once, but the engine has not.
        for rank, (count, failed_at) in list(self._unacked.items()):
            engine = engine_of(by_pid, self.pid, self.settings.server, rank)
            view = beacons.get(int(engine["pid"])) if engine is not None else None
            if view is None or view.updated > failed_at:
                del self._unacked[rank]
            else:
                counts[rank] += count
        for rank in set(counts) | set(self._since):
            if counts.get(rank):
                since = self._since.setdefault(rank, now)
                self.beacon.set_outstanding(rank, counts[rank], since)
            else:
                self._since.pop(rank, None)
                self.beacon.set_outstanding(rank, 0, 0.0)
        self.beacon.touch()
        by_rank: dict[int, Stall] = {}
        # the furthest-in process first: a worker stuck in a connector call, not the
        # engine core waiting on it, is what the client's error should name
        stalls = self._rules.find(mine, beacons, now)
        for stall in sorted(stalls, key=lambda s: depth(s.phase, s.role), reverse=True):
            by_rank.setdefault(engine_rank(stall, mine), stall)
        with self._lock:
            new = {r: s for r, s in by_rank.items() if r not in self.stalled}
            cleared = [r for r in self.stalled if r not in by_rank]
            self.stalled = by_rank
        for rank in cleared:
            _log.info("step.rank_recovered", dp_rank=rank)
        for rank, stall in new.items():
            _log.error("step.rank_stalled", dp_rank=rank, message=stall.describe())
            if self.settings.stall_action != "observe":
                asyncio.run_coroutine_threadsafe(self._act_on_rank(rank, stall), self.loop)

    async def _act_on_rank(self, rank: int, stall: Stall) -> None:
        """Move what can be moved off a newly stalled rank; fail the rest with 503."""
        message = (
            f"watchdog_kv: engine rank {rank} stalled: {stall.describe()}; the request was "
            "failed instead of waiting for it"
        )
        healthy = [r for r in self.front.ranks() if r not in self.stalled]
        acted = await self.front.act_on_rank(rank, stall, healthy, message)
        if acted:
            self._unacked[rank] = (acted, time.monotonic())

    # -- decisions for new requests and /health ----------------------------------------------
    def current_stalls(self) -> dict[int, Stall]:
        """The stalled ranks, re-checked now: a rank whose stalled process has moved
        since the last tick (its beacon's sequence number changed) is not held
        against a new request (a stopped engine continued a moment ago)."""
        with self._lock:
            stalled = dict(self.stalled)
        for rank, stall in list(stalled.items()):
            got = read_beacon(beacon_path(self.settings.state_dir, stall.pid))
            if got is None or got[0].seq != stall.seq:
                del stalled[rank]
        return stalled

    def route(self, rank: int, pinned: bool, load: dict[int, int]) -> int | str:
        """The rank a new request chosen for ``rank`` goes to (``load``: requests in
        flight per rank), or the refusal to answer it with."""
        stalled = self.current_stalls()
        if rank not in stalled:
            return rank
        healthy = [r for r in self.front.ranks() if r not in stalled]
        if not healthy or pinned:
            return f"watchdog_kv: engine rank {rank} is stalled ({stalled[rank].describe()})" + (
                "" if healthy else " and no other rank can take the request"
            )
        return min(healthy, key=lambda r: load.get(r, 0))

    def refusal(self) -> str | None:
        """Why a new request is refused (503): no engine rank of this server can take it."""
        stalled = self.current_stalls()
        if not stalled or len(stalled) < (len(self.front.ranks()) or 1):
            return None
        detail = "; ".join(s.describe() for s in stalled.values())
        return f"watchdog_kv: every engine rank is stalled: {detail}"

    def dead_detail(self, exc: BaseException) -> str | None:
        """vLLM's engine-dead error with the processes of this server that are gone
        named (vLLM's own /health answers it with an empty 503); None for others."""
        if type(exc).__name__ != "EngineDeadError":
            return None
        records = procrecords.read_records(self.settings.state_dir)
        gone = [
            f"{r.get('role')} pid {r['pid']} ({r.get('process_name') or '?'})"
            for r in _descendants(records, self.pid)
            if not r.get("alive")
        ]
        what = f"; gone: {', '.join(gone)}" if gone else ""
        return f"{exc} (watchdog_kv: this server's engine is dead{what})"


def _descendants(records: list[dict[str, Any]], root: int) -> list[dict[str, Any]]:
    """Records of ``root`` and of processes whose parent chain leads to it."""
    by_pid = {int(r["pid"]): r for r in records}
    out = []
    for pid, rec in by_pid.items():
        seen, cur = set(), pid
        while cur not in seen and cur in by_pid:
            if cur == root:
                out.append(rec)
                break
            seen.add(cur)
            cur = int(by_pid[cur].get("ppid", -1))
    return out
