"""OpenTelemetry traces of watchdog_kv: one trace per request, every failure labelled.

Each process sets up its *own* :class:`~opentelemetry.sdk.trace.TracerProvider`
and never the global one: inside a vLLM process the global provider is vLLM's
(``--otlp-traces-endpoint``), and the two must not fight. The standard
``OTEL_*`` variables configure it (checked by :func:`watchdog_kv.config.load_otel`);
the exporters and the sampler read theirs as in any OpenTelemetry SDK.

* **Service name** per role: ``<OTEL_SERVICE_NAME or watchdog-kv>-<role>``
  (``-router``, ``-prefill``, ``-decode``, ``-vllm``...); a name that already ends
  with its role is kept, so the supervisor can give vLLM's own spans the same name.
* **Export** is batched (``BatchSpanProcessor``: a bounded queue, spans beyond it
  dropped, export on its own thread), so ending a span on an engine step only
  appends to a queue. A failed export is logged (``otel.export_failed``, at most
  once a minute, with the count) and never raised.
* **Propagation**: W3C ``traceparent`` over HTTP between the router and the servers,
  and into the engine processes inside ``kv_transfer_params`` (key
  :data:`watchdog_kv.wire.TRACE`), which vLLM carries from the API server to the scheduler and,
  through the connector metadata, to the workers.
* **Failures**: :func:`label` adds a span event with ``watchdog.cause`` and
  ``watchdog.action``; the span's status becomes an error only when the request
  itself failed.

Any failure of this module disables tracing in the process (logged): traces are
never worth a request.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, ClassVar

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.sdk.resources import Resource
from opentelemetry.sdk.trace import ReadableSpan, TracerProvider
from opentelemetry.sdk.trace.export import (
    BatchSpanProcessor,
    ConsoleSpanExporter,
    SpanExporter,
    SpanExportResult,
)
from opentelemetry.sdk.trace.id_generator import IdGenerator
from opentelemetry.trace import Span, SpanKind, Status, StatusCode
from opentelemetry.trace.propagation.tracecontext import TraceContextTextMapPropagator

from watchdog_kv import threads
from watchdog_kv.config import OtelSettings
from watchdog_kv.telemetry.logs import get_logger, set_trace_lookup

__all__ = [
    "RequestSpans",
    "SpanKind",
    "SystemRandomIds",
    "attributes",
    "context_from",
    "enabled",
    "headers_of",
    "label",
    "server_kind",
    "service_name",
    "setup",
    "shutdown",
    "traceparent_of",
    "tracer",
]


_log = get_logger("watchdog_kv.telemetry")
_PROPAGATOR = TraceContextTextMapPropagator()
_NOOP = trace.NoOpTracer()
_lock = threading.Lock()
_state: dict[str, Any] = {"pid": None, "provider": None, "config": None}


def server_kind(server: str | None) -> str:
    """The role a server's processes report in their service name: ``decode-1`` ->
    ``decode``; ``vllm`` for a server the supervisor did not start."""
    return server.rsplit("-", 1)[0] if server else "vllm"


def service_name(base: str, role: str) -> str:
    """``<base>-<role>``, unless ``base`` already says the role."""
    return base if base.endswith(f"-{role}") else f"{base}-{role}"


class _LoggedExporter(SpanExporter):
    """Delegates to the real exporter; failures become one log line a minute."""

    def __init__(self, inner: SpanExporter, endpoint: str | None) -> None:
        self._inner = inner
        self._endpoint = endpoint
        self._failed = 0
        self._dropped = 0
        self._logged_at = 0.0

    def export(self, spans: Sequence[ReadableSpan]) -> SpanExportResult:
        try:
            result = self._inner.export(spans)
            error = None
        except Exception as exc:  # an exporter bug must not kill the export thread
            result, error = SpanExportResult.FAILURE, f"{type(exc).__name__}: {exc}"
        if result is not SpanExportResult.SUCCESS:
            self._failed += 1
            self._dropped += len(spans)
            now = time.monotonic()
            if now - self._logged_at >= 60:
                self._logged_at = now
                _log.warning(
                    "otel.export_failed",
                    endpoint=self._endpoint,
                    failed_exports=self._failed,
                    spans_dropped=self._dropped,
                    error=error or "the exporter reported a failure (its own log says why)",
                )
        return result

    def shutdown(self) -> None:
        self._inner.shutdown()

    def force_flush(self, timeout_millis: int = 30000) -> bool:
        return self._inner.force_flush(timeout_millis)


class SystemRandomIds(IdGenerator):
    """Span and trace ids from the operating system's randomness.

    The SDK's default generator draws from Python's global ``random``, which vLLM
    seeds identically in every engine process: every worker then makes the same
    ids (a backend keeps one span per id and silently drops the rest; seen here),
    and each draw would also move vLLM's own random sequence."""

    def generate_span_id(self) -> int:
        while True:
            value = int.from_bytes(os.urandom(8), "big")
            if value != trace.INVALID_SPAN_ID:
                return value

    def generate_trace_id(self) -> int:
        while True:
            value = int.from_bytes(os.urandom(16), "big")
            if value != trace.INVALID_TRACE_ID:
                return value

    def is_trace_id_random(self) -> bool:
        return True


