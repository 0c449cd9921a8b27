"""Deadlines, fault specs, parameter checks and the lease check, without vLLM."""

from __future__ import annotations

import json
import os
import re
import threading
import time

import pytest
import zmq

from watchdog_kv import config
from watchdog_kv.faults import FaultPlan, parse_faults
from watchdog_kv.kv.deadlines import DeadlineConfig, Deadlines, Phase
from watchdog_kv.kv.lease import LeaseClient, LeaseServer
from watchdog_kv.kv.states import LeaseEvent, LeaseTable, Verdict
from watchdog_kv.wire import bad_remote_params


def _deadlines(**kw) -> Deadlines:
    cfg = {"floor_s": 2.0, "cap_s": 60.0, "assumed_bandwidth_bps": 100e6, "slack": 4.0, **kw}
    return Deadlines(DeadlineConfig(**cfg))


def test_transfer_deadline_scales_with_bytes_between_floor_and_cap():
    d = _deadlines()
    assert d.deadline(Phase.TRANSFER, 0) == 2.0  # a small stuck transfer: the floor
    assert d.deadline(Phase.TRANSFER, 500_000_000) == pytest.approx(22.0)  # 2 + 4 * 5 s
    assert d.deadline(Phase.TRANSFER, 10**12) == 60.0  # never beyond the cap


def test_transfer_deadline_follows_the_slowest_measured_bandwidth():
    d = _deadlines()
    d.observe(Phase.TRANSFER, 1.0, 10_000_000)  # 10 MB/s measured
    d.observe(Phase.TRANSFER, 0.1, 10_000_000)  # 100 MB/s measured
    assert d.bandwidth_bps() == pytest.approx(10e6)
    assert d.deadline(Phase.TRANSFER, 50_000_000) == pytest.approx(2.0 + 4 * 5.0)


def test_other_phases_learn_from_the_longest_seen():
    d = _deadlines()
    assert d.deadline(Phase.HANDSHAKE) == 2.0
    assert d.observe(Phase.HANDSHAKE, 1.5)
    assert d.deadline(Phase.HANDSHAKE) == pytest.approx(6.0)
    assert d.observe(Phase.HANDSHAKE, 5.9)
    assert d.deadline(Phase.HANDSHAKE) == pytest.approx(23.6)
    assert d.observe(Phase.HANDSHAKE, 20.0)
    assert d.deadline(Phase.HANDSHAKE) == 60.0  # 80 s, capped


def test_a_phase_that_overran_its_deadline_is_not_learned():
    """The worker checks deadlines in its step: a phase seen only after it overran
    means the step was held (a stall), and must not stretch the next deadline."""
    d = _deadlines(floor_s=10.0)
    assert not d.observe(Phase.FIRST_PROGRESS, 20.0)  # a 20 s stalled step
    assert d.deadline(Phase.FIRST_PROGRESS) == 10.0  # not 80 s
    assert d.observe(Phase.FIRST_PROGRESS, 9.0)
    assert d.deadline(Phase.FIRST_PROGRESS) == pytest.approx(36.0)
    # a transfer that overran teaches no bandwidth either
    assert not d.observe(Phase.TRANSFER, 30.0, 10_000_000)
    assert d.bandwidth_bps() == 100e6


def test_fault_spec_parses_and_rejects_with_the_accepted_forms():
    assert parse_faults("") == FaultPlan()
    plan = parse_faults("delay:1.5, drop:0.25,stall_handshake:8")
    assert (plan.delay_s, plan.drop_p, plan.stall_handshake_s) == (1.5, 0.25, 8.0)
    assert parse_faults("corrupt").corrupt_p == 1.0
    for bad, says in [
        ("explode:1", "unknown fault 'explode'"),
        ("drop:2", "probability in (0, 1]"),
        ("delay", "greater than 0"),
        ("delay:1,delay:2", "given twice"),
        ("drop:x", "takes probability"),
    ]:
        with pytest.raises(ValueError, match=re.escape(says)):
            parse_faults(bad)
    with pytest.raises(config.ConfigError, match="WATCHDOG_KV_FAULT='drop:2'"):
        config.load({"WATCHDOG_KV_FAULT": "drop:2"})


GOOD = {
    "do_remote_prefill": True,
    "remote_block_ids": [[1, 2]],
    "remote_engine_id": "e",
    "remote_request_id": "r",
    "remote_host": "127.0.0.1",
    "remote_port": 5600,
    "tp_size": 1,
    "remote_num_tokens": 41,
}


