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

It never touches vLLM's state from its own thread: the moving and failing run
on the API server's event loop, through vLLM's own calls
(``RequestOutputCollector.put``, ``AsyncLLM.abort``, the client's
``add_request_async``).
"""

from __future__ import annotations

import asyncio
import copy
import itertools
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
from watchdog_kv.beacon import Beacon, beacon_path, depth, read_beacon
from watchdog_kv.stalls import Stall, StallRules, engine_of, engine_rank
from watchdog_kv.telemetry import get_logger

__all__ = ["FrontGuard", "engine_rank"]

_log = get_logger("watchdog_kv.step")


def _stalled_error(message: str) -> Exception:
    """vLLM's GracefulHTTPError: the client gets 503 and this message."""
    from vllm.exceptions import GracefulHTTPError

    error: Exception = GracefulHTTPError(message, HTTPStatus.SERVICE_UNAVAILABLE)
    return error


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
        self._submitted: dict[str, Any] = {}  # request id -> the EngineCoreRequest sent
        self._moves = itertools.count(1)
        self._route_around()
        self._tell_health()
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
                asyncio.run_coroutine_threadsafe(self._act_on_rank(rank, stall), self.loop)

    # -- acting (on the event loop) -----------------------------------------------------------
    async def _act_on_rank(self, rank: int, stall: Stall) -> None:
        """Move what can be moved off a newly stalled rank; fail the rest with 503."""
        failed: list[str] = []
        moved: list[tuple[str, Any]] = []
        client = self.engine.engine_core
        engine = rank.to_bytes(2, "little")
        with contained("step.fail_rank"):
            ids = [rid for rid, r in self._requests_by_rank().items() if r == rank]
            message = (
                f"watchdog_kv: engine rank {rank} stalled: {stall.describe()}; the request was "
                "failed instead of waiting for it"
            )
            healthy = self._healthy_engines(client, set(self.stalled))
            for rid in ids:
                new = None
                if healthy:
                    with contained("step.move_request"):
                        new = self._move(client, rid, engine)
                if new is not None:
                    moved.append((rid, new))
                    continue
                state = self.engine.output_processor.request_states.get(rid)
                queue = getattr(state, "queue", None)
                if queue is not None:
                    queue.put(_stalled_error(message))
                    failed.append(rid)
            if failed or moved:
                self._unacked[rank] = (len(failed) + len(moved), time.monotonic())
            if failed:
                _log.warning("step.requests_failed", dp_rank=rank, requests=len(failed), status=503)
        if moved:
            await self._send_moved(client, engine, rank, moved)
        if failed:
            with contained("step.abort_failed_requests"):  # our own task: nothing to hand back
                await self.engine.abort(failed, internal=True)

    @staticmethod
    def _healthy_engines(client: Any, stalled: Any) -> list[bytes]:
        """The engines of ``client`` whose rank is not in ``stalled``."""
        return [
            e
            for e in getattr(client, "core_engines", [])
            if int.from_bytes(e, "little") not in stalled
        ]

    def _move(self, client: Any, rid: str, engine: bytes) -> Any:
        """Take request ``rid`` off the stalled ``engine`` in vLLM's books, under a new
        internal id, and return the request to send in its place -- or None when it
        cannot be moved without the client seeing it: it has produced output already
        (its tokens came from the stalled engine), it is one of n > 1, it was pinned to
        its rank, or it was never seen here. Synchronous: no output can arrive between
        the re-keying steps."""
        import msgspec

        request = self._submitted.get(rid)
        processor = self.engine.output_processor
        state = processor.request_states.get(rid)
        if (
            request is None
            or state is None
            or not state.is_prefilling
            or state.parent_req is not None
            or getattr(state, "streaming_input", False)
            or getattr(request, "resumable", False)
            or getattr(request, "data_parallel_rank", None) is not None
            or client.reqs_in_flight.get(rid) != engine
        ):
            return None
        new_id = f"{rid}-wkvm{next(self._moves)}"
        params = request.sampling_params
        extra = getattr(params, "extra_args", None)
        if isinstance(extra, dict) and "kv_transfer_params" in extra:
            # the stalled rank may have begun to pull the KV: the new one computes it
            params = copy.copy(params)
            params.extra_args = {k: v for k, v in extra.items() if k != "kv_transfer_params"}
        replacement = msgspec.structs.replace(request, request_id=new_id, sampling_params=params)
        client.reqs_in_flight.pop(rid, None)
        client.engine_inflight[engine] -= 1
        processor.request_states[new_id] = processor.request_states.pop(rid)
        state.request_id = new_id
        siblings = processor.external_req_ids.get(state.external_req_id)
        if siblings is not None:
            siblings[:] = [new_id if i == rid else i for i in siblings]
        if state.queue is not None:
            state.queue.request_id = new_id  # a client that leaves aborts the new one
        self._submitted.pop(rid, None)
        return replacement

    async def _send_moved(
        self, client: Any, engine: bytes, rank: int, moved: list[tuple[str, Any]]
    ) -> None:
        with contained("step.abort_moved_requests"):
            await client._abort_requests([rid for rid, _ in moved], engine)
        for rid, request in moved:
            state = self.engine.output_processor.request_states.get(request.request_id)
            if state is None:  # its client left while the old one was being aborted
                continue
            try:
                await client.add_request_async(request)
            except Exception as exc:  # the healthy rank would not take it: the client is told
                _log.warning("step.move_failed", request_id=rid, error=f"{exc}")
                if getattr(state, "queue", None) is not None:
                    state.queue.put(
                        _stalled_error(
                            f"watchdog_kv: engine rank {rank} stalled; moving the "
                            f"request to another rank failed: {exc}"
                        )
                    )
                with contained("step.abort_moved_request"):  # nothing may keep it
                    await self.engine.abort(request.request_id, internal=True)
                continue
            _log.info(
                "step.request_moved",
                request_id=rid,
                new_request_id=request.request_id,
                from_rank=rank,
                to_rank=int.from_bytes(
                    client.reqs_in_flight.get(request.request_id, b""), "little"
                ),
            )

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
            with contained("step.remember_request"):
                self._remember(client, request)
            return outcome

        self._patches.replace(client, "get_core_engine_for_request", get_core_engine_for_request)

    def _remember(self, client: Any, request: Any) -> None:
        """Keep the request sent, to send it again elsewhere should its rank stall;
        forget the ones vLLM is done with (they have left ``reqs_in_flight``)."""
        self._submitted[request.request_id] = request
        if len(self._submitted) > 2 * len(client.reqs_in_flight) + 64:
            for rid in [r for r in self._submitted if r not in client.reqs_in_flight]:
                self._submitted.pop(rid, None)

    def _tell_health(self) -> None:
        """vLLM's ``/health`` answers 503, naming the stalls, while no rank can serve."""
        original = getattr(self.engine, "check_health", None)
        if original is None:
            return

        async def check_health() -> None:
            refusal = None
            with contained("step.health"):
                refusal = self._refusal()
            if refusal is not None:
                raise refusal
            try:
                await original()
            except Exception as exc:
                detail = None
                with contained("step.health"):
                    detail = self._dead_detail(exc)
                if detail is None:
                    raise
                raise _stalled_error(detail) from exc

        self._patches.replace(self.engine, "check_health", check_health)

    def _dead_detail(self, exc: BaseException) -> str | None:
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
        healthy = self._healthy_engines(client, stalled)
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