def _exporter(otel: OtelSettings) -> SpanExporter:
    if otel.exporter == "console":
        return ConsoleSpanExporter()
    if otel.protocol == "http/protobuf":
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import (
            OTLPSpanExporter as HttpExporter,
        )

        return HttpExporter(endpoint=otel.endpoint)
    from opentelemetry.exporter.otlp.proto.grpc.trace_exporter import (
        OTLPSpanExporter as GrpcExporter,
    )

    endpoint = otel.endpoint or ""
    insecure = endpoint.startswith("http://") or "://" not in endpoint
    return GrpcExporter(endpoint=endpoint, insecure=insecure)


def setup(otel: OtelSettings, role: str, **attributes: Any) -> bool:
    """Configure tracing for this process (idempotent per pid). True if tracing is on.

    The provider, its export thread and the exporter's connection are made on first
    use, not here: vLLM forks its workers from the engine core after the plugin
    loaded, and a gRPC channel made before a fork is unusable in the child.
    """
    with _lock:
        if _state["pid"] == os.getpid():
            return _state["config"] is not None
        _state.update(pid=os.getpid(), provider=None, config=None)
        if not otel.enabled:
            return False
        _state["config"] = (otel, role, attributes)
    set_trace_lookup(_ids_of_event)
    return True


def use(provider: TracerProvider | None) -> None:
    """Use ``provider`` in this process (tests, or a host that made its own); None: off."""
    with _lock:
        _state.update(pid=os.getpid(), provider=provider, config=() if provider else None)
    if provider is not None:
        set_trace_lookup(_ids_of_event)


def _provider() -> TracerProvider | None:
    if _state["pid"] != os.getpid():
        return None
    provider: TracerProvider | None = _state["provider"]
    if provider is not None or _state["config"] is None:
        return provider
    with _lock:
        if _state["provider"] is None and _state["config"] is not None:
            _state["provider"] = _make_provider(*_state["config"])
            if _state["provider"] is None:
                _state["config"] = None  # failed: tracing stays off in this process
        return _state["provider"]  # type: ignore[no-any-return]


