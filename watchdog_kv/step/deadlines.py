"""Step deadlines learned from the step times this process has seen.

Three kinds, each with its own floor and cap (configuration) and its own
history, because they differ by orders of magnitude:

* ``startup``: the engine's initialisation (model load, KV-cache sizing and
  warm-up) and its first few steps, which compile and allocate;
* ``step``: a normal engine step or worker model step;
* ``connector``: one KV-connector call inside a step (start_load_kv,
  wait_for_save, get_finished...).

A kind's deadline is ``slack`` times the longest of its recent durations,
never below the floor nor above the cap. Before anything was seen it is the
floor for steps and connector calls, and the cap for startup (nothing is known
about how long a model takes to load). A startup that succeeded is remembered
(``learned.json`` next to the beacons) so that the next start of the same
server is held to what the last one took.
"""

from __future__ import annotations

import json
import threading
from collections import deque
from dataclasses import dataclass
from enum import StrEnum
from pathlib import Path

__all__ = ["Kind", "Limits", "StepDeadlines"]


class Kind(StrEnum):
    STARTUP = "startup"
    STEP = "step"
    CONNECTOR = "connector"


@dataclass(frozen=True)
class Limits:
    floor_s: float
    cap_s: float

    def __post_init__(self) -> None:
        if not 0 < self.floor_s <= self.cap_s:
            raise ValueError(f"floor {self.floor_s} s must be > 0 and <= cap {self.cap_s} s")


class StepDeadlines:
    """Thread-safe; ``observe`` is called at the end of each phase."""

    def __init__(self, limits: dict[Kind, Limits], slack: float = 4.0, window: int = 64) -> None:
        if slack < 1:
            raise ValueError(f"slack {slack} must be >= 1")
        self.limits = limits
        self.slack = slack
        self._lock = threading.Lock()
        self._seen: dict[Kind, deque[float]] = {k: deque(maxlen=window) for k in Kind}

    def observe(self, kind: Kind, seconds: float) -> None:
        with self._lock:
            self._seen[kind].append(max(seconds, 0.0))

    def longest(self, kind: Kind) -> float | None:
        with self._lock:
            seen = self._seen[kind]
            return max(seen) if seen else None

    def deadline(self, kind: Kind) -> float:
        lim = self.limits[kind]
        longest = self.longest(kind)
        if longest is None:
            return lim.cap_s if kind is Kind.STARTUP else lim.floor_s
        return min(max(self.slack * longest, lim.floor_s), lim.cap_s)

    def snapshot(self) -> dict[str, float]:
        return {k.value: round(self.deadline(k), 3) for k in Kind}

    # -- startup memory across restarts ----------------------------------------------
    def load_startup(self, path: Path, key: str) -> None:
        """Seed the startup history from the last successful start of ``key``."""
        try:
            seen = json.loads(path.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return
        if isinstance(seen, int | float) and seen > 0:
            self.observe(Kind.STARTUP, float(seen))

    def save_startup(self, path: Path, key: str, seconds: float) -> None:
        """Remember how long this start took (best effort; several writers are fine)."""
        try:
            data = json.loads(path.read_text()) if path.exists() else {}
        except (OSError, ValueError):
            data = {}
        if not isinstance(data, dict):
            data = {}
        data[key] = round(seconds, 3)
        tmp = path.with_name(f".{path.name}.{threading.get_native_id()}.tmp")
        try:
            tmp.write_text(json.dumps(data, indent=1) + "\n")
            tmp.replace(path)
        except OSError:
            pass
