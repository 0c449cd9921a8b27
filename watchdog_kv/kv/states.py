"""The per-request KV-transfer lifecycles, declared as transition tables.

Two machines, one per side of a prefill -> decode hand-off:

* :data:`RECV` -- the decode side, one machine per request that loads KV from a
  remote engine. A request ends in exactly one terminal state: ``received``
  (the KV is used), ``recomputed`` (vLLM computes the prompt locally),
  ``failed`` (the request is failed with a clear error) or ``aborted``.
* :data:`LEASE` -- the prefill side, one machine per request whose KV blocks are
  kept for a decode to read. The blocks are released exactly once; whether that
  release came after the decode's read or after the lease ran out decides
  whether a read can be trusted.

Everything that can happen is an event; :data:`RECV` and :data:`LEASE` say, for
each (state, event), the next state. Anything else is an
:class:`IllegalTransition`: it raises and changes nothing. Races resolve by
order: whichever of two competing events is applied first wins, and the second
becomes illegal (a late ``done`` after ``deadline`` fired, a ``read`` after the
lease ``expire``-d, a second ``release``).

Late completions are also *fenced*: a transfer's events carry the epoch it was
started under, and cancelling the transfer (``cancelled``) moves the request to
a new epoch. An event of an older epoch raises :class:`Fenced` -- so a transfer
that completes after recovery can never be taken for the request's current KV,
and the tables above only let blocks go back to vLLM (``recompute``/``fail``)
after ``cancelled`` said no more writes can land in them.

:class:`RecvTable` and :class:`LeaseTable` hold the machines of one process,
apply events under one lock, and keep counters and a bounded memory of finished
entries (the prefill answers lease checks from it).
"""

from __future__ import annotations

import threading
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from enum import StrEnum

__all__ = [
    "LEASE",
    "RECV",
    "Fenced",
    "IllegalTransition",
    "Lease",
    "LeaseEvent",
    "LeaseTable",
    "RecentSet",
    "Recv",
    "RecvEvent",
    "RecvTable",
    "RecvTransfer",
    "Verdict",
]


class Recv(StrEnum):
    """Decode side: where one request's KV load is."""

    WAITING = "waiting"  # admitted for a remote load; nothing posted yet
    HANDSHAKING = "handshaking"  # the connector is meeting the remote engine
    PULLING = "pulling"  # the transfer is posted
    VERIFYING = "verifying"  # transfer done; asking the prefill whether its lease held
    TIMED_OUT = "timed_out"  # a phase deadline passed
    BROKEN = "broken"  # the transport reported an error
    STALE = "stale"  # the prefill released the blocks before the read was confirmed
    RECOVERING = "recovering"  # transfer cancelled; blocks still this request's
    RECEIVED = "received"  # terminal: the KV is used
    RECOMPUTED = "recomputed"  # terminal: vLLM recomputes the prompt locally
    FAILED = "failed"  # terminal: failed fast with a clear error
    ABORTED = "aborted"  # terminal: the request ended first


class RecvEvent(StrEnum):
    HANDSHAKE = "handshake"  # handshake with the remote engine started
    POSTED = "posted"  # the read was posted to the transport
    DONE = "done"  # the transport says the read completed
    LEASE_OK = "lease_ok"  # the prefill confirms its blocks were held through the read
    LEASE_STALE = "lease_stale"  # the prefill released (or never knew) the blocks
    DEADLINE = "deadline"  # the current phase ran past its deadline
    ERROR = "error"  # the transport reported a failure
    CANCELLED = "cancelled"  # the transfer is stopped: nothing more can land
    RECOMPUTE = "recompute"  # handed to vLLM's own recompute path
    FAIL = "fail"  # handed to vLLM's failure path
    ABORT = "abort"  # vLLM or the client ended the request


