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
   in flight on that rank is failed at once with HTTP 503 and a message naming
   the rank, the phase and the deadline (a streamed response gets an error
   event, then ``[DONE]``), and vLLM is told to abort it there. While the rank
   stays stalled, new requests go to another data-parallel rank; with no rank
   left, they are refused with 503 at once instead of hanging.

It never touches vLLM's state from its own thread: the failing runs on the API
server's event loop, through vLLM's own calls (``RequestOutputCollector.put``,
``AsyncLLM.abort``).
"""

from __future__ import annotations

import asyncio
import os
import threading
import time
from collections import Counter
from http import HTTPStatus
from typing import Any

from watchdog_kv import process as procrecords
from watchdog_kv import threads
from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.patching import InstancePatches
from watchdog_kv.step.beacon import Beacon, beacon_path, depth, read_beacon
from watchdog_kv.step.monitor import Stall, StallRules, engine_of
from watchdog_kv.telemetry import get_logger

__all__ = ["FrontGuard", "engine_rank"]

_log = get_logger("watchdog_kv.step")


def _stalled_error(message: str) -> Exception:
    """vLLM's GracefulHTTPError: the client gets 503 and this message."""
    from vllm.exceptions import GracefulHTTPError

    error: Exception = GracefulHTTPError(message, HTTPStatus.SERVICE_UNAVAILABLE)
    return error


def engine_rank(stall: Stall, records: list[dict[str, Any]]) -> int:
    """The data-parallel rank a stalled process serves (a worker: its engine core's)."""
    if stall.role == "engine_core":
        return int(stall.rank or 0)
    by_pid = {int(r["pid"]): r for r in records}
    parent = by_pid.get(int(by_pid.get(stall.pid, {}).get("ppid", -1)))
    if parent is not None and parent.get("role") == "engine_core":
        return int(parent.get("rank") or 0)
    return 0


class FrontGuard:
    def __init__(self, engine: Any, settings: Settings, loop: asyncio.AbstractEventLoop) -> None:
        self.engine, self.settings, self.loop = engine, settings, loop
        self.pid = os.getpid()
        self.beacon = Beacon(settings.state_dir)
        self.stalled: dict[int, Stall] = {}
        self._since: dict[int, float] = {}
        self._unacked: dict[int, tuple[int, float]] = {}  # rank -> (requests, failed at)
        self._rules = StallRules()
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._patches = InstancePatches()
        self._route_around()
        self._thread = threads.start(self._run, "wkv-front-guard")

    # -- the loop ---------------------------------------------------------------------------
    def _run(self) -> None:
        while not self._stop.wait(self.settings.monitor_interval_s):
            with contained("step.front_guard"):
                self.tick()

    def stop(self) -> None:
        self._stop.set()
        self._patches.undo()

    def _requests_by_rank(self) -> dict[str, int]:
        client = self.engine.engine_core
        inflight = getattr(client, "reqs_in_flight", None)
        if isinstance(inflight, dict):
            return {rid: int.from_bytes(e, "little") for rid, e in list(inflight.items())}
        return dict.fromkeys(list(self.engine.output_processor.request_states), 0)

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
        counts = Counter(self._requests_by_rank().values())
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
                asyncio.run_coroutine_threadsafe(self._fail_rank(rank, stall), self.loop)

    # -- acting (on the event loop) -----------------------------------------------------------
    async def _fail_rank(self, rank: int, stall: Stall) -> None:
        failed: list[str] = []
        with contained("step.fail_rank"):
            ids = [rid for rid, r in self._requests_by_rank().items() if r == rank]
            message = (
                f"watchdog_kv: engine rank {rank} stalled: {stall.describe()}; the request was "
                "failed instead of waiting for it"
            )
            for rid in ids:
                state = self.engine.output_processor.request_states.get(rid)
                queue = getattr(state, "queue", None)
                if queue is not None:
                    queue.put(_stalled_error(message))
                    failed.append(rid)
            if failed:
                self._unacked[rank] = (len(failed), time.monotonic())
            _log.warning("step.requests_failed", dp_rank=rank, requests=len(failed), status=503)
        if failed:
            with contained("step.abort_failed_requests"):  # our own task: nothing to hand back
                await self.engine.abort(failed, internal=True)

    def _route_around(self) -> None:
        """New requests avoid stalled ranks; with none left they get 503 at once."""
        client = self.engine.engine_core
        if self.settings.stall_action == "observe":
            return
        original_add = self.engine.add_request

        async def add_request(*args: Any, **kwargs: Any) -> Any:
            refusal = None
            with contained("step.admission"):
                refusal = self._refusal()
            if refusal is not None:
                raise refusal
            return await original_add(*args, **kwargs)

        self._patches.replace(self.engine, "add_request", add_request)
        choose = getattr(client, "get_core_engine_for_request", None)
        if choose is None or not hasattr(client, "reqs_in_flight"):
            return

        def get_core_engine_for_request(request: Any) -> Any:
            engine = choose(request)
            outcome: Any = engine
            with contained("step.route_around"):
                outcome = self._reroute(client, request, engine)
            if isinstance(outcome, Exception):
                raise outcome
            return outcome

        self._patches.replace(client, "get_core_engine_for_request", get_core_engine_for_request)

    def _current_stalls(self) -> dict[int, Stall]:
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

    def _reroute(self, client: Any, request: Any, engine: Any) -> Any:
        """The engine to use instead of a stalled one, or the error to answer with."""
        stalled = self._current_stalls()
        rank = int.from_bytes(engine, "little")
        if rank not in stalled:
            return engine
        healthy = [e for e in client.core_engines if int.from_bytes(e, "little") not in stalled]
        if not healthy or getattr(request, "data_parallel_rank", None) is not None:
            client.reqs_in_flight.pop(request.request_id, None)
            client.engine_inflight[engine] -= 1
            return _stalled_error(
                f"watchdog_kv: engine rank {rank} is stalled ({stalled[rank].describe()})"
                + ("" if healthy else " and no other rank can take the request")
            )
        alt = min(healthy, key=lambda e: client.engine_inflight[e])
        client.reqs_in_flight[request.request_id] = alt
        client.engine_inflight[engine] -= 1
        client.engine_inflight[alt] += 1
        _log.info(
            "step.request_rerouted",
            request_id=request.request_id,
            from_rank=rank,
            to_rank=int.from_bytes(alt, "little"),
        )
        return alt

    def _refusal(self) -> Exception | None:
        """A 503 for a new request when no engine rank of this server can take it."""
        stalled = self._current_stalls()
        if not stalled:
            return None
        ranks = len(getattr(self.engine.engine_core, "core_engines", [0])) or 1
        if len(stalled) < ranks:
            return None
        detail = "; ".join(s.describe() for s in stalled.values())
        return _stalled_error(f"watchdog_kv: every engine rank is stalled: {detail}")


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
