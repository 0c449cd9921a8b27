"""Fault injection for rehearsals: ``WATCHDOG_KV_FAULT``, off unless set.

The value is a comma-separated list of faults, each ``kind`` or ``kind:value``,
applied on the side that receives KV (the decode):

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

Probabilities draw from a generator seeded by ``WATCHDOG_KV_FAULT_SEED``, so a
rehearsal repeats exactly for the same request order.
"""

from __future__ import annotations

import random
import threading
from dataclasses import dataclass

__all__ = ["FAULT_KINDS", "FaultPlan", "parse_faults"]

# kind -> (what its value is, the FaultPlan field holding it)
FAULT_KINDS = {
    "delay": ("seconds", "delay_s"),
    "drop": ("probability", "drop_p"),
    "corrupt": ("probability", "corrupt_p"),
    "stall_handshake": ("seconds", "stall_handshake_s"),
}


@dataclass(frozen=True)
class FaultPlan:
    delay_s: float = 0.0
    drop_p: float = 0.0
    corrupt_p: float = 0.0
    stall_handshake_s: float = 0.0

    @property
    def active(self) -> bool:
        return any(getattr(self, attr) for _, attr in FAULT_KINDS.values())

    def describe(self) -> str:
        parts = [
            f"{kind}:{getattr(self, attr):g}"
            for kind, (_, attr) in FAULT_KINDS.items()
            if getattr(self, attr)
        ]
        return ",".join(parts) or "none"


def parse_faults(raw: str) -> FaultPlan:
    """Parse the ``WATCHDOG_KV_FAULT`` syntax; ValueError says what is accepted."""
    accepted = "a comma-separated list of " + ", ".join(
        f"{k}:<{unit}>" for k, (unit, _) in FAULT_KINDS.items()
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