def _make_provider(otel: OtelSettings, role: str, attributes: dict[str, Any]) -> Any:
    try:
        resource = Resource.create(
            {
                "service.name": service_name(otel.service_name, role),
                "service.namespace": otel.service_name,
                "service.instance.id": f"{attributes.get('server') or role}/{os.getpid()}",
                "process.pid": os.getpid(),
                "watchdog_kv.role": role,
                **{f"watchdog_kv.{k}": v for k, v in attributes.items() if v is not None},
            }
        )
        box: dict[str, TracerProvider] = {}

        def make() -> None:
            # Born in a thread allowed on every CPU, so the export thread (and
            # gRPC's) do not share the one core vLLM pins a worker to.
            provider = TracerProvider(  # sampler from OTEL_TRACES_SAMPLER
                resource=resource, id_generator=SystemRandomIds()
            )
            provider.add_span_processor(
                BatchSpanProcessor(_LoggedExporter(_exporter(otel), otel.endpoint))
            )
            box["provider"] = provider

        threads.start(make, "watchdog_kv-otel").join()
        provider = box["provider"]
    except Exception as exc:
        _log.error("otel.disabled", reason=f"{type(exc).__name__}: {exc}")
        return None
    _log.info(
        "otel.tracing",
        service=service_name(otel.service_name, role),
        protocol=otel.protocol if otel.exporter == "otlp" else otel.exporter,
        endpoint=otel.endpoint,
    )
    return provider


def enabled() -> bool:
    """Is tracing configured in this process (the provider may not be made yet)?"""
    return _state["pid"] == os.getpid() and _state["config"] is not None


def tracer(name: str) -> trace.Tracer:
    """A tracer of this process's provider; a no-op tracer when tracing is off."""
    provider = _provider() if enabled() else None
    return provider.get_tracer(name) if provider is not None else _NOOP


def shutdown(timeout_s: float = 5.0) -> None:
    """Flush what is queued (bounded) and stop the export thread."""
    with _lock:
        provider = _state["provider"] if _state["pid"] == os.getpid() else None
        _state["provider"] = None
        _state["config"] = None
    if provider is not None:
        try:
            provider.force_flush(int(timeout_s * 1000))
            provider.shutdown()
        except Exception as exc:
            _log.warning("otel.shutdown_failed", error=f"{type(exc).__name__}: {exc}")


# --- propagation -------------------------------------------------------------------------


def headers_of(span: Span | None = None) -> dict[str, str]:
    """W3C trace headers for an outgoing call made within ``span`` (or the current one)."""
    carrier: dict[str, str] = {}
    ctx = trace.set_span_in_context(span) if span is not None else None
    _PROPAGATOR.inject(carrier, context=ctx)
    return carrier


def traceparent_of(span: Span | None) -> str | None:
    return headers_of(span).get("traceparent") if span is not None else None


def context_from(traceparent: Any) -> Context | None:
    """The parent context a ``traceparent`` string names; None if absent or malformed."""
    if not isinstance(traceparent, str) or not traceparent:
        return None
    ctx = _PROPAGATOR.extract({"traceparent": traceparent})
    span_ctx = trace.get_current_span(ctx).get_span_context()
    return ctx if span_ctx.is_valid else None


# --- failures ------------------------------------------------------------------------------


def attributes(**attrs: Any) -> dict[str, Any]:
    """``watchdog.<key>`` span attributes: None left out, other values made ones
    OpenTelemetry takes (lists of strings, or strings)."""
    out: dict[str, Any] = {}
    for key, value in attrs.items():
        if value is None:
            continue
        if isinstance(value, (list, tuple)):
            value = [str(v) for v in value]
        elif not isinstance(value, (str, bool, int, float)):
            value = str(value)
        out[f"watchdog.{key}"] = value
    return out


def label(span: Span | None, name: str, cause: str, action: str, **attrs: Any) -> None:
    """A detection or recovery on ``span``: an event with its cause and the action taken."""
    if span is None or not span.is_recording():
        return
    span.add_event(name, attributes(cause=cause, action=action, **attrs))


def fail(span: Span | None, message: str) -> None:
    if span is not None and span.is_recording():
        span.set_status(Status(StatusCode.ERROR, message))


# --- spans kept by request id (engine processes) ------------------------------------------


