"""Structured logs for watchdog_kv's own events.

Every event carries the process ``role`` and ``pid`` (plus ``server`` and ``rank``
where known). Output is one JSON object per line when stderr is not a terminal,
coloured key=value on a terminal, or as ``WATCHDOG_KV_LOG_FORMAT`` says.

The plugin lives inside vLLM's processes, so this module never calls
``structlog.configure`` and never touches the standard ``logging`` tree: our
loggers are built with :func:`structlog.wrap_logger` and their own processor
chain, so the host's logging (vLLM's, or another structlog user's) is unchanged.
"""

from __future__ import annotations

import logging
import os
import sys
import threading
from typing import Any, TextIO

import structlog
from structlog.typing import EventDict

__all__ = [
    "bind_process",
    "configure",
    "get_logger",
    "process_fields",
    "set_recorder",
    "set_trace_lookup",
]

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}

_lock = threading.Lock()
_state: dict[str, Any] = {"level": logging.INFO, "format": "auto", "stream": None, "generation": 0}
_process: dict[str, Any] = {}
_recorder: list[Any] = [None]  # the flight recorder sink of this process, if any
_trace_lookup: list[Any] = [None]  # event -> (trace_id, span_id) or None, once tracing is on


def set_trace_lookup(lookup: Any) -> None:
    """Join events to traces: ``lookup(event)`` gives the ``(trace_id, span_id)`` of the
    span an event belongs to (the current span, or the open span of its request)."""
    _trace_lookup[0] = lookup


def _add_trace(_: Any, __: str, event: EventDict) -> EventDict:
    lookup = _trace_lookup[0]
    if lookup is not None and "trace_id" not in event:
        try:
            found = lookup(event)
        except Exception:
            found = None
        if found is not None:
            event["trace_id"], event["span_id"] = found
    return event


def set_recorder(sink: Any) -> None:
    """Copy every event of this process (at or above the level) to ``sink(event)``."""
    _recorder[0] = sink


def _record(_: Any, __: str, event: EventDict) -> EventDict:
    sink = _recorder[0]
    if sink is not None:
        try:
            sink({k: v for k, v in event.items() if k not in ("pid", "role", "server", "rank")})
        except Exception:
            _recorder[0] = None  # a broken recorder must not break logging
    return event


def configure(level: str = "info", fmt: str = "auto", stream: TextIO | None = None) -> None:
    """Set level and rendering for loggers made from now on (and re-made on next use)."""
    with _lock:
        _state["level"] = _LEVELS[level]
        _state["format"] = fmt
        _state["stream"] = stream
        _state["generation"] = _state.get("generation", 0) + 1


def bind_process(**fields: Any) -> None:
    """Fields added to every event of this process (``role``, ``server``, ``rank``...)."""
    with _lock:
        _process.update({k: v for k, v in fields.items() if v is not None})


def process_fields() -> dict[str, Any]:
    """The fields every event of this process carries, ``pid`` included."""
    with _lock:
        out = {"role": "unknown", **_process}
    out["pid"] = os.getpid()  # after fork, the child's own pid
    return out


def _add_process(_: Any, __: str, event: EventDict) -> EventDict:
    for key, value in process_fields().items():
        event.setdefault(key, value)
    return event


def _renderer(stream: TextIO) -> Any:
    fmt = _state["format"]
    if fmt == "auto":
        fmt = "console" if stream.isatty() else "json"
    if fmt == "json":
        return structlog.processors.JSONRenderer(sort_keys=False)
    return structlog.dev.ConsoleRenderer(colors=stream.isatty())


class _Logger:
    """A thin lazy proxy: rebuilds its structlog logger when :func:`configure` runs."""

    def __init__(self, name: str, initial: dict[str, Any]):
        self._name = name
        self._initial = initial
        self._gen = -1
        self._bound: Any = None

    def _get(self) -> Any:
        gen = _state.get("generation", 0)
        if self._bound is None or gen != self._gen:
            stream = _state["stream"] or sys.stderr
            self._bound = structlog.wrap_logger(
                structlog.PrintLogger(stream),
                processors=[
                    structlog.processors.add_log_level,
                    structlog.processors.TimeStamper(fmt="iso", utc=True),
                    _add_trace,
                    _record,
                    _add_process,
                    structlog.processors.StackInfoRenderer(),
                    structlog.processors.format_exc_info,
                    _renderer(stream),
                ],
                wrapper_class=structlog.make_filtering_bound_logger(_state["level"]),
                cache_logger_on_first_use=False,
            ).bind(logger=self._name, **self._initial)
            self._gen = gen
        return self._bound

    def bind(self, **fields: Any) -> _Logger:
        return _Logger(self._name, {**self._initial, **fields})

    def __getattr__(self, method: str) -> Any:
        return getattr(self._get(), method)


def get_logger(name: str, **initial: Any) -> Any:
    """A structlog logger for ``name`` that carries the process fields."""
    return _Logger(name, initial)
