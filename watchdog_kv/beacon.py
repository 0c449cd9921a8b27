"""The beacon: a process's progress and recent events, readable from outside.

A Python thread inside a wedged vLLM process may never run again: its main
thread can hold the GIL inside C code, or the whole process can be stopped.
So each watched process keeps a small memory-mapped file,
``<state_dir>/beacons/<pid>.beacon``, written with plain stores on the hot path,
and the monitor (another process) reads it. Nothing has to run in the watched
process for the reader to see what it last wrote -- the page cache is shared.

Layout (little endian, fixed):

* header: magic, generation (a seqlock: odd while a write is under way),
  pid, phase entries so far, phase, native id of the thread in the phase,
  phase start (``time.monotonic``, which on Linux is one clock for every
  process of the machine), the phase's deadline, last update, last phase
  duration, completed steps, requests at the last step start, wall clock of
  the last update, and a short label of what the phase is doing;
* the work a front end has outstanding per engine rank (API servers only):
  how many requests and since when, so an engine that stops while idle is
  still seen not to pick up work;
* the flight recorder: a ring of the process's recent watchdog events (its
  log events), each slot a sequence number, a wall-clock time and JSON text.

A phase is what the process is doing now: idle, startup, a model step, or a
KV-connector call inside a step. Phases nest (a connector call inside a step);
when the inner one ends, the outer one shows again with its own start and
deadline.
"""

from __future__ import annotations

import json
import mmap
import os
import struct
import threading
import time
from dataclasses import asdict, dataclass, field
from enum import IntEnum
from pathlib import Path
from typing import Any

__all__ = [
    "MAX_RANKS",
    "Beacon",
    "BeaconView",
    "Phase",
    "beacon_path",
    "depth",
    "read_beacon",
    "read_beacons",
]

MAGIC = b"WKVBCN01"
MAX_RANKS = 16
RING_SLOTS = 128
SLOT_SIZE = 512

_HEADER = struct.Struct("<8sqqqiiddddqqd48s")
_GEN = struct.Struct("<q")
_GEN_OFFSET = 8
_OUTSTANDING = struct.Struct("<qd")
_OUTSTANDING_OFFSET = 256
_RING_HEAD = struct.Struct("<q")
_RING_HEAD_OFFSET = _OUTSTANDING_OFFSET + MAX_RANKS * _OUTSTANDING.size
_RING_OFFSET = 1024
_SLOT = struct.Struct("<qdH")
SIZE = _RING_OFFSET + RING_SLOTS * SLOT_SIZE


class Phase(IntEnum):
    IDLE = 0
    STARTUP = 1
    STEP = 2
    CONNECTOR = 3


_ROLE_DEPTH = {"engine_core": 1, "worker": 2}  # a worker is further in: its engine waits on it


def depth(phase: str, role: str | None) -> tuple[int, int]:
    """How far in a process is: by phase (a connector call inside a step inside...),
    then by role. The furthest-in stalled process is the one the others wait on."""
    member = Phase.__members__.get(phase.upper())
    return (member.value if member is not None else 0, _ROLE_DEPTH.get(role or "", 0))


def beacon_path(state_dir: Path, pid: int) -> Path:
    return state_dir / "beacons" / f"{pid}.beacon"


@dataclass
class _Frame:
    phase: Phase
    started: float
    deadline_s: float
    what: str
    tid: int


