"""Deadlines for each phase of a KV load, learned from what this process has seen.

A phase's deadline is always within ``[floor, cap]`` (configuration):

* ``handshake`` and ``first_progress`` (admitted -> transfer posted) and
  ``verify`` (the prefill's lease check): ``slack`` times the longest duration
  seen so far for that phase; before anything was seen, the floor.
* ``transfer``: ``slack`` times the time the bytes take at the bandwidth
  measured so far (the slowest of the recent transfers, so one fast transfer
  does not make the next big one look stuck), plus the floor; before any
  transfer was measured, at the assumed bandwidth from configuration. Only
  transfers of 8 MiB or more, or that took 0.5 s or more, count: a small one
  measures latency and step timing, not the link.

So a big transfer on a slow link gets a long deadline and a small stuck one
is caught after the floor. A duration longer than the deadline in force is not
learned: the worker's step was held past it (deadlines are checked in the
step), which is the step watchdog's finding, not the peer's pace.
"""

from __future__ import annotations

import threading
from collections import deque
from dataclasses import dataclass
from enum import StrEnum

__all__ = ["DeadlineConfig", "Deadlines", "Phase"]


class Phase(StrEnum):
    HANDSHAKE = "handshake"
    FIRST_PROGRESS = "first_progress"
    TRANSFER = "transfer"
    VERIFY = "verify"


@dataclass(frozen=True)
class DeadlineConfig:
    floor_s: float
    cap_s: float
    assumed_bandwidth_bps: float  # bytes per second before any transfer was measured
    slack: float = 4.0
    window: int = 32  # how many recent observations are kept per phase
    bandwidth_min_bytes: int = 8 << 20  # smaller transfers only count if they took >= 0.5 s


class Deadlines:
    """Observed durations per phase and the deadlines they imply (thread-safe)."""

    def __init__(self, config: DeadlineConfig) -> None:
        if not 0 < config.floor_s <= config.cap_s:
            raise ValueError(
                f"deadline floor {config.floor_s} s must be > 0 and <= cap {config.cap_s} s"
            )
        self.config = config
        self._lock = threading.Lock()
        self._seen: dict[Phase, deque[float]] = {p: deque(maxlen=config.window) for p in Phase}
        self._bandwidth: deque[float] = deque(maxlen=config.window)

    def observe(self, phase: Phase, seconds: float, nbytes: int | None = None) -> bool:
        """Learn one duration; False (nothing learned) if it overran the deadline in force.

        A phase that overran was not timed by its deadline -- the process was held
        (a stalled step cannot check deadlines) -- so it says nothing about the
        peer or the link, and learning it would stretch the deadline that must
        catch the next stuck load by the slack (a 20 s stall: 80 s after).
        """
        if seconds > self.deadline(phase, nbytes or 0):
            return False
        with self._lock:
            self._seen[phase].append(max(seconds, 0.0))
            # Small, fast transfers measure latency and step granularity, not the
            # link: only transfers that took a while or moved a lot teach bandwidth.
            big = nbytes is not None and nbytes >= self.config.bandwidth_min_bytes
            if phase is Phase.TRANSFER and nbytes and seconds > 0 and (big or seconds >= 0.5):
                self._bandwidth.append(nbytes / seconds)
        return True

    def bandwidth_bps(self) -> float:
        """The bandwidth transfer deadlines assume now (bytes per second)."""
        with self._lock:
            return min(self._bandwidth) if self._bandwidth else self.config.assumed_bandwidth_bps

    def deadline(self, phase: Phase, nbytes: int = 0) -> float:
        cfg = self.config
        if phase is Phase.TRANSFER:
            raw = cfg.floor_s + cfg.slack * nbytes / self.bandwidth_bps()
        else:
            with self._lock:
                longest = max(self._seen[phase], default=0.0)
            raw = cfg.slack * longest
        return min(max(raw, cfg.floor_s), cfg.cap_s)

    def snapshot(self) -> dict[str, float]:
        return {p.value: round(self.deadline(p), 3) for p in Phase if p is not Phase.TRANSFER} | {
            "bandwidth_bps": round(self.bandwidth_bps(), 1)
        }