@pytest.mark.parametrize(
    "change, says",
    [
        ({"remote_block_ids": "nonsense"}, "list of lists"),
        ({"remote_block_ids": [[2**40]]}, "2\\*\\*31"),
        ({"remote_block_ids": [[-1]]}, "2\\*\\*31"),
        ({"remote_block_ids": [[True]]}, "2\\*\\*31"),
        ({"remote_port": 70000}, "remote_port"),
        ({"remote_host": None}, "remote_host"),
        ({"tp_size": 0}, "tp_size"),
        ({"remote_num_tokens": "many"}, "remote_num_tokens"),
        ({"watchdog_kv_lease": "tcp://x"}, "watchdog_kv_lease"),
    ],
)
def test_bad_remote_params_are_named(change, says):
    assert bad_remote_params(GOOD) is None
    assert bad_remote_params({**GOOD, "remote_block_ids": [[]]}) is None
    problem = bad_remote_params({**GOOD, **change})
    assert problem is not None and re.search(says, problem), problem


def test_lease_check_over_the_wire():
    table = LeaseTable()
    table.hold("kept")
    table.hold("expired")
    table.apply("expired", LeaseEvent.LEASE)
    table.apply("expired", LeaseEvent.EXPIRE)
    server = LeaseServer(table, "127.0.0.1")
    client = LeaseClient()
    try:
        ask = lambda req: client.wait(server.endpoint, req, 5)  # noqa: E731
        assert ask("kept") is Verdict.VALID
        assert ask("kept") is Verdict.STALE  # one lease, one read: a replay is refused
        assert ask("expired") is Verdict.STALE
        assert ask("never-leased") is Verdict.UNKNOWN
    finally:
        server.close()
    # A lease server that is gone is a timeout, which the decode treats as "not valid".
    t0 = time.monotonic()
    with pytest.raises(TimeoutError, match="did not answer"):
        client.wait(server.endpoint, "kept", 0.5)
    assert time.monotonic() - t0 < 5
    client.close()


def _collect(clients: list[LeaseClient], want: int, answer) -> dict[str, Verdict]:
    got: dict[str, Verdict] = {}
    end = time.monotonic() + 20
    while len(got) < want and time.monotonic() < end:
        answer()
        for client in clients:
            for req, verdict in client.answers().items():
                assert req not in got, f"{req} answered twice"
                got[req] = verdict
        time.sleep(0.001)
    return got


def test_lease_questions_are_answered_by_the_step_without_the_thread():
    # The prefill worker's step answers, so a verdict does not wait for the
    # server's thread to win the GIL from a busy worker.
    table = LeaseTable()
    table.hold("kept")
    server = LeaseServer(table, "127.0.0.1", serve_in_thread=False)
    client = LeaseClient()
    try:
        assert client.ask(server.endpoint, "kept")
        assert client.ask(server.endpoint, "never-leased")
        time.sleep(0.3)
        assert client.answers() == {}, "nothing may answer but the step"
        got = _collect([client], 2, server.answer_pending)
        assert got == {"kept": Verdict.VALID, "never-leased": Verdict.UNKNOWN}
        assert server.answered == {"step": 2, "thread": 0}
    finally:
        client.close()
        server.close()


def _ask_all(clients: list[LeaseClient], endpoint: str, reqs: list[str], answer) -> None:
    for i, req in enumerate(reqs):
        assert clients[i % len(clients)].ask(endpoint, req)
        if i % 50 == 49:
            time.sleep(0.002)  # let a burst arrive
            answer()


def test_step_and_thread_racing_for_the_socket_answer_each_question_once_and_right():
    # The server's thread drains whenever it wakes, while another thread
    # answers in a tight loop and this one between bursts of questions, so
    # three threads contend for the socket all along.
    table = LeaseTable()
    server = LeaseServer(table, "127.0.0.1")
    clients = [LeaseClient() for _ in range(4)]
    reqs = [f"r{i}" for i in range(3000)]  # 750 per client: under ZeroMQ's 1000 queue
    for req in reqs[::2]:
        table.hold(req)
    expected = {r: Verdict.VALID if n % 2 == 0 else Verdict.UNKNOWN for n, r in enumerate(reqs)}
    done = threading.Event()

    def other_step() -> None:
        while not done.is_set():
            server.answer_pending()

    other = threading.Thread(target=other_step, daemon=True)
    other.start()
    try:
        _ask_all(clients, server.endpoint, reqs, server.answer_pending)
        assert _collect(clients, len(reqs), server.answer_pending) == expected
        done.set()
        other.join(timeout=5)
        assert sum(server.answered.values()) == len(reqs)
        print(f"answered: {server.answered}")
    finally:
        done.set()
        for c in clients:
            c.close()
        server.close()