class Beacon:
    """The writer, in the watched process. Every method is cheap and never raises
    into vLLM's code paths (callers wrap them in ``contained``)."""

    def __init__(self, state_dir: Path, pid: int | None = None) -> None:
        self.pid = pid or os.getpid()
        self.path = beacon_path(state_dir, self.pid)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT | os.O_TRUNC, 0o644)
        try:
            os.ftruncate(fd, SIZE)
            self._mm = mmap.mmap(fd, SIZE)
        finally:
            os.close(fd)
        self._lock = threading.Lock()
        self._gen = 0
        self._seq = 0
        self._steps = 0
        self._work = -1
        self._last_duration = 0.0
        self._stack: list[_Frame] = []
        self._idle_deadline = 0.0
        self._ring_next = 0
        self._write_header()

    # -- phases -------------------------------------------------------------------
    def enter(self, phase: Phase, deadline_s: float, what: str = "") -> float:
        """Start a (possibly nested) phase; returns its start time."""
        now = time.monotonic()
        with self._lock:
            self._seq += 1
            self._stack.append(_Frame(phase, now, deadline_s, what, threading.get_native_id()))
            self._write_header(now)
        return now

    def exit(self, started: float, *, step_done: bool = False) -> float:
        """End the innermost phase (the one started at ``started``); returns its duration."""
        now = time.monotonic()
        with self._lock:
            while self._stack:
                frame = self._stack.pop()
                if frame.started == started:
                    break
            self._last_duration = now - started
            if step_done:
                self._steps += 1
            self._write_header(now)
        return now - started

    def touch(self) -> None:
        """Refresh the update time (a front end's sign that its numbers are current)."""
        with self._lock:
            self._write_header()

    def reset(self) -> None:
        """Forget every open phase: the beacon shows idle."""
        with self._lock:
            self._stack.clear()
            self._write_header()

    def set_work(self, requests: int) -> None:
        self._work = requests

    def set_idle_deadline(self, seconds: float) -> None:
        """The deadline shown while idle: how soon outstanding work must start a step."""
        with self._lock:
            changed = seconds != self._idle_deadline
            self._idle_deadline = seconds
            if changed and not self._stack:
                self._write_header()

    def set_outstanding(self, rank: int, count: int, since: float) -> None:
        """A front end's outstanding requests for engine ``rank`` (since: monotonic)."""
        if 0 <= rank < MAX_RANKS:
            with self._lock:
                _OUTSTANDING.pack_into(
                    self._mm, _OUTSTANDING_OFFSET + rank * _OUTSTANDING.size, count, since
                )

    # -- flight recorder --------------------------------------------------------------
    def record(self, event: dict[str, Any]) -> None:
        """Append one event to the ring (JSON, cut to the slot size)."""
        data = json.dumps(event, default=str, separators=(",", ":")).encode()
        room = SLOT_SIZE - _SLOT.size
        if len(data) > room:
            data = data[: room - 3] + b"..."
        with self._lock:
            seq = self._ring_next
            self._ring_next += 1
            offset = _RING_OFFSET + (seq % RING_SLOTS) * SLOT_SIZE
            _SLOT.pack_into(self._mm, offset, -1, 0.0, 0)  # invalid while written
            self._mm[offset + _SLOT.size : offset + _SLOT.size + len(data)] = data
            _SLOT.pack_into(self._mm, offset, seq, time.time(), len(data))
            _RING_HEAD.pack_into(self._mm, _RING_HEAD_OFFSET, self._ring_next)

    # -- internals ------------------------------------------------------------------
    def _write_header(self, now: float | None = None) -> None:
        now = time.monotonic() if now is None else now
        top = self._stack[-1] if self._stack else None
        self._gen += 1
        _GEN.pack_into(self._mm, _GEN_OFFSET, self._gen)  # odd: write under way
        _HEADER.pack_into(
            self._mm,
            0,
            MAGIC,
            self._gen,
            self.pid,
            self._seq,
            int(top.phase) if top else 0,
            top.tid if top else 0,
            top.started if top else now,
            top.deadline_s if top else self._idle_deadline,
            now,
            self._last_duration,
            self._steps,
            self._work,
            time.time(),
            (top.what if top else "").encode()[:48],
        )
        self._gen += 1
        _GEN.pack_into(self._mm, _GEN_OFFSET, self._gen)


