"""The KV-transfer state machines under random interleavings (hypothesis).

A small simulated engine drives the real :class:`RecvTable` and
:class:`LeaseTable`: requests load KV into blocks taken from a pool, transports
complete late, deadlines fire, prefills expire leases, vLLM aborts. Whatever the
order, the invariants the hooks rely on must hold.
"""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from watchdog_kv.kv.states import (
    LEASE,
    RECV,
    Fenced,
    IllegalTransition,
    Lease,
    LeaseEvent,
    LeaseTable,
    Recv,
    RecvEvent,
    RecvTable,
    Verdict,
)
from watchdog_kv.kv.states import RECV_TERMINAL as TERMINAL

# --- the tables themselves --------------------------------------------------


def test_every_terminal_state_is_a_dead_end():
    for (state, _event), _new in RECV.items():
        assert state not in TERMINAL
    assert all(state is not Lease.RELEASED for state, _ in LEASE)


def test_every_recv_state_can_reach_a_terminal_state():
    graph: dict[Recv, set[Recv]] = {}
    for (state, _), new in RECV.items():
        graph.setdefault(state, set()).add(new)
    for start in Recv:
        seen, todo = {start}, [start]
        while todo:
            for nxt in graph.get(todo.pop(), ()):
                if nxt not in seen:
                    seen.add(nxt)
                    todo.append(nxt)
        assert seen & TERMINAL, f"{start} cannot end"


def test_blocks_go_back_only_after_the_transfer_was_cancelled():
    # recompute/fail (blocks back to vLLM) are only legal from RECOVERING, reached by CANCELLED.
    for (state, event), _new in RECV.items():
        if event in (RecvEvent.RECOMPUTE, RecvEvent.FAIL):
            assert state is Recv.RECOVERING
    assert {s for (s, e), n in RECV.items() if n is Recv.RECOVERING} == {
        Recv.TIMED_OUT,
        Recv.BROKEN,
        Recv.STALE,
    }


def test_illegal_event_raises_and_changes_nothing():
    table = RecvTable()
    table.start("r")
    with pytest.raises(IllegalTransition, match="'lease_ok' is not allowed in state 'waiting'"):
        table.apply("r", RecvEvent.LEASE_OK)
    assert table.get("r").state is Recv.WAITING
    assert table.get("r").history == []


def test_completion_from_a_cancelled_transfer_is_fenced():
    table = RecvTable()
    table.start("r")
    table.apply("r", RecvEvent.POSTED)
    epoch = table.get("r").epoch
    table.apply("r", RecvEvent.DEADLINE)
    table.apply("r", RecvEvent.CANCELLED)
    with pytest.raises(Fenced, match="fenced off"):
        table.apply("r", RecvEvent.DONE, epoch=epoch)
    assert table.get("r").state is Recv.RECOVERING
    table.apply("r", RecvEvent.RECOMPUTE)
    assert table.outcomes == {"recomputed": 1}


def test_lease_verdicts():
    table = LeaseTable()
    for key in ("read", "expired", "kept"):
        table.hold(key)
        table.apply(key, LeaseEvent.LEASE)
    table.apply("read", LeaseEvent.READ)
    table.apply("read", LeaseEvent.RELEASE)
    table.apply("expired", LeaseEvent.EXPIRE)
    table.apply("expired", LeaseEvent.RELEASE)
    assert table.verdict("read") is Verdict.VALID
    assert table.verdict("kept") is Verdict.VALID
    assert table.verdict("expired") is Verdict.STALE
    assert table.verdict("never") is Verdict.UNKNOWN
    # The first decode to ask owns the read; a replay of the same parameters is stale.
    assert table.claim("read") is Verdict.VALID
    assert table.claim("read") is Verdict.STALE
    assert table.claim("expired") is Verdict.STALE
    with pytest.raises(IllegalTransition):
        table.apply("expired", LeaseEvent.READ)  # the read came after the lease ran out
    assert table.stale_reads == 1
    with pytest.raises(IllegalTransition):
        table.apply("read", LeaseEvent.RELEASE)  # released exactly once


# --- random interleavings ---------------------------------------------------

N_REQ = 3
N_BLOCKS = 8


