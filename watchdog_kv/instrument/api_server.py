"""The API server: the stall guard in each ``AsyncLLM``, and what it does in vLLM.

``AsyncLLM.__init__``: once vLLM's engine client exists in a process serving
from an event loop, a :class:`~watchdog_kv.step.front.FrontGuard` watches its
engine ranks, and :class:`AsyncLLMFront` carries out what the guard decides,
in vLLM's own objects:

* new requests: ``AsyncLLM.add_request`` refuses with 503 while no rank can
  serve; the core client's ``get_core_engine_for_request`` sends a request
  chosen for a stalled rank to a healthy one (``reqs_in_flight`` and
  ``engine_inflight`` kept true) and remembers each request sent, to move it
  should its rank stall;
* a rank newly stalled: each request on it that has produced nothing yet is
  re-keyed under a new internal id and sent to a healthy rank (the output
  processor's books and the client's follow it); the rest get vLLM's
  ``GracefulHTTPError`` (503 naming the rank) and are aborted;
* ``AsyncLLM.check_health``: 503 naming the stalls while every rank is stalled,
  and naming the processes gone once the engine is dead.

Everything runs on the API server's event loop or in vLLM's own calls.
"""

from __future__ import annotations

import asyncio
import copy
import itertools
from http import HTTPStatus
from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.instrument.base import Instrumentor, Layer, Target, Wrapper, unwrap, wrap
from watchdog_kv.stalls import Stall
from watchdog_kv.step.front import FrontGuard
from watchdog_kv.telemetry import get_logger, logs

__all__ = ["ApiServerInstrumentor", "AsyncLLMFront"]

ASYNC_LLM_MODULE = "vllm.v1.engine.async_llm"

_log = get_logger("watchdog_kv.step")


def _stalled_error(message: str) -> Exception:
    """vLLM's GracefulHTTPError: the client gets 503 and this message."""
    from vllm.exceptions import GracefulHTTPError

    error: Exception = GracefulHTTPError(message, HTTPStatus.SERVICE_UNAVAILABLE)
    return error


def _rank(engine: bytes) -> int:
    return int.from_bytes(engine, "little")


def _engine(rank: int) -> bytes:
    return rank.to_bytes(2, "little")


