"""A server's death, as the supervisor tells it and keeps it.

A vLLM server is dead when its API server has exited, or when an engine core
or worker of its current incarnation is gone: vLLM's API server stays up a
moment after its engine died, answering 500 ("EngineCore encountered an
issue") and 503 on ``/health``, and that moment must not be spent sending it
requests. The engine processes are known from the status records the plugin
writes (``role``, ``server``, ``registered_at``); a zombie, or a pid reused by a
newer process (told by its start time), counts as gone; a record made on
another host (another boot id) is not judged here.

:func:`examine` names the culprit (:func:`watchdog_kv.monitor.crashes.diagnose`)
and writes a crash incident when the death has a signal or took an engine;
:func:`same_crash_again` is the rule that stops a crash loop: a server whose
crash has the same signal and frame as its previous one is not restarted
again.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog_kv import process
from watchdog_kv.monitor.crashes import Crash, around_death, diagnose, write_incident
from watchdog_kv.telemetry import get_logger

__all__ = ["ENGINE_ROLES", "dead_engines", "examine", "log_since", "same_crash_again"]

_log = get_logger("watchdog_kv.supervisor")

ENGINE_ROLES = ("engine_core", "worker")
_LOG_WINDOW = 4 * 1024 * 1024  # the most of a log read for a diagnosis


def _gone(rec: dict[str, Any]) -> bool:
    """The recorded process has exited (a zombie has; a reused pid is someone else). A
    record of another host (or boot) cannot be judged from here: not gone."""
    mine = process.boot_id()
    if rec.get("boot_id") and mine and rec["boot_id"] != mine:
        return False
    ticks = rec.get("start_ticks")
    return not process.running(int(rec["pid"]), ticks if isinstance(ticks, int) else None)


def dead_engines(
    records: list[dict[str, Any]], server: str, since_wall: float
) -> list[dict[str, Any]]:
    """The engine cores and workers of ``server`` registered since ``since_wall`` that
    are gone."""
    return [
        r
        for r in records
        if r.get("server") == server
        and r.get("role") in ENGINE_ROLES
        and isinstance(r.get("registered_at"), (int, float))
        and r["registered_at"] >= since_wall
        and _gone(r)
    ]


def log_since(path: Path, offset: int) -> list[str]:
    """The lines a log gained since ``offset`` (the size it had when the server started)."""
    try:
        with open(path, "rb") as fh:
            size = fh.seek(0, os.SEEK_END)
            fh.seek(max(offset, size - _LOG_WINDOW))
            data = fh.read()
    except OSError:
        return []
    return data.decode(errors="replace").splitlines()


def log_size(path: Path) -> int:
    with contextlib.suppress(OSError):
        return path.stat().st_size
    return 0


async def examine(
    server: str,
    dead: list[dict[str, Any]],
    log_lines: Callable[[], list[str]],
    api_pid: int | None,
    api_exit: int | None,
    dump_root: Path,
    log_path: Path,
) -> tuple[list[Crash], Path | None]:
    """Diagnose a dead server (in a thread: it may wait a moment for vLLM's log) and
    write a crash incident when a signal or an engine process was involved."""
    crashes = await asyncio.to_thread(diagnose, server, dead, log_lines, api_pid, api_exit)
    if not crashes:
        return crashes, None
    culprit = crashes[0]
    if culprit.signal is None and culprit.role == "api_server":
        return crashes, None  # a plain exit (a code of its own): nothing native to keep
    try:
        folder = await asyncio.to_thread(
            write_incident, dump_root, crashes, around_death(log_lines()), str(log_path)
        )
    except OSError:
        _log.exception("watchdog_kv.internal_error", what="crash incident")
        return crashes, None
    _log.error(
        "server.crashed",
        server=server,
        message=culprit.describe(),
        signal=culprit.signal,
        frame=culprit.frame,
        pid=culprit.pid,
        proc_role=culprit.role,
        rank=culprit.rank,
        incident=str(folder),
    )
    return crashes, folder


def same_crash_again(previous: Crash | None, crash: Crash) -> bool:
    """The same signal in the same frame as the server's previous crash: restarting
    it again would only crash it again."""
    return (
        previous is not None
        and crash.signature is not None
        and crash.signature == previous.signature
    )