class Sim:
    """Decode side of an engine: a block pool, loads, a transport that may be late."""

    def __init__(self) -> None:
        self.table = RecvTable()
        self.free = list(range(N_BLOCKS))
        self.owner: dict[int, str] = {}
        self.blocks: dict[str, list[int]] = {}
        self.inflight: dict[str, tuple[int, list[int]]] = {}  # req -> (epoch, target blocks)
        self.ended: dict[str, str] = {}
        self.next_id = 0

    def start(self) -> None:
        if len(self.free) < 2:
            return
        req = f"r{self.next_id}"
        self.next_id += 1
        self.blocks[req] = [self.free.pop(), self.free.pop()]
        for b in self.blocks[req]:
            self.owner[b] = req
        self.table.start(req)

    def try_apply(self, req: str, event: RecvEvent, epoch: int | None = None) -> bool:
        try:
            t = self.table.apply(req, event, epoch=epoch)
        except IllegalTransition:
            return False
        if event is RecvEvent.POSTED:
            self.inflight[req] = (t.epoch, list(self.blocks[req]))
        if t.state in TERMINAL:
            self.end(req, t.state)
        return True

    def land(self, req: str) -> None:
        """The transport finishes a read posted earlier -- possibly long after a recovery.

        The write happens whatever the tables say (it is the hardware's); what the
        tables must guarantee is that the blocks still belong to ``req`` then.
        """
        posted = self.inflight.pop(req, None)
        if posted is None:
            return
        epoch, targets = posted
        for block in targets:
            assert self.owner.get(block) == req, f"{req}'s late read wrote into block {block}"
        self.try_apply(req, RecvEvent.DONE, epoch=epoch)
        if self.ended.get(req) == "aborted":
            self.release(req)  # vLLM frees an aborted load's blocks once its read is over

    def cancel(self, req: str) -> None:
        # Cancelling is the transport's promise that the posted read never lands.
        if self.try_apply(req, RecvEvent.CANCELLED):
            self.inflight.pop(req, None)

    def end(self, req: str, state: Recv) -> None:
        assert req not in self.ended, f"{req} ended twice"
        self.ended[req] = state.value
        if state is Recv.ABORTED and req in self.inflight:
            return  # freed when the read is over (see land)
        self.release(req)

    def release(self, req: str) -> None:
        for b in self.blocks.pop(req):
            del self.owner[b]
            self.free.append(b)


ops = st.lists(
    st.tuples(
        st.sampled_from(
            [
                "start",
                "posted",
                "land",
                "deadline",
                "error",
                "lease_ok",
                "lease_stale",
                "cancel",
                "recompute",
                "fail",
                "abort",
            ]
        ),
        st.integers(min_value=0, max_value=N_REQ),
    ),
    max_size=80,
)


@settings(max_examples=1000, deadline=None)
@given(ops)
def test_recv_interleavings_keep_the_invariants(steps):
    sim = Sim()
    for op, n in steps:
        req = f"r{max(sim.next_id - 1 - n, 0)}"  # mostly the newest requests
        if op == "start":
            sim.start()
        elif op == "land":
            sim.land(req)
        elif op == "cancel":
            sim.cancel(req)
        else:
            sim.try_apply(req, RecvEvent(op))
        # (land() asserts that every write hits blocks its request owns at that moment.)
        # Every block is either free or owned by exactly one request, never both.
        assert sorted(sim.free + list(sim.owner)) == list(range(N_BLOCKS))
    # Every request is live or ended exactly once, with one outcome.
    live = {t.req_id for t in sim.table.live()}
    assert live.isdisjoint(sim.ended)
    assert sum(sim.table.outcomes.values()) == len(sim.ended)


lease_ops = st.lists(
    st.tuples(st.sampled_from([*list(LeaseEvent), "hold"]), st.integers(0, 3)), max_size=60
)


@settings(max_examples=400, deadline=None)
@given(lease_ops)
def test_lease_interleavings_release_once_and_never_trust_a_late_read(steps):
    table = LeaseTable()
    released: list[str] = []
    read_while_kept: set[str] = set()
    expired_first: set[str] = set()
    for event, n in steps:
        key = f"p{n}"
        if event == "hold":
            if table.state(key) is None:
                table.hold(key)
            continue
        before = table.state(key)
        try:
            new = table.apply(key, event)
        except IllegalTransition:
            assert table.state(key) is before  # nothing changed
            continue
        if new is Lease.RELEASED:
            released.append(key)
        if new is Lease.READ:
            read_while_kept.add(key)
        if new is Lease.EXPIRED:
            expired_first.add(key)
    assert len(released) == len(set(released)), "a lease was released twice"
    for key in expired_first:
        assert table.verdict(key) is Verdict.STALE
    for key in read_while_kept:
        assert table.verdict(key) is Verdict.VALID