class AsyncLLMFront:
    """The guard's hands in one ``AsyncLLM`` and its core client."""

    def __init__(self, engine: Any, act: bool) -> None:
        self.engine = engine
        self.guard: FrontGuard | None = None
        self._layers: list[Layer] = []
        self._submitted: dict[str, Any] = {}  # request id -> the EngineCoreRequest sent
        self._moves = itertools.count(1)
        self._act = act

    def install(self, guard: FrontGuard) -> None:
        self.guard = guard
        if self._act:
            self._route_around()
        if getattr(self.engine, "check_health", None) is not None:
            self._layers.append(wrap(self.engine, "check_health", self._check_health))

    def close(self) -> None:
        for layer in reversed(self._layers):
            unwrap(layer)
        self._layers.clear()

    # -- what the guard reads ----------------------------------------------------------------
    def requests_by_rank(self) -> dict[str, int]:
        client = self.engine.engine_core
        inflight = getattr(client, "reqs_in_flight", None)
        if isinstance(inflight, dict):
            return {rid: _rank(e) for rid, e in list(inflight.items())}
        return dict.fromkeys(list(self.engine.output_processor.request_states), 0)

    def ranks(self) -> list[int]:
        engines = getattr(self.engine.engine_core, "core_engines", None)
        return [_rank(e) for e in engines] if engines else [0]

    # -- a stalled rank ----------------------------------------------------------------------
    async def act_on_rank(self, rank: int, stall: Stall, healthy: list[int], message: str) -> int:
        failed: list[str] = []
        moved: list[tuple[str, Any]] = []
        client = self.engine.engine_core
        engine = _engine(rank)
        with contained("step.fail_rank"):
            ids = [rid for rid, r in self.requests_by_rank().items() if r == rank]
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
            if failed:
                _log.warning("step.requests_failed", dp_rank=rank, requests=len(failed), status=503)
        if moved:
            await self._send_moved(client, engine, rank, moved)
        if failed:
            with contained("step.abort_failed_requests"):  # our own task: nothing to hand back
                await self.engine.abort(failed, internal=True)
        return len(failed) + len(moved)

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
                to_rank=_rank(client.reqs_in_flight.get(request.request_id, b"")),
            )

    # -- new requests ------------------------------------------------------------------------
    def _route_around(self) -> None:
        """New requests avoid stalled ranks; with none left they get 503 at once."""
        self._layers.append(wrap(self.engine, "add_request", self._add_request))
        client = self.engine.engine_core
        if callable(getattr(client, "get_core_engine_for_request", None)) and hasattr(
            client, "reqs_in_flight"
        ):
            self._layers.append(wrap(client, "get_core_engine_for_request", self._get_core_engine))

    def _refusal(self) -> Exception | None:
        refusal = None
        with contained("step.admission"):
            refusal = self.guard.refusal() if self.guard is not None else None
        return _stalled_error(refusal) if refusal is not None else None

    def _add_request(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        refusal = self._refusal()

        async def add_request() -> Any:
            if refusal is not None:
                raise refusal
            return await wrapped(*args, **kwargs)

        return add_request()

    def _get_core_engine(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        client = self.engine.engine_core
        request = args[0] if args else kwargs["request"]
        engine = wrapped(*args, **kwargs)
        outcome: Any = engine
        with contained("step.route_around"):
            outcome = self._reroute(client, request, engine)
        if isinstance(outcome, Exception):
            raise outcome
        with contained("step.remember_request"):
            self._remember(client, request)
        return outcome

    def _reroute(self, client: Any, request: Any, engine: bytes) -> Any:
        """The engine to use instead of a stalled one, or the error to answer with."""
        if self.guard is None:
            return engine
        rank = _rank(engine)
        load = {_rank(e): n for e, n in dict(client.engine_inflight).items()}
        pinned = getattr(request, "data_parallel_rank", None) is not None
        choice = self.guard.route(rank, pinned, load)
        if choice == rank:
            return engine
        if isinstance(choice, str):
            client.reqs_in_flight.pop(request.request_id, None)
            client.engine_inflight[engine] -= 1
            return _stalled_error(choice)
        alt = _engine(choice)
        client.reqs_in_flight[request.request_id] = alt
        client.engine_inflight[engine] -= 1
        client.engine_inflight[alt] += 1
        _log.info(
            "step.request_rerouted", request_id=request.request_id, from_rank=rank, to_rank=choice
        )
        return alt

    def _remember(self, client: Any, request: Any) -> None:
        """Keep the request sent, to send it again elsewhere should its rank stall;
        forget the ones vLLM is done with (they have left ``reqs_in_flight``)."""
        self._submitted[request.request_id] = request
        if len(self._submitted) > 2 * len(client.reqs_in_flight) + 64:
            for rid in [r for r in self._submitted if r not in client.reqs_in_flight]:
                self._submitted.pop(rid, None)

    # -- /health -----------------------------------------------------------------------------
    def _check_health(self, wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        async def check_health() -> None:
            refusal = self._refusal()
            if refusal is not None:
                raise refusal
            try:
                await wrapped(*args, **kwargs)
            except Exception as exc:
                detail = None
                with contained("step.health"):
                    detail = self.guard.dead_detail(exc) if self.guard is not None else None
                if detail is None:
                    raise
                raise _stalled_error(detail) from exc

        return check_health()


class ApiServerInstrumentor(Instrumentor):
    name = "step.front_guard"
    targets = (Target(ASYNC_LLM_MODULE, "AsyncLLM", "__init__"),)

    def __init__(self) -> None:
        super().__init__()
        self.guards: list[FrontGuard] = []

    def hooks(self) -> list[str]:
        return ["step.front_guard"] if self.patched else []

    def wrapper(self, target: Target) -> Wrapper:
        def __init__(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> None:
            wrapped(*args, **kwargs)
            with contained("step.front_guard_start"):
                self._guard(instance)

        return __init__

    def _guard(self, engine: Any) -> None:
        if not self.active:
            return
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return  # not serving from an event loop: nothing to answer early
        front = AsyncLLMFront(engine, act=self.settings.stall_action != "observe")
        guard = FrontGuard(front, self.settings, loop)
        front.install(guard)
        self.guards.append(guard)
        logs.set_recorder(guard.beacon.record)

    def teardown(self) -> None:
        for guard in self.guards:
            guard.stop()
        self.guards.clear()
