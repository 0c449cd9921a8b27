"""``watchdog-kv report DIR``: merge incident dumps and name the culprit.

``DIR`` is one incident directory (``incident.json`` + ``proc-<pid>.json``) or a
folder of them (the dump directory): every incident is reported, oldest first.

The culprit of an incident is, among its processes:

1. a process the kernel shows stopped (state ``T``), else
2. the process in the deepest phase (a connector call is deeper than a step,
   a step deeper than idle), and among equals the one furthest down the chain
   (a worker over its engine core, which waits on it; an engine core over the
   API server); the process the monitor flagged wins remaining ties.

Its thread is the one the beacon says entered the phase (else the thread
holding the GIL, else the main thread), and its frame is the innermost Python
frame of that thread outside watchdog_kv's own code, with the native frames
under it. Frames of watchdog_kv's fault injection, if any, are shown as such:
a rehearsal says so.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from watchdog_kv.beacon import depth

__all__ = ["Culprit", "Incident", "build_report", "find_culprit", "load_incidents", "render"]

_OWN_CODE = "/watchdog_kv/"
_STATES = {
    "R": "running",
    "S": "sleeping",
    "D": "in uninterruptible I/O",
    "T": "stopped (SIGSTOP or a debugger)",
    "t": "stopped by a tracer",
    "Z": "zombie",
    "gone": "exited",
}


@dataclass
class Incident:
    path: Path
    stall: dict[str, Any]
    procs: dict[int, dict[str, Any]]


@dataclass
class Culprit:
    pid: int
    role: str
    rank: int | None
    server: str | None
    process_name: str
    state: str
    phase: str
    what: str
    thread_id: int | None
    thread_name: str | None
    owns_gil: bool
    frame: str | None
    called_from: list[str] = field(default_factory=list)
    native: list[str] = field(default_factory=list)
    injected: list[str] = field(default_factory=list)
    why: str = ""

    def as_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def load_incidents(folder: Path) -> list[Incident]:
    """Every incident under ``folder`` (itself one, or a folder of them), oldest first."""
    dirs = (
        [folder]
        if (folder / "incident.json").is_file()
        else sorted(p.parent for p in folder.glob("*/incident.json"))
    )
    out: list[Incident] = []
    for path in dirs:
        head = json.loads((path / "incident.json").read_text())
        if head.get("kind", "stall") != "stall":
            continue  # a crash incident (watchdog_kv.monitor.crashes)
        procs: dict[int, dict[str, Any]] = {}
        for proc_file in sorted(path.glob("proc-*.json")):
            data = json.loads(proc_file.read_text())
            procs[int(data["record"]["pid"])] = data
        out.append(Incident(path, head.get("stall", {}), procs))
    out.sort(key=lambda i: i.stall.get("detected_wall", 0.0))
    return out


def _phase(entry: dict[str, Any]) -> str:
    beacon = entry.get("beacon") or {}
    return str(beacon.get("phase", "idle"))


def _rank_key(pid: int, entry: dict[str, Any], flagged: int) -> tuple[int, int, int, int]:
    stopped = entry.get("stacks", {}).get("state") in ("T", "t")
    role = entry["record"].get("role", "other")
    return (int(stopped), *depth(_phase(entry), role), int(pid == flagged))


def _is_python(frame: dict[str, Any]) -> bool:
    return str(frame.get("filename", "")).endswith(".py")


def _label(frame: dict[str, Any]) -> str:
    name = frame.get("name", "?")
    where = frame.get("short_filename") or frame.get("module") or frame.get("filename") or "?"
    line = frame.get("line") or 0
    base = Path(str(where)).name
    return f"{name} ({base}:{line})" if line else f"{name} ({base})"


def _pick_thread(threads: list[dict[str, Any]], tid: int | None) -> dict[str, Any] | None:
    for thread in threads:
        if tid and thread.get("os_thread_id") == tid:
            return thread
    for thread in threads:
        if thread.get("owns_gil"):
            return thread
    for thread in threads:
        if thread.get("thread_name") == "MainThread":
            return thread
    return threads[0] if threads else None


def find_culprit(incident: Incident) -> Culprit | None:
    if not incident.procs:
        return None
    flagged = int(incident.stall.get("pid", -1))
    pid, entry = max(incident.procs.items(), key=lambda kv: _rank_key(kv[0], kv[1], flagged))
    rec, beacon = entry["record"], entry.get("beacon") or {}
    stacks = entry.get("stacks") or {}
    state = str(stacks.get("state", "?"))
    thread = _pick_thread(stacks.get("threads") or [], beacon.get("tid"))
    frames = (thread or {}).get("frames") or []
    injected, native, frame, called_from = [], [], None, []
    for index, fr in enumerate(frames):  # innermost first
        if not _is_python(fr):
            if frame is None and not str(fr.get("name", "")).startswith("0x"):
                native.append(_label(fr))
            continue
        if _OWN_CODE in str(fr.get("filename", "")):
            if frame is None:
                injected.append(_label(fr))
            continue
        frame = _label(fr)
        called_from = [
            _label(f)
            for f in frames[index + 1 :]
            if _is_python(f) and _OWN_CODE not in str(f.get("filename", ""))
        ][:6]
        break
    if state in ("T", "t"):
        why = "the kernel shows the process stopped"
    elif pid != flagged:
        why = (
            f"it is in a deeper phase ({_phase(entry)}) than the flagged process {flagged}, "
            "which waits on it"
        )
    else:
        why = "the monitor flagged it and no other process of the server is further in"
    return Culprit(
        pid=pid,
        role=str(rec.get("role")),
        rank=rec.get("rank"),
        server=rec.get("server"),
        process_name=str(rec.get("process_name", "")),
        state=state,
        phase=_phase(entry),
        what=str(beacon.get("what", "")),
        thread_id=(thread or {}).get("os_thread_id"),
        thread_name=(thread or {}).get("thread_name"),
        owns_gil=bool((thread or {}).get("owns_gil")),
        frame=frame,
        called_from=called_from,
        native=native[:6],
        injected=[f for f in injected if "(faults.py:" in f],
        why=why,
    )


def build_report(folder: Path) -> list[dict[str, Any]]:
    """The merged report as data: one entry per incident."""
    out = []
    for inc in load_incidents(folder):
        culprit = find_culprit(inc)
        peers = []
        for pid, entry in sorted(inc.procs.items()):
            if culprit is not None and pid == culprit.pid:
                continue
            rec, stacks = entry["record"], entry.get("stacks") or {}
            peers.append(
                {
                    "pid": pid,
                    "role": rec.get("role"),
                    "rank": rec.get("rank"),
                    "phase": _phase(entry),
                    "state": stacks.get("state"),
                }
            )
        events = []
        if culprit is not None:
            events = inc.procs[culprit.pid].get("flight_recorder", [])[-12:]
        out.append(
            {
                "kind": "stall",
                "incident": str(inc.path),
                "stall": inc.stall,
                "culprit": culprit.as_dict() if culprit else None,
                "peers": peers,
                "flight_recorder": events,
            }
        )
    return out


def render(report: list[dict[str, Any]]) -> str:
    """Plain text for people (one block per incident)."""
    if not report:
        return "no incidents found\n"
    lines: list[str] = []
    for item in report:
        stall, c = item["stall"], item["culprit"]
        when = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(stall.get("detected_wall", 0.0)))
        lines.append(f"incident {Path(item['incident']).name}  (detected {when})")
        lines.append(f"  stall:   {stall.get('message', '?')}")
        if c is None:
            lines.append("  culprit: unknown (no process dumps)")
        else:
            rank = "-" if c["rank"] is None else c["rank"]
            lines.append(
                f"  culprit: pid {c['pid']} ({c['process_name']}), role {c['role']}, "
                f"rank {rank}, server {c['server'] or '-'}"
            )
            lines.append(f"           state {_STATES.get(c['state'], c['state'])}; {c['why']}")
            gil = ", holding the GIL" if c["owns_gil"] else ""
            lines.append(f"  thread:  {c['thread_id']} {c['thread_name']!r}{gil}")
            inside = f" ({c['what']})" if c["what"] else ""
            lines.append(f"  phase:   {c['phase']}{inside}")
            lines.append(f"  frame:   {c['frame'] or 'unknown'}")
            for caller in c["called_from"]:
                lines.append(f"           called from {caller}")
            if c["native"]:
                lines.append(f"  native:  {' <- '.join(c['native'])}")
            if c["injected"]:
                injected = ", ".join(c["injected"])
                lines.append(f"  note:    fault injected by watchdog_kv: {injected}")
        for peer in item["peers"]:
            rank = "-" if peer["rank"] is None else peer["rank"]
            lines.append(
                f"  peer:    pid {peer['pid']} {peer['role']} rank {rank}: {peer['phase']}, "
                f"state {_STATES.get(str(peer['state']), peer['state'])}"
            )
        for event in item["flight_recorder"]:
            stamp = time.strftime("%H:%M:%S", time.localtime(float(event.get("wall", 0.0))))
            detail = {k: v for k, v in event.items() if k not in ("wall", "event", "timestamp")}
            lines.append(f"  event:   {stamp} {event.get('event')} {json.dumps(detail)[:160]}")
        lines.append("")
    return "\n".join(lines)