class Lease(StrEnum):
    """Prefill side: the KV blocks one request keeps for a decode."""

    HELD = "held"  # computed, kept for a decode; no expiry yet
    LEASED = "leased"  # kept until an expiry (heartbeats extend it)
    READ = "read"  # a decode's read was reported while the blocks were kept
    EXPIRED = "expired"  # the lease ran out before any read was reported
    ABORTED = "aborted"  # the prefill request ended without a lease
    RELEASED = "released"  # terminal: blocks given back to vLLM


class LeaseEvent(StrEnum):
    LEASE = "lease"  # an expiry is set
    HEARTBEAT = "heartbeat"  # a decode extended the lease
    READ = "read"  # a decode reported its read
    EXPIRE = "expire"  # the lease ran out
    ABORT = "abort"
    RELEASE = "release"  # the blocks went back to vLLM


_R, _E = Recv, RecvEvent
_IN_FLIGHT = (_R.WAITING, _R.HANDSHAKING, _R.PULLING, _R.VERIFYING)
_DETECTED = (_R.TIMED_OUT, _R.BROKEN, _R.STALE)

RECV: Mapping[tuple[Recv, RecvEvent], Recv] = {
    (_R.WAITING, _E.HANDSHAKE): _R.HANDSHAKING,
    (_R.WAITING, _E.POSTED): _R.PULLING,
    (_R.HANDSHAKING, _E.POSTED): _R.PULLING,
    # A connector may finish within one step, before a post was seen.
    (_R.WAITING, _E.DONE): _R.VERIFYING,
    (_R.HANDSHAKING, _E.DONE): _R.VERIFYING,
    (_R.PULLING, _E.DONE): _R.VERIFYING,
    (_R.VERIFYING, _E.LEASE_OK): _R.RECEIVED,
    (_R.VERIFYING, _E.LEASE_STALE): _R.STALE,
    **{(s, _E.DEADLINE): _R.TIMED_OUT for s in _IN_FLIGHT},
    **{(s, _E.ERROR): _R.BROKEN for s in (_R.WAITING, _R.HANDSHAKING, _R.PULLING)},
    **{(s, _E.CANCELLED): _R.RECOVERING for s in _DETECTED},
    (_R.RECOVERING, _E.RECOMPUTE): _R.RECOMPUTED,
    (_R.RECOVERING, _E.FAIL): _R.FAILED,
    **{(s, _E.ABORT): _R.ABORTED for s in (*_IN_FLIGHT, *_DETECTED, _R.RECOVERING)},
}

RECV_TERMINAL = frozenset({_R.RECEIVED, _R.RECOMPUTED, _R.FAILED, _R.ABORTED})

_L, _LE = Lease, LeaseEvent
LEASE: Mapping[tuple[Lease, LeaseEvent], Lease] = {
    (_L.HELD, _LE.LEASE): _L.LEASED,
    (_L.LEASED, _LE.HEARTBEAT): _L.LEASED,
    (_L.HELD, _LE.READ): _L.READ,
    (_L.LEASED, _LE.READ): _L.READ,
    (_L.LEASED, _LE.EXPIRE): _L.EXPIRED,
    (_L.HELD, _LE.ABORT): _L.ABORTED,
    (_L.LEASED, _LE.ABORT): _L.ABORTED,
    (_L.READ, _LE.RELEASE): _L.RELEASED,
    (_L.EXPIRED, _LE.RELEASE): _L.RELEASED,
    (_L.ABORTED, _LE.RELEASE): _L.RELEASED,
}


class IllegalTransition(RuntimeError):
    """An event that the table does not allow in the entry's current state."""

    def __init__(self, machine: str, key: str, state: str | None, event: str) -> None:
        state = None if state is None else str(state)
        event = str(event)
        self.machine, self.key, self.state, self.event = machine, key, state, event
        where = "unknown entry" if state is None else f"state {state!r}"
        super().__init__(f"{machine} {key}: event {event!r} is not allowed in {where}")


