"""The router's part of a request's trace.

One root span per client request (``POST /v1/completions``, kind SERVER, under the
client's own ``traceparent`` if it sent one), and one CLIENT span per call to a
server (``prefill``, ``decode``), whose ``traceparent`` goes to the server both as an
HTTP header (vLLM's own spans hang under it when its tracing is on) and inside
``kv_transfer_params`` (the engine processes' KV spans hang under it). Every rung of
the ladder, every failed call and every detection the supervisor makes about a
server while the request is on it is an event with ``watchdog.cause`` and
``watchdog.action`` on the root span, so the trace of a recovered request shows the
whole ladder in order.

Prompt and output text are recorded only with ``WATCHDOG_KV_TRACE_TEXT=true``.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

from aiohttp import web
from opentelemetry import trace
from opentelemetry.trace import Span, SpanKind, Status, StatusCode

from watchdog_kv import wire
from watchdog_kv.router.handoff import Backend, HandoffError, retryable
from watchdog_kv.telemetry import tracing

__all__ = ["InFlight", "RequestTrace", "cause_of"]

_TRACER = "watchdog_kv.router"


def cause_of(err: HandoffError) -> str:
    """The failure cause a trace reader filters on, from a router error."""
    if 400 <= err.status < 500 and err.status not in (408, 429):
        return "bad_input"
    if err.kind == "engine_dead":
        return "crash"
    if err.kind.endswith("_timeout"):
        return "stall"  # the server went silent
    if err.kind == "server_stalled" or "stalled" in err.message:
        return "stall"
    if err.kind in ("upstream_unavailable", "service_unavailable", "service_draining"):
        return "admission"
    if err.kind.endswith("_unreachable") or err.kind == "decode_failed":
        return "transport"
    return "server_error"


class InFlight:
    """Root spans of the requests in flight, by the server each is on."""

    def __init__(self) -> None:
        self._on: dict[str, set[RequestTrace]] = {}

    def add(self, server: str, request: RequestTrace) -> None:
        self._on.setdefault(server, set()).add(request)

    def remove(self, server: str, request: RequestTrace) -> None:
        self._on.get(server, set()).discard(request)

    def label(self, server: str, name: str, cause: str, action: str, **attrs: Any) -> int:
        """Tell every request on ``server`` what happened to it; returns how many."""
        found = list(self._on.get(server, ()))
        for request in found:
            request.label(name, cause, action, server=server, **attrs)
        return len(found)


class RequestTrace:
    def __init__(
        self,
        request: web.Request,
        path: str,
        request_id: str,
        inflight: InFlight,
        record_text: bool,
    ) -> None:
        self.inflight = inflight
        self.record_text = record_text
        parent = tracing.context_from(request.headers.get("traceparent"))
        self.span: Span = tracing.tracer(_TRACER).start_span(
            f"POST {path}",
            context=parent,
            kind=SpanKind.SERVER,
            attributes={
                "http.request.method": "POST",
                "url.path": path,
                "watchdog.request_id": request_id,
            },
        )
        self.recording = self.span.is_recording()

    # -- the request ---------------------------------------------------------------
    def body(self, body: dict[str, Any]) -> None:
        if not self.recording:
            return
        for key, attr in (
            ("model", "gen_ai.request.model"),
            ("max_tokens", "gen_ai.request.max_tokens"),
            ("temperature", "gen_ai.request.temperature"),
        ):
            value = body.get(key)
            if isinstance(value, (str, int, float)) and not isinstance(value, bool):
                self.span.set_attribute(attr, value)
        self.span.set_attribute("watchdog.stream", bool(body.get("stream")))
        if self.record_text:
            prompt = body.get("prompt", body.get("messages"))
            text = prompt if isinstance(prompt, str) else json.dumps(prompt, ensure_ascii=False)
            self.span.set_attribute("watchdog.prompt", text)

    def output(self, text: str | None) -> None:
        if self.recording and self.record_text and text is not None:
            self.span.set_attribute("watchdog.output", text)

    def label(self, name: str, cause: str, action: str, **attrs: Any) -> None:
        tracing.label(self.span, name, cause, action, **attrs)

    def finish(self, status: int, rungs: list[str], servers: list[str], error: str | None) -> None:
        if self.recording:
            self.span.set_attribute("http.response.status_code", status)
            self.span.set_attribute("watchdog.recovery", ",".join(rungs) or "none")
            self.span.set_attribute("watchdog.servers", servers)
            if error is not None:
                self.span.set_status(Status(StatusCode.ERROR, error))
        self.span.end()

    # -- one call to a server -------------------------------------------------------
    @contextmanager
    def call(self, role: str, backend: Backend, **attrs: Any) -> Iterator[Call]:
        """A CLIENT span around one call; its trace headers go with the request."""
        span = tracing.tracer(_TRACER).start_span(
            role,
            context=trace.set_span_in_context(self.span),
            kind=SpanKind.CLIENT,
            attributes={
                "server.address": backend.url,
                "watchdog.server": backend.name,
                "watchdog.role": role,
                **tracing.attributes(**attrs),
            },
        )
        self.inflight.add(backend.name, self)
        call = Call(span)
        try:
            yield call
        except HandoffError as err:
            call.failed(err)
            raise
        except BaseException as exc:
            tracing.fail(span, type(exc).__name__)
            raise
        finally:
            self.inflight.remove(backend.name, self)
            span.end()


class Call:
    """The span of one call to a server, and what it sends along."""

    def __init__(self, span: Span) -> None:
        self.span = span
        self.headers = tracing.headers_of(span)
        self.traceparent = self.headers.get("traceparent")

    def params(self, params: dict[str, Any] | None) -> dict[str, Any] | None:
        """``kv_transfer_params`` carrying this call's trace context into the engines."""
        if params is None or self.traceparent is None:
            return params
        return {**params, wire.TRACE: self.traceparent}

    def failed(self, err: HandoffError) -> None:
        if self.span.is_recording():
            self.span.set_attribute("http.response.status_code", err.status)
            action = "next rung" if retryable(err) else "returned to the client"
            tracing.label(
                self.span,
                "watchdog.call_failed",
                cause_of(err),
                action,
                error=err.message,
                kind=err.kind,
            )
            tracing.fail(self.span, err.message)