@dataclass
class BeaconView:
    """What a reader saw in one beacon."""

    pid: int
    seq: int
    phase: Phase
    tid: int
    phase_started: float
    deadline_s: float
    updated: float
    last_duration_s: float
    steps: int
    work: int
    wall: float
    what: str
    torn: bool = False
    outstanding: dict[int, tuple[int, float]] = field(default_factory=dict)

    def elapsed(self, now: float | None = None) -> float:
        return (time.monotonic() if now is None else now) - self.phase_started

    def overdue(self, now: float | None = None) -> bool:
        """In a phase that has outlived its deadline."""
        return self.phase != Phase.IDLE and self.elapsed(now) > self.deadline_s

    def as_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["phase"] = self.phase.name.lower()
        out["outstanding"] = {str(k): list(v) for k, v in self.outstanding.items()}
        return out


def _read_header(buf: bytes) -> tuple[Any, ...] | None:
    fields = _HEADER.unpack_from(buf, 0)
    return fields if fields[0] == MAGIC else None


def read_beacon(path: Path) -> tuple[BeaconView, list[dict[str, Any]]] | None:
    """Read a beacon file: its header and the flight recorder's events, oldest first.

    Never waits on the writer: a write caught half-way is re-read a few times,
    and if the writer was stopped in the middle of one, the view says ``torn``.
    """
    try:
        buf = path.read_bytes()
    except OSError:
        return None
    if len(buf) < SIZE:
        return None
    torn = True
    fields: tuple[Any, ...] | None = None
    for _ in range(50):
        gen = _GEN.unpack_from(buf, _GEN_OFFSET)[0]
        fields = _read_header(buf)
        if fields is None:
            return None
        if gen % 2 == 0:
            torn = False
            break
        time.sleep(0.001)
        try:
            buf = path.read_bytes()
        except OSError:
            return None
    if fields is None:
        return None
    (_, _, pid, seq, phase, tid, started, deadline, updated, last, steps, work, wall, what) = fields
    outstanding: dict[int, tuple[int, float]] = {}
    for rank in range(MAX_RANKS):
        count, since = _OUTSTANDING.unpack_from(buf, _OUTSTANDING_OFFSET + rank * _OUTSTANDING.size)
        if count:
            outstanding[rank] = (count, since)
    view = BeaconView(
        pid=pid,
        seq=seq,
        phase=Phase(phase) if phase in Phase._value2member_map_ else Phase.IDLE,
        tid=tid,
        phase_started=started,
        deadline_s=deadline,
        updated=updated,
        last_duration_s=last,
        steps=steps,
        work=work,
        wall=wall,
        what=what.rstrip(b"\0").decode(errors="replace"),
        torn=torn,
        outstanding=outstanding,
    )
    return view, _read_ring(buf)


def _read_ring(buf: bytes) -> list[dict[str, Any]]:
    head = _RING_HEAD.unpack_from(buf, _RING_HEAD_OFFSET)[0]
    events: list[tuple[int, dict[str, Any]]] = []
    for seq in range(max(0, head - RING_SLOTS), head):
        offset = _RING_OFFSET + (seq % RING_SLOTS) * SLOT_SIZE
        got, wall, length = _SLOT.unpack_from(buf, offset)
        if got != seq or length > SLOT_SIZE - _SLOT.size:
            continue
        raw = buf[offset + _SLOT.size : offset + _SLOT.size + length]
        try:
            event = json.loads(raw)
        except ValueError:
            event = {"event": "unreadable", "raw": raw.decode(errors="replace")}
        if not isinstance(event, dict):
            event = {"event": str(event)}
        event.setdefault("wall", wall)
        events.append((seq, event))
    return [e for _, e in sorted(events, key=lambda x: x[0])]


def read_beacons(state_dir: Path) -> dict[int, tuple[BeaconView, list[dict[str, Any]]]]:
    """Every readable beacon under ``state_dir``, by pid."""
    out: dict[int, tuple[BeaconView, list[dict[str, Any]]]] = {}
    folder = state_dir / "beacons"
    if not folder.is_dir():
        return out
    for path in folder.glob("*.beacon"):
        got = read_beacon(path)
        if got is not None:
            out[got[0].pid] = got
    return out
