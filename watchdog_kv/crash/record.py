"""The crash record of one process: faulthandler's dump, to a file of its own.

:func:`enable` points Python's :mod:`faulthandler` at
``<state_dir>/crashes/<pid>.log`` for every thread. When the process dies of
SIGSEGV, SIGILL, SIGBUS, SIGFPE or SIGABRT, the dying process itself writes
the signal and every thread's Python frames there (no GIL, no help from
outside), then dies of the same signal, so its exit code is unchanged. The
file stays empty otherwise. SIGKILL and ``os._exit`` leave nothing: for those
the supervisor has the exit code and the server's log.

The plugin enables the record after it has asked for AMX permission
(:mod:`watchdog_kv.host.amx`): faulthandler installs an alternate signal stack,
and a too-small one makes the kernel refuse that permission. A faulthandler
the operator already turned on (``PYTHONFAULTHANDLER``, writing to the server's
log) is left as it is; :func:`parse` reads the same text from a log. A forked
child gets a record of its own (the one it inherited is its parent's).

:func:`parse` turns the dump back into data: the signal, and each thread's
frames innermost first.
"""

from __future__ import annotations

import contextlib
import faulthandler
import os
import re
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO

__all__ = [
    "FATAL_SIGNALS",
    "CrashDump",
    "Frame",
    "disable",
    "enable",
    "parse",
    "record_path",
]

# faulthandler's words for each fatal signal it handles
FATAL_SIGNALS = {
    "Segmentation fault": "SIGSEGV",
    "Illegal instruction": "SIGILL",
    "Bus error": "SIGBUS",
    "Floating point exception": "SIGFPE",
    "Aborted": "SIGABRT",
}

_lock = threading.Lock()
_open: dict[int, tuple[Path, IO[str]]] = {}  # pid -> (path, file) of this process


def record_path(state_dir: Path, pid: int) -> Path:
    return state_dir / "crashes" / f"{pid}.log"


def enable(state_dir: Path) -> Path | None:
    """Write this process's native crashes to its own record (idempotent per process).

    Returns the record's path, or None when faulthandler was already enabled by
    someone else (it then writes where they chose).
    """
    with _lock:
        pid = os.getpid()
        if pid in _open:
            return _open[pid][0]
        inherited = bool(_open)  # a forked child: the parent's record is not its own
        if faulthandler.is_enabled() and not inherited:
            return None
        path = record_path(state_dir, pid)
        path.parent.mkdir(parents=True, exist_ok=True)
        fh = open(path, "w")  # noqa: SIM115 - faulthandler writes to it until the process ends
        try:
            faulthandler.enable(file=fh, all_threads=True)
        except BaseException:
            fh.close()
            raise
        _open.clear()  # what a fork brought along belongs to the parent
        _open[pid] = (path, fh)
        return path


def disable() -> None:
    """Stop recording here; remove the record if nothing was written (tests, clean exits)."""
    with _lock:
        got = _open.pop(os.getpid(), None)
        if got is None:
            return
        path, fh = got
        faulthandler.disable()
        fh.close()
        with contextlib.suppress(OSError):
            if path.stat().st_size == 0:
                path.unlink()


@dataclass(frozen=True)
class Frame:
    filename: str
    line: int
    function: str

    @property
    def short(self) -> str:
        """The file from its package on (``vllm/_custom_ops.py``), else its last two parts."""
        text = self.filename.replace("\\", "/")
        for marker in ("/site-packages/", "/dist-packages/"):
            if marker in text:
                return text.rsplit(marker, 1)[1]
        parts = [p for p in text.split("/") if p]
        return "/".join(parts[-2:]) if parts else text

    def label(self) -> str:
        return f"{self.short}:{self.function}"


@dataclass
class CrashDump:
    """What faulthandler wrote: the signal and each thread's frames (innermost first)."""

    signal: str | None  # SIGILL...; None if faulthandler's words were not recognised
    fatal_error: str  # faulthandler's own words ("Illegal instruction")
    current: list[Frame] = field(default_factory=list)  # the thread that took the signal
    current_thread: str | None = None
    threads: dict[str, list[Frame]] = field(default_factory=dict)  # the others


_PREFIX = re.compile(r"^\([^()]*pid=\d+\) ")  # vLLM's "(VllmWorker pid=7) " in a log
_FATAL = re.compile(r"^Fatal Python error: (?P<what>.+?)\s*$")
_THREAD = re.compile(r"^(?P<current>Current thread|Thread) (?P<id>0x[0-9a-fA-F]+)")
_STACK = re.compile(r"^Stack \(most recent call first\)")
_FRAME = re.compile(r'^\s+File "(?P<file>.*)", line (?P<line>\d+) in (?P<func>.+?)\s*$')


def parse(text: str) -> CrashDump | None:
    """The last fatal-error dump in ``text`` (a crash record or a server log), or None."""
    lines = [_PREFIX.sub("", ln) for ln in text.splitlines()]
    starts = [i for i, line in enumerate(lines) if _FATAL.match(line)]
    if not starts:
        return None
    body = lines[starts[-1] :]
    fatal = _FATAL.match(body[0])
    assert fatal is not None
    what = fatal["what"]
    dump = CrashDump(FATAL_SIGNALS.get(what), what)
    frames: list[Frame] | None = None
    for line in body[1:]:
        if m := _THREAD.match(line):
            frames = []
            if m["current"] == "Current thread":
                dump.current, dump.current_thread = frames, m["id"]
            else:
                dump.threads[m["id"]] = frames
        elif _STACK.match(line):  # one thread only (all_threads off)
            frames = dump.current = []
        elif frames is not None and (m := _FRAME.match(line)):
            frames.append(Frame(m["file"], int(m["line"]), m["func"]))
        elif line.startswith("Extension modules:") or _FATAL.match(line):
            break
    return dump
