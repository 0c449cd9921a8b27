"""The router's recovery ladder: one request, every rung tried before the client sees an error.

Within the request's budget (``WATCHDOG_KV_REQUEST_BUDGET``):

1. **Prefill.** Ask an available prefill server for the KV (round robin). If it
   fails (unreachable, timed out, 5xx, stalled), ask the next one.
2. **Compute on the decode.** No prefill answered (or none is available): the
   decode computes the prompt itself -- the request without ``kv_transfer_params``.
3. **Decode.** Send the request to an available decode. If it fails before the
   client has been sent anything, send it to another decode (recomputing the
   prompt there: the failed one may have taken the KV). If there is none, wait
   for one that is starting or restarting.
4. **Continue.** A streamed answer whose decode dies mid-stream continues on
   another (or the restarted) decode from the tokens already sent
   (:mod:`watchdog_kv.router.stream`).

A completions request with several prompts gets one hand-off per prompt: a
prefill answers one set of ``kv_transfer_params`` per request, which belongs to
its first prompt only. Not streamed, the prompts run down ladders of their own,
concurrently, and their answers are merged in order (choice indices, usage);
streamed, the decode computes every prompt itself (``decode_computes_prompt``).

A 4xx from vLLM is the client's own mistake and goes straight back. Only when
every rung has failed, or the budget is spent, does the client get the last
error, which names the servers tried. Every rung taken is logged
(``request.recovered``) and counted in ``/watchdog/status``.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from watchdog_kv.config import Settings
from watchdog_kv.router.handoff import (
    Backend,
    HandoffError,
    decode_whole,
    retryable,
    run_prefill,
    several_prompts,
)
from watchdog_kv.router.spans import RequestTrace, cause_of
from watchdog_kv.router.stream import ClientGone, StreamRelay

__all__ = ["Backends", "Ladder", "Recoveries", "merge_answers"]

_ANSWERED = ("upstream_unavailable", "upstream_error")  # an HTTP error status: it is alive


def merge_answers(answers: list[dict[str, Any]], n: int, answer_id: str) -> dict[str, Any]:
    """One completions answer from one answer per prompt, as vLLM numbers them: the
    choices of prompt ``i`` take indices ``i*n`` to ``i*n + n - 1``; usage is summed."""
    choices = []
    usage: dict[str, int] = {}
    for i, answer in enumerate(answers):
        for choice in answer.get("choices") or []:
            choices.append({**choice, "index": i * n + int(choice.get("index") or 0)})
        for key, value in (answer.get("usage") or {}).items():
            if isinstance(value, int) and not isinstance(value, bool):
                usage[key] = usage.get(key, 0) + value
    merged = {**answers[0], "id": answer_id, "choices": sorted(choices, key=lambda c: c["index"])}
    if any(answer.get("usage") for answer in answers):
        merged["usage"] = {**(answers[0].get("usage") or {}), **usage}
    return merged


class Backends(Protocol):
    """What the router needs to know about the servers (the supervisor answers)."""

    def ready(self) -> bool: ...
    def roles(self) -> set[str]: ...
    def available(self, role: str) -> list[Backend]: ...
    async def wait_available(self, role: str, timeout_s: float) -> list[Backend]: ...
    def status(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...
    def serving_role(self) -> str: ...
    def counts(self) -> dict[str, Any]: ...

    @property
    def run_dir(self) -> Path: ...


class Recoveries:
    """Rungs taken by the router since it started, by kind; and a round-robin per role."""

    def __init__(self) -> None:
        self.counts: Counter[str] = Counter()
        self._turn: dict[str, itertools.count[int]] = {}

    def rotate(self, role: str, backends: list[Backend]) -> list[Backend]:
        if not backends:
            return backends
        turn = next(self._turn.setdefault(role, itertools.count()))
        start = turn % len(backends)
        return backends[start:] + backends[:start]


class Ladder:
    """Serve one request through the rungs; see the module doc."""

    def __init__(
        self,
        request: web.Request,
        http: aiohttp.ClientSession,
        backends: Backends,
        settings: Settings,
        recoveries: Recoveries,
        path: str,
        body: dict[str, Any],
        request_id: str,
        log: Any,
        trace: RequestTrace,
    ) -> None:
        self.request, self.http, self.backends = request, http, backends
        self.trace = trace
        self.settings, self.recoveries = settings, recoveries
        self.path, self.body, self.request_id, self.log = path, body, request_id, log
        self.deadline = time.monotonic() + settings.request_budget_s
        self.rungs: list[str] = []
        self.servers: list[str] = []
        self._stream: StreamRelay | None = None
        self._dead: list[Backend] = []  # servers whose engine was seen dead: never again

    def left(self) -> float:
        return self.deadline - time.monotonic()

    def rung(self, kind: str, cause: str, **fields: Any) -> None:
        self.rungs.append(kind)
        self.recoveries.counts[kind] += 1
        self.log.warning("request.recovered", rung=kind, cause=cause, **fields)
        self.trace.label("watchdog.recovery", cause, kind, **fields)

    def output(self) -> str | None:
        """The text the client was sent, when it is at hand (streams)."""
        return self._stream.text if self._stream is not None else None

    async def run(self) -> web.StreamResponse:
        params = None
        role = self.backends.serving_role()
        prompts = several_prompts(self.path, self.body)
        if prompts is not None and "prefill" in self.backends.roles():
            if not self.body.get("stream"):
                return await self._fan_out(prompts)
            self.rung(
                "decode_computes_prompt",
                "admission",
                reason=f"{len(prompts)} prompts in one streamed request: a hand-off carries "
                "the KV of one prompt",
            )
            return await self._decode(role, None)
        if "prefill" in self.backends.roles():
            params = await self._prefill()
        return await self._decode(role, params)

    async def _fan_out(self, prompts: list[Any]) -> web.StreamResponse:
        """One ladder per prompt, concurrently; their answers merged in order."""
        ladders = [
            Ladder(
                self.request,
                self.http,
                self.backends,
                self.settings,
                self.recoveries,
                self.path,
                {**self.body, "prompt": prompt},
                f"{self.request_id}-p{i}",
                self.log.bind(prompt=i),
                self.trace,
            )
            for i, prompt in enumerate(prompts)
        ]
        self.log.info("request.fanned_out", prompts=len(prompts))
        results = await asyncio.gather(
            *(ladder.run() for ladder in ladders), return_exceptions=True
        )
        for ladder in ladders:
            self.rungs += ladder.rungs
            self.servers += ladder.servers
        for result in results:
            if isinstance(result, BaseException):
                raise result  # the first failure, as a single prompt's would be
        answers = [json.loads(getattr(result, "body", b"") or b"{}") for result in results]
        merged = merge_answers(answers, int(self.body.get("n") or 1), f"cmpl-{self.request_id}")
        response = web.json_response(merged)
        decodes = [str(getattr(r, "headers", {}).get("X-Watchdog-Decode", "")) for r in results]
        response.headers["X-Watchdog-Decode"] = ",".join(decodes)
        response.headers["X-Watchdog-Recovery"] = ",".join(self.rungs) or "none"
        return response

    # -- rungs 1 and 2 ---------------------------------------------------------------
    async def _prefill(self) -> dict[str, Any] | None:
        tried: list[str] = []
        errors: list[HandoffError] = []
        for backend in self.recoveries.rotate("prefill", self.backends.available("prefill")):
            if self.left() <= 0:
                break
            try:
                with self.trace.call("prefill", backend) as call:
                    params = await run_prefill(
                        self.http,
                        backend,
                        self.path,
                        self.body,
                        self.request_id,
                        min(self.settings.prefill_timeout_s, self.left()),
                        call.headers,
                        call.traceparent,
                    )
            except HandoffError as err:
                if not retryable(err):
                    raise
                tried.append(backend.name)
                errors.append(err)
                self.log.warning("request.prefill_failed", server=backend.name, error=err.message)
                continue
            self.servers.append(backend.name)
            if tried:
                self.rung("prefill_retry", cause_of(errors[-1]), server=backend.name, failed=tried)
            return params
        self.rung(
            "decode_computes_prompt",
            cause_of(errors[-1]) if errors else "admission",
            reason="; ".join(e.message for e in errors)
            if errors
            else "no prefill server is available",
        )
        return None

    # -- rungs 3 and 4 ---------------------------------------------------------------
    async def _decode(self, role: str, params: dict[str, Any] | None) -> web.StreamResponse:
        relay = StreamRelay(
            self.request, self.path, self.body, self.request_id, self.settings.enabled
        )
        # an answer that cannot be continued and is not streamed is relayed whole: there
        # is no progress to watch or continue from
        stream = self._stream = None if relay.whole and relay.why_not else relay
        failed: list[Backend] = []
        last: HandoffError | None = None
        while True:
            backend = await self._pick(role, failed, last)
            if backend is None:
                assert last is not None
                return await self._give_up(stream, last)
            self.servers.append(backend.name)
            try:
                with self.trace.call(
                    "decode",
                    backend,
                    kv="remote" if params else "computed here",
                    continuation=bool(stream and stream.started) or None,
                ) as call:
                    if stream is None:
                        response = await decode_whole(
                            self.http,
                            backend,
                            self.path,
                            {**self.body, "kv_transfer_params": call.params(params)}
                            if params
                            else self.body,
                            self.request_id,
                            max(self.left(), 1.0),
                            call.headers,
                        )
                        response.headers["X-Watchdog-Decode"] = backend.name
                        response.headers["X-Watchdog-Recovery"] = ",".join(self.rungs) or "none"
                        return response
                    stream.headers.setdefault("X-Watchdog-Decode", backend.name)
                    stream.headers["X-Watchdog-Recovery"] = ",".join(self.rungs) or "none"
                    return await stream.relay(
                        self.http,
                        backend,
                        call.params(params),
                        self.settings.decode_idle_timeout_s,
                        call.headers,
                    )
            except ClientGone:
                self.log.info("request.client_gone", server=backend.name)
                return stream.response if stream and stream.response else web.Response(status=499)
            except HandoffError as err:
                if not retryable(err) and not (stream and stream.started):
                    raise
                last = err
                failed.append(backend)
                if err.kind == "engine_dead":
                    self._dead.append(backend)
                self.log.warning("request.decode_failed", server=backend.name, error=err.message)
                if stream is not None and stream.started and stream.why_not:
                    why = f"; the answer cannot be continued on another decode ({stream.why_not})"
                    return await self._give_up(
                        stream, HandoffError(err.status, err.message + why, err.kind, **err.fields)
                    )
                params = None  # the next decode computes the prompt: this one may have the KV
                if stream is not None and stream.started:
                    self.rung(
                        "decode_continues_answer",
                        cause_of(err),
                        failed=backend.name,
                        tokens_sent=len(stream.emitted),
                    )
                else:
                    self.rung("decode_retry", cause_of(err), failed=backend.name)

    async def _pick(
        self, role: str, failed: list[Backend], last: HandoffError | None
    ) -> Backend | None:
        """The next server of ``role``: preferably one that has not failed this request
        (a restarted server counts as new); else wait, within the budget, for one that
        is starting or restarting. A server that failed once is tried once more: at
        once if it answered (a data-parallel server's guard sends the request to a
        healthy rank), a moment later if it did not (a process that has just died
        takes a moment to be seen dead) -- but never one whose engine it saw dead:
        only its restarted self (a new epoch) is asked again."""
        while self.left() > 0:
            found = self.recoveries.rotate(role, self.backends.available(role))
            if not found:
                found = await self.backends.wait_available(role, self.left())
            fresh = [b for b in found if b not in failed]
            if fresh:
                return fresh[0]
            if not found or last is None:  # nothing available, or nothing failed yet
                break
            again = [b for b in found if failed.count(b) < 2 and b not in self._dead]
            if not again:
                if any(b in self._dead for b in found):
                    # still listed ready: the supervisor is about to see it dead and
                    # restart it; wait for that (within the budget) rather than give up
                    await asyncio.sleep(min(0.5, max(0.0, self.left())))
                    continue
                break
            if last.kind in _ANSWERED:
                return again[0]
            await asyncio.sleep(min(0.5, max(0.0, self.left())))
            if again[0] in self.backends.available(role):
                return again[0]
        if last is None:
            raise self._unavailable(role)
        return None

    def _unavailable(self, role: str) -> HandoffError:
        """Why no server of ``role`` can take the request, naming every one of them."""
        stalled, reasons = [], []
        for name, h in self.backends.health().items():
            if h.get("role") != role:
                continue
            if h.get("stalls"):
                stalled.append(f"{name} is stalled: {h['stalls'][0]}")
            else:
                reasons.append(f"{name} is {h.get('state')}")
        if stalled:
            return HandoffError(
                503,
                "; ".join(stalled + reasons) + "; not sending the request into a stalled server",
                "server_stalled",
            )
        return HandoffError(
            503,
            f"no {role} server can take the request ({', '.join(reasons) or 'none configured'})",
            "service_unavailable",
        )

    async def _give_up(self, stream: StreamRelay | None, err: HandoffError) -> web.StreamResponse:
        spent = self.left() <= 0
        note = (
            f" (request budget of {self.settings.request_budget_s:g} s spent)"
            if spent
            else f" (tried: {', '.join(self.servers)})"
        )
        final = HandoffError(err.status, err.message + note, err.kind, **err.fields)
        if stream is not None and stream.committed:
            self.log.error("request.stream_failed", error=final.message, rungs=self.rungs)
            try:
                return await stream.fail(final)
            except ClientGone:
                assert stream.response is not None
                return stream.response
        raise final
