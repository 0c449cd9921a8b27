"""The HTTP calls of the prefill -> decode hand-off (the ladder in
:mod:`watchdog_kv.router.ladder` decides which servers they go to).

1. The request goes to the prefill server with ``max_tokens: 1``, no streaming,
   and ``kv_transfer_params: {"do_remote_decode": true}``. vLLM computes the
   prompt's KV, keeps the blocks under a lease, and answers with the
   ``kv_transfer_params`` a decode needs to pull them (engine id, block ids,
   host, port).
2. The original request, with those params added, goes to the decode server,
   which pulls the KV over NIXL instead of computing it, and generates. Its
   answer is relayed to the client (streams by :mod:`watchdog_kv.router.stream`).

Every wait is bounded: the prefill call by ``WATCHDOG_KV_PREFILL_TIMEOUT``, the
decode by ``WATCHDOG_KV_DECODE_IDLE_TIMEOUT`` of silence. A failure is an
OpenAI-shaped error naming the server and the cause; a 4xx from vLLM (a bad
request) is passed through to the client as it is.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import aiohttp
from aiohttp import web

from watchdog_kv import wire
from watchdog_kv.telemetry import get_logger

__all__ = [
    "ENGINE_DEAD",
    "Backend",
    "HandoffError",
    "decode_whole",
    "engine_dead",
    "idle_timeout",
    "no_answer",
    "prefill_body",
    "relay_error",
    "retryable",
    "run_prefill",
    "several_prompts",
    "silent",
    "validate_body",
]

_log = get_logger("watchdog_kv.router")

# vLLM's EngineDeadError: its engine core (or a worker under it) is gone for good; the
# API server answers with it until it shuts itself down.
ENGINE_DEAD = "EngineCore encountered an issue"


def engine_dead(status: int, detail: object) -> bool:
    """Does this answer say the server's engine is dead (never worth asking again)?"""
    return status >= 500 and ENGINE_DEAD in str(detail)


@dataclass(frozen=True)
class Backend:
    name: str
    url: str
    epoch: int = 0  # how many times the server was started: a restarted one is new


class HandoffError(Exception):
    """A request that cannot be served; becomes an OpenAI-style error response."""

    def __init__(self, status: int, message: str, kind: str, **fields: Any) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.fields = status, message, kind, fields

    def response(self) -> web.Response:
        return error_response(self.status, self.message, self.kind)


def error_response(status: int, message: str, kind: str) -> web.Response:
    body = {"error": {"message": message, "type": kind, "code": status}}
    return web.json_response(body, status=status)


def validate_body(raw: bytes) -> dict[str, Any]:
    """Parse a request body; malformed input is a 400 naming what is wrong."""
    try:
        body = json.loads(raw)
    except (ValueError, UnicodeDecodeError) as exc:
        raise HandoffError(
            400, f"request body is not valid JSON: {exc}", "invalid_request_error"
        ) from None
    if not isinstance(body, dict):
        raise HandoffError(400, "request body must be a JSON object", "invalid_request_error")
    if "stream" in body and not isinstance(body["stream"], bool):
        raise HandoffError(400, "'stream' must be true or false", "invalid_request_error")
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is not None and (isinstance(value, bool) or not isinstance(value, int)):
            raise HandoffError(400, f"'{key}' must be an integer", "invalid_request_error")
    if "kv_transfer_params" in body:
        raise HandoffError(
            400,
            "'kv_transfer_params' is set by the router, not by clients",
            "invalid_request_error",
        )
    return body


def several_prompts(path: str, body: dict[str, Any]) -> list[Any] | None:
    """The prompts of a completions request that has more than one, else None.

    A prefill answers one ``kv_transfer_params`` for the whole request (the first
    prompt's), so one hand-off cannot serve several prompts: each needs its own.
    ``prompt`` may be a string, a list of strings, a list of token ids (one prompt) or
    a list of lists of token ids.
    """
    if path.endswith("/chat/completions"):
        return None
    prompt = body.get("prompt")
    if not isinstance(prompt, list) or len(prompt) < 2:
        return None
    if all(isinstance(p, int) and not isinstance(p, bool) for p in prompt):
        return None  # one prompt given as token ids
    return list(prompt)


def prefill_body(body: dict[str, Any], traceparent: str | None = None) -> dict[str, Any]:
    """The request as sent to the prefill server: one token, no stream, remote decode
    (and the call's trace context, for the prefill's engine processes)."""
    out = dict(body)
    out["kv_transfer_params"] = wire.prefill_params(traceparent)
    out["stream"] = False
    out["max_tokens"] = 1
    if "max_completion_tokens" in out:
        out["max_completion_tokens"] = 1
    for key in ("stream_options", "min_tokens", "min_completion_tokens"):
        out.pop(key, None)
    return out


