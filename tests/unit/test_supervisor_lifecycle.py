"""The supervisor's server lifecycle table, checked over every order of events."""

from __future__ import annotations

import pytest
from hypothesis import given
from hypothesis import strategies as st

from watchdog_kv.supervisor.lifecycle import (
    COMING_BACK,
    LIFECYCLE,
    IllegalTransition,
    ServerEvent,
    ServerState,
    apply,
)

S, E = ServerState, ServerEvent
events = st.lists(st.sampled_from(list(E)), max_size=40)


def run(evs: list[ServerEvent], start: ServerState = S.WAITING) -> list[tuple[S, E, S]]:
    """Apply ``evs`` in order; the legal transitions taken (illegal ones change nothing)."""
    state, taken = start, []
    for ev in evs:
        try:
            new = apply("decode-0", state, ev)
        except IllegalTransition as exc:
            assert (state, ev) not in LIFECYCLE
            assert exc.state == state and exc.event == ev
            continue
        taken.append((state, ev, new))
        state = new
    return taken


def reachable(start: ServerState, without: frozenset[ServerEvent] = frozenset()) -> set[S]:
    seen, todo = {start}, [start]
    while todo:
        state = todo.pop()
        for (src, ev), dst in LIFECYCLE.items():
            if src is state and ev not in without and dst not in seen:
                seen.add(dst)
                todo.append(dst)
    return seen


@given(events)
def test_every_reachable_state_is_one_of_the_tables(evs):
    for src, ev, dst in run(evs):
        assert LIFECYCLE[(src, ev)] is dst
        assert isinstance(dst, ServerState)


@given(events, events)
def test_a_stopped_server_never_moves_again(before, after):
    taken = run([*before, E.STOP, *after])
    stopped = next(i for i, (_, ev, _) in enumerate(taken) if ev is E.STOP)
    assert taken[stopped][2] is S.STOPPED
    assert taken[stopped + 1 :] == []  # nothing after: no spawn, no restart, no ready


@given(events)
def test_a_server_given_up_on_stays_failed_until_the_service_stops(evs):
    taken = run(evs)
    failed = [i for i, (_, _, dst) in enumerate(taken) if dst is S.FAILED]
    for i in failed:
        for _, ev, dst in taken[i + 1 :]:
            assert (ev, dst) == (E.STOP, S.STOPPED)


@given(events)
def test_ready_only_after_a_spawn_and_a_health_check_since_the_last_death(evs):
    state_since: list[ServerEvent] = []  # events since the server last left `ready`
    for src, ev, dst in run(evs):
        if dst is S.READY:
            assert state_since[-1:] == [E.SPAWN] and ev is E.HEALTHY
        state_since = [] if src is S.READY else state_since
        state_since.append(ev)


@given(events)
def test_the_state_name_is_what_status_shows(evs):
    for _, _, dst in run(evs):
        assert dst == dst.value and str(dst) == dst.value  # JSON and logs see the name


def test_exit_during_a_restart_is_refused_the_restart_goes_on():
    state = apply("d", S.READY, E.RESTART)
    with pytest.raises(IllegalTransition, match="'exit' is not allowed in state 'restarting'"):
        apply("d", state, E.EXIT)
    assert apply("d", state, E.SPAWN) is S.STARTING


def test_a_stall_during_start_up_restarts_a_starting_server():
    assert apply("d", apply("d", S.WAITING, E.SPAWN), E.RESTART) is S.RESTARTING


def test_a_stop_during_the_backoff_ends_the_row():
    state = apply("d", apply("d", S.STARTING, E.EXIT), E.STOP)  # waiting for the next attempt
    assert state is S.STOPPED
    for ev in (E.RESTART, E.SPAWN, E.GIVE_UP):
        with pytest.raises(IllegalTransition):
            apply("d", state, ev)


def test_states_given_as_their_names_are_read_as_states():
    assert apply("d", "ready", E.EXIT) is S.EXITED  # status and tests speak names


def test_the_table_has_no_dead_ends_but_the_final_ones():
    assert reachable(S.WAITING) == set(S)
    assert reachable(S.STOPPED) == {S.STOPPED}
    assert reachable(S.FAILED) == {S.FAILED, S.STOPPED}
    for state in COMING_BACK:  # a router may wait for these: they can be ready again
        assert S.READY in reachable(state, without=frozenset({E.STOP, E.GIVE_UP}))
    for state in set(S) - COMING_BACK - {S.READY}:
        assert S.READY not in reachable(state)
