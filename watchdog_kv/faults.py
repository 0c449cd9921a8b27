"""Fault injection for rehearsals: ``WATCHDOG_KV_FAULT``, off unless set.

The value is a comma-separated list of faults, each ``kind`` or ``kind:value``.
The KV faults apply on the side that receives KV (the decode):

===================  ==========================================================
``delay:SECONDS``    every finished transfer is reported SECONDS late (a slow link)
``drop:P``           a finished transfer is never reported, with probability P
                     (a transfer that hangs)
``corrupt:P``        with probability P the received blocks are overwritten with
                     noise and the transfer reported as failed by the transport
                     (an integrity error caught on the link)
``stall_handshake:SECONDS``  each handshake with a remote engine waits SECONDS
                     before it starts (a peer that does not answer)
===================  ==========================================================

The stall faults block a thread inside C code *while holding the GIL* (a
``ctypes.PyDLL`` call to libc's ``usleep``, which does not release it), the
way a wedged native call does; no Python thread of that process runs
meanwhile. They fire once each time they are armed: :func:`arm` creates
``<state_dir>/faults/<server>/<kind>`` and the first process of that server
reaching the point consumes it.

========================  ======================================================
``stall_step:SECONDS``    a worker's model step blocks (worker process)
``stall_notif:SECONDS``   NIXL's notification send blocks -- the heartbeat send
                          of a decode's KV load, where a 30 s stall was seen
========================  ======================================================

A server that keeps crashing is rehearsed with ``crash_start``: while
:func:`arm` ``(..., "crash_start")`` holds for a server (until :func:`disarm`),
every API server of it exits with code 3 as soon as watchdog_kv loads, before
vLLM serves anything -- a crash loop the supervisor's restart limit must end.

The worker-step faults act in a worker's ``execute_model``:

========================  ======================================================
``crash_step``            once per :func:`arm`: the worker dies of SIGILL in its
                          next model step (a native crash in the forward pass,
                          as vLLM's AMX kernel without tile permission)
``slow_step:SECONDS``     while armed (until :func:`disarm`): every model step
                          sleeps SECONDS first, GIL released -- a slow but
                          healthy decode, which holds a request in flight for
                          as long as a test needs it there
========================  ======================================================

Probabilities draw from a generator seeded by ``WATCHDOG_KV_FAULT_SEED``, so a
rehearsal repeats exactly for the same request order.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import random
import threading
from dataclasses import dataclass
from pathlib import Path

__all__ = [
    "FAULT_KINDS",
    "FaultPlan",
    "arm",
    "disarm",
    "hold_gil",
    "maybe_crash",
    "maybe_stall",
    "parse_faults",
    "rehearse_step",
    "take_armed",
]

# kind -> (what its value is, the FaultPlan field holding it)
FAULT_KINDS = {
    "delay": ("seconds", "delay_s"),
    "drop": ("probability", "drop_p"),
    "corrupt": ("probability", "corrupt_p"),
    "stall_handshake": ("seconds", "stall_handshake_s"),
    "stall_step": ("seconds", "stall_step_s"),
    "stall_notif": ("seconds", "stall_notif_s"),
    "crash_start": ("flag", "crash_start"),
    "crash_step": ("flag", "crash_step"),
    "slow_step": ("seconds", "slow_step_s"),
}
CRASH_EXIT_CODE = 3


@dataclass(frozen=True)
class FaultPlan:
    delay_s: float = 0.0
    drop_p: float = 0.0
    corrupt_p: float = 0.0
    stall_handshake_s: float = 0.0
    stall_step_s: float = 0.0
    stall_notif_s: float = 0.0
    crash_start: float = 0.0
    crash_step: float = 0.0
    slow_step_s: float = 0.0

    @property
    def active(self) -> bool:
        return any(getattr(self, attr) for _, attr in FAULT_KINDS.values())

    def describe(self) -> str:
        parts = [
            kind if unit == "flag" else f"{kind}:{getattr(self, attr):g}"
            for kind, (unit, attr) in FAULT_KINDS.items()
            if getattr(self, attr)
        ]
        return ",".join(parts) or "none"


def parse_faults(raw: str) -> FaultPlan:
    """Parse the ``WATCHDOG_KV_FAULT`` syntax; ValueError says what is accepted."""
    accepted = "a comma-separated list of " + ", ".join(
        k if unit == "flag" else f"{k}:<{unit}>" for k, (unit, _) in FAULT_KINDS.items()
    )
    values: dict[str, float] = {}
    for item in filter(None, (part.strip() for part in raw.split(","))):
        kind, _, text = item.partition(":")
        kind = kind.strip().lower()
        if kind not in FAULT_KINDS:
            raise ValueError(f"unknown fault {kind!r}; expected {accepted}")
        unit, attr = FAULT_KINDS[kind]
        if attr in values:
            raise ValueError(f"fault {kind!r} given twice")
        if unit == "flag":
            if text not in ("", "1"):
                raise ValueError(f"{item!r}: {kind} takes no value")
            values[attr] = 1.0
            continue
        try:
            value = float(text) if text else (1.0 if unit == "probability" else -1.0)
        except ValueError:
            raise ValueError(f"{item!r}: {kind} takes {unit}, got {text!r}") from None
        if unit == "probability" and not 0 < value <= 1:
            raise ValueError(f"{item!r}: {kind} takes a probability in (0, 1]")
        if unit == "seconds" and not 0 < value < 86400:
            raise ValueError(f"{item!r}: {kind} takes a number of seconds greater than 0")
        values[attr] = value
    return FaultPlan(**values)


class FaultDice:
    """The seeded draws of one process (thread-safe)."""

    def __init__(self, seed: int) -> None:
        self._rng = random.Random(seed)
        self._lock = threading.Lock()

    def roll(self, probability: float) -> bool:
        if probability <= 0:
            return False
        with self._lock:
            return self._rng.random() < probability


def _arm_path(state_dir: Path, server: str | None, kind: str) -> Path:
    return state_dir / "faults" / (server or "any") / kind


_ARMABLE = ("stall_step", "stall_notif", "crash_start", "crash_step", "slow_step")


def arm(state_dir: Path, server: str | None, kind: str) -> Path:
    """Arm fault ``kind`` for ``server``: ``stall_*`` and ``crash_step`` fire once,
    ``crash_start`` and ``slow_step`` act until :func:`disarm`."""
    if kind not in _ARMABLE:
        raise ValueError(f"{kind!r} is not an armable fault ({', '.join(_ARMABLE)})")
    path = _arm_path(state_dir, server, kind)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.touch()
    return path


def disarm(state_dir: Path, server: str | None, kind: str) -> None:
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_arm_path(state_dir, server, kind))


def maybe_crash(plan: FaultPlan, state_dir: Path, server: str | None) -> None:
    """Exit this process at once if ``crash_start`` is configured and armed."""
    if plan.crash_start and _arm_path(state_dir, server, "crash_start").exists():
        from watchdog_kv.telemetry import get_logger

        get_logger("watchdog_kv.faults").warning(
            "fault.crash_injected", kind="crash_start", exit_code=CRASH_EXIT_CODE
        )
        os._exit(CRASH_EXIT_CODE)


def take_armed(state_dir: Path, server: str | None, kind: str) -> bool:
    """True once per :func:`arm`: the caller that removes the file fires the fault."""
    with contextlib.suppress(FileNotFoundError):
        os.unlink(_arm_path(state_dir, server, kind))
        return True
    return False


def hold_gil(seconds: float) -> None:
    """Block in C for ``seconds`` without releasing the GIL (a wedged native call)."""
    ctypes.PyDLL(None).usleep(ctypes.c_uint(int(seconds * 1_000_000)))


def maybe_stall(plan: FaultPlan, state_dir: Path, server: str | None, kind: str) -> None:
    """Fire the stall fault ``kind`` here if it is configured and armed."""
    seconds = float(getattr(plan, f"{kind}_s", 0.0))
    if seconds and take_armed(state_dir, server, kind):
        from watchdog_kv.telemetry import get_logger

        get_logger("watchdog_kv.faults").warning(
            "fault.stall_injected", kind=kind, seconds=seconds, holds_gil=True
        )
        hold_gil(seconds)


def rehearse_step(plan: FaultPlan, state_dir: Path, server: str | None) -> None:
    """The faults of a worker's model step, if configured and armed: a stall that holds
    the GIL, a slow step, or a crash (SIGILL)."""
    if plan.stall_step_s:
        maybe_stall(plan, state_dir, server, "stall_step")
    if plan.slow_step_s and _arm_path(state_dir, server, "slow_step").exists():
        import time

        time.sleep(plan.slow_step_s)
    if plan.crash_step and take_armed(state_dir, server, "crash_step"):
        import signal

        from watchdog_kv.telemetry import get_logger

        get_logger("watchdog_kv.faults").warning(
            "fault.crash_injected", kind="crash_step", signal="SIGILL"
        )
        signal.raise_signal(signal.SIGILL)