def no_answer(role: str, backend: Backend, exc: BaseException, timeout_s: float) -> HandoffError:
    """The error for a server that timed out (504) or could not be reached (502)."""
    if isinstance(exc, TimeoutError):
        return HandoffError(
            504,
            f"{role} server {backend.name} did not answer within {timeout_s:g} s",
            f"{role}_timeout",
            server=backend.name,
        )
    return HandoffError(
        502,
        f"{role} server {backend.name} is unreachable: {exc}",
        f"{role}_unreachable",
        server=backend.name,
    )


async def relay_error(resp: aiohttp.ClientResponse, backend: Backend) -> HandoffError:
    text = await resp.text()
    try:
        detail = json.loads(text).get("error", {}).get("message") or text
    except (ValueError, AttributeError):
        detail = text
    if 400 <= resp.status < 500:
        # vLLM rejected the request itself: the client's mistake, passed through.
        return HandoffError(resp.status, str(detail), "invalid_request_error")
    if engine_dead(resp.status, detail):
        return HandoffError(
            502,
            f"{backend.name}'s engine died: {detail}",
            "engine_dead",
            server=backend.name,
        )
    if resp.status == 503:
        # Unavailable for now (a stalled engine's requests are failed this way):
        # retryable, so it stays a 503 for the client.
        return HandoffError(
            503,
            f"{backend.name} answered 503: {detail}",
            "upstream_unavailable",
            server=backend.name,
        )
    return HandoffError(
        502,
        f"{backend.name} answered {resp.status}: {detail}",
        "upstream_error",
        server=backend.name,
    )


async def run_prefill(
    http: aiohttp.ClientSession,
    backend: Backend,
    path: str,
    body: dict[str, Any],
    request_id: str,
    timeout_s: float,
    headers: dict[str, str] | None = None,
    traceparent: str | None = None,
) -> dict[str, Any]:
    """Ask the prefill server for the KV; return the ``kv_transfer_params`` it gives."""
    try:
        async with http.post(
            f"{backend.url}{path}",
            json=prefill_body(body, traceparent),
            headers={"X-Request-Id": request_id, **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as resp:
            if resp.status != 200:
                raise await relay_error(resp, backend)
            data = await resp.json()
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise no_answer("prefill", backend, exc, timeout_s) from None
    params = data.get("kv_transfer_params") if isinstance(data, dict) else None
    if not isinstance(params, dict) or not params.get(wire.REMOTE_ENGINE_ID):
        raise HandoffError(
            502,
            f"prefill server {backend.name} returned no kv_transfer_params "
            "(is it running with a KV connector?)",
            "prefill_bad_answer",
            server=backend.name,
        )
    return params


async def decode_whole(
    http: aiohttp.ClientSession,
    backend: Backend,
    path: str,
    body: dict[str, Any],
    request_id: str,
    timeout_s: float,
    headers: dict[str, str] | None = None,
) -> web.Response:
    """Send a non-streamed request to a decode server and return its whole answer
    (for requests whose answer cannot be continued: nothing shows progress until it is
    whole, so the bound is on the whole answer -- the rest of the request's budget)."""
    try:
        async with http.post(
            f"{backend.url}{path}",
            json=body,
            headers={"X-Request-Id": request_id, **(headers or {})},
            timeout=aiohttp.ClientTimeout(total=timeout_s),
        ) as upstream:
            if upstream.status != 200:
                raise await relay_error(upstream, backend)
            payload = await upstream.read()
            return web.Response(
                body=payload, status=200, content_type=upstream.content_type or "application/json"
            )
    except (TimeoutError, aiohttp.ClientError) as exc:
        raise no_answer("decode", backend, exc, timeout_s) from None


def idle_timeout(seconds: float) -> aiohttp.ClientTimeout:
    """No bound on the whole answer, ``seconds`` on connecting and on each silence."""
    return aiohttp.ClientTimeout(total=None, sock_connect=seconds, sock_read=seconds)


def silent(role: str, backend: Backend, seconds: float) -> HandoffError:
    return HandoffError(
        504,
        f"{role} server {backend.name} went silent for {seconds:g} s",
        f"{role}_timeout",
        server=backend.name,
    )


def retryable(err: HandoffError) -> bool:
    """Could another server answer? Not for the client's own mistakes (4xx)."""
    return not 400 <= err.status < 500 or err.status in (408, 429)