class Fenced(IllegalTransition):
    """An event from a transfer that was cancelled: an older epoch than the entry's."""

    def __init__(self, machine: str, key: str, state: str, event: str, epoch: int, current: int):
        super().__init__(machine, key, state, event)
        self.epoch, self.current = epoch, current
        self.args = (
            f"{machine} {key}: event {str(event)!r} of epoch {epoch} fenced off "
            f"(current epoch {current})",
        )


@dataclass
class RecvTransfer:
    """One request's KV load on the decode side."""

    req_id: str
    state: Recv = Recv.WAITING
    epoch: int = 0
    started: float = field(default_factory=time.monotonic)
    phase_started: float = field(default_factory=time.monotonic)
    cause: str | None = None  # why it left the happy path (deadline phase, error, stale)
    history: list[tuple[float, str, str]] = field(default_factory=list)  # (t, event, new state)


Listener = Callable[[str, str, str, str], None]  # key, event, old state, new state


class RecvTable:
    """The decode-side machines of one process; every event is applied under one lock."""

    def __init__(self, on_transition: Listener | None = None) -> None:
        self._lock = threading.Lock()
        self._live: dict[str, RecvTransfer] = {}
        self.outcomes: Counter[str] = Counter()
        self.fenced = 0  # events for loads already settled, or from a cancelled transfer
        self.illegal = 0  # events the table does not allow in the current state
        self._listener = on_transition

    def start(self, req_id: str) -> RecvTransfer:
        with self._lock:
            if req_id in self._live:
                raise IllegalTransition("recv", req_id, self._live[req_id].state, "start")
            transfer = self._live[req_id] = RecvTransfer(req_id)
            return transfer

    def get(self, req_id: str) -> RecvTransfer | None:
        with self._lock:
            return self._live.get(req_id)

    def live(self) -> list[RecvTransfer]:
        with self._lock:
            return list(self._live.values())

    def apply(
        self, req_id: str, event: RecvEvent, *, epoch: int | None = None, cause: str | None = None
    ) -> RecvTransfer:
        """Move ``req_id`` by ``event``; raise (changing nothing) if the table forbids it."""
        with self._lock:
            transfer = self._live.get(req_id)
            if transfer is None:
                self.fenced += 1
                raise IllegalTransition("recv", req_id, None, event)
            if epoch is not None and epoch != transfer.epoch:
                self.fenced += 1
                raise Fenced("recv", req_id, transfer.state, event, epoch, transfer.epoch)
            new = RECV.get((transfer.state, event))
            if new is None:
                self.illegal += 1
                raise IllegalTransition("recv", req_id, transfer.state, event)
            old = transfer.state
            now = time.monotonic()
            transfer.state = new
            transfer.phase_started = now
            transfer.history.append((now, event.value, new.value))
            if cause is not None and transfer.cause is None:
                transfer.cause = cause
            if event is RecvEvent.CANCELLED:
                transfer.epoch += 1
            if new in RECV_TERMINAL:
                del self._live[req_id]
                self.outcomes[new.value] += 1
        if self._listener is not None:
            self._listener(req_id, event.value, old.value, new.value)
        return transfer


class Verdict(StrEnum):
    """The prefill's answer to "may the KV a decode read for this request be used?"."""

    VALID = "valid"  # blocks were kept until the read was reported (or still are)
    STALE = "stale"  # the lease ran out first: the blocks may hold another request's KV
    UNKNOWN = "unknown"  # never leased here, or forgotten: not trusted either


@dataclass
class _LeaseEntry:
    state: Lease
    last_kept: Lease  # the state the blocks were in when released (READ, EXPIRED, ABORTED)
    claimed: bool = False  # a decode's check was already answered "valid"