def test_an_idle_worker_is_answered_by_the_thread_even_with_fds_past_1024():
    # A vLLM worker holds many files; select() cannot watch an FD past 1024.
    held = [os.open(os.devnull, os.O_RDONLY) for _ in range(1100)]
    table = LeaseTable()
    table.hold("kept")
    server = LeaseServer(table, "127.0.0.1")
    client = LeaseClient()
    try:
        assert client.wait(server.endpoint, "kept", 5) is Verdict.VALID
        assert client.wait(server.endpoint, "other", 5) is Verdict.UNKNOWN
        assert server.answered == {"step": 0, "thread": 2}
    finally:
        client.close()
        server.close()
        for fd in held:
            os.close(fd)


@pytest.mark.parametrize("by", ["thread", "step"])
def test_malformed_questions_get_bad_request_and_the_server_answers_on(by):
    table = LeaseTable()
    table.hold("kept")
    server = LeaseServer(table, "127.0.0.1", serve_in_thread=by == "thread")
    ctx = zmq.Context()
    raw = ctx.socket(zmq.DEALER)
    raw.setsockopt(zmq.LINGER, 0)
    raw.connect(server.endpoint)
    client = LeaseClient()
    try:
        bad = [b"[" * 100_000, b"not json", b'{"no_req": 1}', b"", b"\xff\xfe"]
        for payload in bad:
            raw.send_multipart([b"", payload])
        replies = []
        end = time.monotonic() + 10
        while len(replies) < len(bad) and time.monotonic() < end:
            if by == "step":
                server.answer_pending()
            if raw.poll(10):
                replies.append(json.loads(raw.recv_multipart()[-1]))
        assert [r["verdict"] for r in replies] == ["bad_request"] * len(bad)
        assert client.ask(server.endpoint, "kept")
        step = server.answer_pending if by == "step" else lambda: 0
        assert _collect([client], 1, step) == {"kept": Verdict.VALID}
        assert server.answered[by] == len(bad) + 1
    finally:
        raw.close()
        ctx.term()
        client.close()
        server.close()


class FakeNixlConnector:
    """The scheduler-side methods the watch wraps, answering as NixlConnector does."""

    def __init__(self, params: dict):
        self.params = params

    def get_num_new_matched_tokens(self, request, num_computed_tokens):
        remote = (request.kv_transfer_params or {}).get("do_remote_prefill")
        return (40, True) if remote else (0, False)

    def update_state_after_alloc(self, request, blocks, num_external_tokens):
        return None

    def build_connector_meta(self, scheduler_output):
        return object()

    def request_finished(self, request, block_ids):
        return True, dict(self.params)


def test_the_prefill_names_its_prompt_and_the_decode_refuses_another_prompts_kv(tmp_path):
    from types import SimpleNamespace

    from watchdog_kv import config
    from watchdog_kv.instrument.connector import attach
    from watchdog_kv.wire import PROMPT as PROMPT_PARAM
    from watchdog_kv.wire import prompt_digest

    settings = config.load({"WATCHDOG_KV_STATE_DIR": str(tmp_path)})
    prefill_conn = FakeNixlConnector(GOOD)
    attach(prefill_conn, "scheduler", settings)
    first = SimpleNamespace(request_id="a", prompt_token_ids=[5, 6, 7], kv_transfer_params={})
    delay, params = prefill_conn.request_finished(first, [[1, 2]])
    assert delay and params[PROMPT_PARAM] == prompt_digest([5, 6, 7]) == prompt_digest((5, 6, 7))
    assert bad_remote_params(params) is None

    decode_conn = FakeNixlConnector({})
    decode = attach(decode_conn, "scheduler", settings).watch
    same = SimpleNamespace(request_id="b", prompt_token_ids=[5, 6, 7], kv_transfer_params=params)
    assert decode_conn.get_num_new_matched_tokens(same, 0) == (40, True)  # pulled
    other = SimpleNamespace(request_id="c", prompt_token_ids=[5, 6, 8], kv_transfer_params=params)
    assert decode_conn.get_num_new_matched_tokens(other, 0) == (0, False)  # computed here
    assert other.kv_transfer_params["do_remote_prefill"] is False and decode.refused_params == 1
    # a prefill without watchdog_kv names no prompt: nothing to compare, the KV is used
    plain = {k: v for k, v in params.items() if k != PROMPT_PARAM}
    unnamed = SimpleNamespace(request_id="d", prompt_token_ids=[9], kv_transfer_params=plain)
    assert decode_conn.get_num_new_matched_tokens(unnamed, 0) == (40, True)
    assert prompt_digest(None) is None and prompt_digest([1]) != prompt_digest([1, 1])
