"""Containment of watchdog_kv's own failures.

Code of ours that runs inside a vLLM process does its bookkeeping inside
:func:`contained`: an exception there is logged once, recorded, handed to an
optional ``on_error`` (which typically disables the feature), and swallowed, so
vLLM carries on. vLLM's own calls must stay *outside* the block, so that vLLM's
exceptions reach vLLM unchanged.

Tests read :func:`internal_errors` (the test suite fails any test that leaves
one behind), so "never crash the host" cannot hide bugs.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from watchdog_kv.telemetry import get_logger

__all__ = ["clear_internal_errors", "contained", "internal_errors"]

_log = get_logger("watchdog_kv.guard")
_lock = threading.Lock()
_errors: list[str] = []


@contextmanager
def contained(what: str, on_error: Callable[[], None] | None = None) -> Iterator[None]:
    try:
        yield
    except Exception as exc:
        with _lock:
            _errors.append(f"{what}: {type(exc).__name__}: {exc}")
        _log.exception(
            "watchdog_kv.internal_error", what=what, action="disabled" if on_error else "ignored"
        )
        if on_error is not None:
            try:
                on_error()
            except Exception:
                _log.exception("watchdog_kv.internal_error", what=f"{what} (on_error)")


def internal_errors() -> list[str]:
    with _lock:
        return list(_errors)


def clear_internal_errors() -> None:
    with _lock:
        _errors.clear()