class RequestSpans:
    """Open spans of one component, by request id: a root span and nested phase spans.

    Used where spans cannot follow the call stack (a KV load lives across many engine
    steps). Thread-safe; every method is a no-op for a request it does not know.
    """

    _all: ClassVar[list[RequestSpans]] = []

    def __init__(self, name: str, limit: int = 4096) -> None:
        self._tracer_name = name
        self._open: dict[str, list[Span]] = {}
        self._limit = limit
        self._lock = threading.Lock()
        RequestSpans._all.append(self)

    def start(
        self,
        req_id: str,
        name: str,
        traceparent: Any,
        kind: SpanKind = SpanKind.INTERNAL,
        **attrs: Any,
    ) -> None:
        """Open the request's root span under ``traceparent`` (no parent: no span)."""
        parent = context_from(traceparent)
        if parent is None or not enabled():
            return
        span = tracer(self._tracer_name).start_span(
            name, context=parent, kind=kind, attributes=attributes(request_id=req_id, **attrs)
        )
        with self._lock:
            if len(self._open) >= self._limit:  # requests vLLM never ended: keep the newest
                oldest = next(iter(self._open))
                for stale in reversed(self._open.pop(oldest)):
                    stale.end()
            self._open[req_id] = [span]

    def enter(self, req_id: str, name: str, **attrs: Any) -> None:
        """Open a phase span under the request's innermost open span."""
        with self._lock:
            stack = self._open.get(req_id)
            if not stack:
                return
            ctx = trace.set_span_in_context(stack[-1])
            stack.append(
                tracer(self._tracer_name).start_span(
                    name, context=ctx, attributes=attributes(request_id=req_id, **attrs)
                )
            )

    def leave(self, req_id: str, error: str | None = None, **attrs: Any) -> None:
        """End the innermost phase span (never the root); ``error`` marks it failed."""
        with self._lock:
            stack = self._open.get(req_id)
            if not stack or len(stack) < 2:
                return
            span = stack.pop()
        _set(span, attrs)
        if error is not None:
            fail(span, error)
        span.end()

    def label(self, req_id: str, name: str, cause: str, action: str, **attrs: Any) -> None:
        with self._lock:
            stack = self._open.get(req_id)
            span = stack[-1] if stack else None
        label(span, name, cause, action, **attrs)

    def end(self, req_id: str, error: str | None = None, **attrs: Any) -> None:
        """End every open span of the request, the root last."""
        with self._lock:
            stack = self._open.pop(req_id, None)
        if not stack:
            return
        _set(stack[0], attrs)
        if error is not None:
            fail(stack[0], error)
        for span in reversed(stack):
            span.end()

    def ids(self, req_id: str) -> tuple[str, str] | None:
        with self._lock:
            stack = self._open.get(req_id)
            span = stack[-1] if stack else None
        return _ids(span) if span is not None else None

    def __contains__(self, req_id: object) -> bool:
        return req_id in self._open


def _set(span: Span, attrs: Mapping[str, Any]) -> None:
    span.set_attributes(attributes(**attrs))


def _ids(span: Span) -> tuple[str, str] | None:
    ctx = span.get_span_context()
    if not ctx.is_valid:
        return None
    return format(ctx.trace_id, "032x"), format(ctx.span_id, "016x")


def _ids_of_event(event: Mapping[str, Any]) -> tuple[str, str] | None:
    """The trace and span ids a log event belongs to: the current span, else the open
    span of the request it names."""
    found = _ids(trace.get_current_span())
    if found is not None:
        return found
    req_id = event.get("request_id")
    if isinstance(req_id, str):
        for spans in RequestSpans._all:
            found = spans.ids(req_id)
            if found is not None:
                return found
    return None


@contextmanager
def current(span: Span | None) -> Iterator[None]:
    """Make ``span`` the current span (log events then carry its ids)."""
    if span is None:
        yield
        return
    with trace.use_span(span, end_on_exit=False):
        yield