class LeaseTable:
    """The prefill-side machines of one process, and a bounded memory of released ones."""

    def __init__(self, remember: int = 65536, on_transition: Listener | None = None) -> None:
        self._lock = threading.Lock()
        self._entries: OrderedDict[str, _LeaseEntry] = OrderedDict()
        self._remember = remember
        self.counts: Counter[str] = Counter()
        self.stale_reads = 0  # reads reported after the blocks were released or expired
        self._listener = on_transition

    def hold(self, req_id: str) -> None:
        """The request's blocks are kept for a decode. Idempotent; never revives an
        entry already released (request ids are unique, a release is final)."""
        with self._lock:
            if req_id in self._entries:
                return
            self._entries[req_id] = _LeaseEntry(Lease.HELD, Lease.HELD)
            if len(self._entries) > self._remember + 1024:
                self._trim()

    def state(self, req_id: str) -> Lease | None:
        with self._lock:
            entry = self._entries.get(req_id)
            return None if entry is None else entry.state

    def apply(self, req_id: str, event: LeaseEvent) -> Lease:
        with self._lock:
            entry = self._entries.get(req_id)
            if entry is None:
                if event is LeaseEvent.READ:
                    self.stale_reads += 1
                raise IllegalTransition("lease", req_id, None, event)
            new = LEASE.get((entry.state, event))
            if new is None:
                if event is LeaseEvent.READ and entry.state in (Lease.EXPIRED, Lease.RELEASED):
                    self.stale_reads += 1
                raise IllegalTransition("lease", req_id, entry.state, event)
            old = entry.state
            if new is Lease.RELEASED:
                entry.last_kept = old
            entry.state = new
            self.counts[event.value] += 1
        if self._listener is not None:
            self._listener(req_id, event.value, old.value, new.value)
        return new

    def verdict(self, req_id: str) -> Verdict:
        """Whether a read of ``req_id``'s blocks, already finished, can be trusted."""
        with self._lock:
            return self._verdict(req_id)

    def _verdict(self, req_id: str) -> Verdict:  # caller holds the lock
        entry = self._entries.get(req_id)
        if entry is None:
            return Verdict.UNKNOWN
        if entry.state in (Lease.HELD, Lease.LEASED, Lease.READ):
            return Verdict.VALID  # kept now, so kept for the whole read before now
        if entry.state is Lease.RELEASED and entry.last_kept is Lease.READ:
            return Verdict.VALID
        return Verdict.STALE

    def claim(self, req_id: str) -> Verdict:
        """:meth:`verdict` for the decode asking, which then owns the read: one lease
        feeds one read, so a second asker (a replayed or duplicated
        ``kv_transfer_params``, reading after the first read released the blocks)
        is told STALE."""
        with self._lock:
            verdict = self._verdict(req_id)
            entry = self._entries.get(req_id)
            if verdict is Verdict.VALID and entry is not None:
                if entry.claimed:
                    return Verdict.STALE
                entry.claimed = True
            return verdict

    def kept(self) -> list[str]:
        with self._lock:
            return [k for k, e in self._entries.items() if e.state is not Lease.RELEASED]

    def _trim(self) -> None:
        # Forget the oldest released entries first (in batches, so this is rare);
        # entries still kept are dropped only beyond twice the limit -- a request
        # vLLM never released -- and then answer "unknown", which fails closed.
        excess = len(self._entries) - self._remember
        for key in [k for k, e in self._entries.items() if e.state is Lease.RELEASED][:excess]:
            del self._entries[key]
        while len(self._entries) > 2 * self._remember:
            self._entries.popitem(last=False)


class RecentSet:
    """A set that forgets its oldest members beyond ``limit`` (FIFO)."""

    def __init__(self, limit: int = 65536) -> None:
        self._items: OrderedDict[str, None] = OrderedDict()
        self._limit = limit

    def add(self, item: str) -> None:
        self._items[item] = None
        self._items.move_to_end(item)
        while len(self._items) > self._limit:
            self._items.popitem(last=False)

    def __contains__(self, item: object) -> bool:
        return item in self._items

    def __len__(self) -> int:
        return len(self._items)
