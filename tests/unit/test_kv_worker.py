"""The worker-side watch, driven step by step around a stand-in connector.

The connector here is a fake (a real one needs a vLLM engine, which the
integration tests run): it reports what the test tells it to, through the same
method names and result object shape as vLLM 0.32's KVConnectorBase_V1.
"""

from __future__ import annotations

import contextlib
import time
from dataclasses import asdict, dataclass, field

import pytest

from watchdog_kv import config
from watchdog_kv.instrument.connector import attach
from watchdog_kv.instrument.faults import attach_kv_faults
from watchdog_kv.kv.deadlines import Phase
from watchdog_kv.kv.lease import LeaseServer
from watchdog_kv.kv.states import LeaseEvent, LeaseTable
from watchdog_kv.kv.worker import WorkerWatch
from watchdog_kv.wire import RECV_PLANS as RECV_PLAN_ATTR
from watchdog_kv.wire import RecvPlan


@dataclass
class Results:  # the shape of vLLM's KVConnectorTransferResults
    finished_sending: set[str] = field(default_factory=set)
    finished_recving: set[str] = field(default_factory=set)
    failed_recving: set[str] = field(default_factory=set)


class Metadata:
    pass


class FakeConnector:
    def __init__(self) -> None:
        self.metadata = Metadata()
        self.next_results = Results()
        self.calls: list[str] = []

    def has_connector_metadata(self) -> bool:
        return True

    def _get_connector_metadata(self) -> Metadata:
        return self.metadata

    def register_kv_caches(self, kv_caches):
        self.calls.append("register_kv_caches")

    def start_load_kv(self, forward_context, **kwargs):
        self.calls.append("start_load_kv")

    def get_transfer_results(self, finished_req_ids):
        self.calls.append("get_transfer_results")
        out, self.next_results = self.next_results, Results()
        return out


def _settings(**env: str) -> config.Settings:
    base = {"WATCHDOG_KV_KV_DEADLINE_FLOOR": "0.2", "WATCHDOG_KV_KV_DEADLINE_CAP": "5"}
    return config.load({**base, **env})


def _plan(connector: FakeConnector, req: str, lease: list[str] | None = None) -> None:
    plan = RecvPlan(req_id=req, num_blocks=1, remote_request_id=f"p-{req}", lease=lease)
    setattr(connector.metadata, RECV_PLAN_ATTR, {req: asdict(plan)})


def _step(watch_conn: FakeConnector, finished: set[str] | None = None) -> Results:
    watch_conn.start_load_kv(None)
    return watch_conn.get_transfer_results(finished or set())


@contextlib.contextmanager
def watched(**env: str):
    """A stand-in connector with a watch on it, unhooked afterwards."""
    conn = FakeConnector()
    settings = _settings(**env)
    got = attach(conn, "worker", settings, 0)
    if settings.fault.active:
        attach_kv_faults(got, settings)
    try:
        yield conn, got.watch
    finally:
        got.detach()


@pytest.fixture
def connector():
    with watched() as pair:
        yield pair


def test_detach_restores_the_connectors_own_methods():
    conn = FakeConnector()
    before = {n: getattr(conn, n).__func__ for n in ("start_load_kv", "get_transfer_results")}
    got = attach(conn, "worker", _settings(), 0)
    assert "get_transfer_results" in vars(conn)
    got.detach()
    for name, func in before.items():
        assert getattr(conn, name).__func__ is func
    assert "get_transfer_results" not in vars(conn)


class FakeAdapter:
    """Stands in for the NIXL adapter: a transport that can (or cannot) cancel."""

    def __init__(self, can_cancel: bool) -> None:
        self.can_cancel = can_cancel
        self.fenced: set[str] = set()
        self.cancelled: list[str] = []

    def phase(self, req_id, remote_engine_id):
        return "pulling"

    def cancel(self, req_id) -> bool:
        self.cancelled.append(req_id)
        return self.can_cancel

    def observe_metadata(self, metadata) -> None:
        pass

    def close(self) -> None:
        pass


def _past_deadline(watch: WorkerWatch) -> None:
    time.sleep(watch.deadlines.deadline(Phase.TRANSFER, 0) + 0.05)


def test_a_cancelled_load_is_reported_failed_once_and_late_completion_fenced(connector):
    conn, watch = connector
    watch.adapter = FakeAdapter(can_cancel=True)
    _plan(conn, "r1")
    assert _step(conn) == Results()  # admitted, posted, nothing to report yet
    setattr(conn.metadata, RECV_PLAN_ATTR, {})
    _past_deadline(watch)
    out = _step(conn)
    assert watch.adapter.cancelled == ["r1"]
    assert out.finished_recving == {"r1"} and out.failed_recving == {"r1"}
    assert watch.recv.outcomes == {"recomputed": 1}
    # The transport completes after all: vLLM's scheduler must not hear of it.
    conn.next_results = Results(finished_recving={"r1"})
    assert _step(conn) == Results()
    assert _step(conn) == Results()  # and never twice


def test_without_a_cancel_the_blocks_go_back_only_when_the_transfer_is_over(connector):
    conn, watch = connector  # no adapter: a connector watchdog_kv cannot cancel
    _plan(conn, "r5")
    _step(conn)
    setattr(conn.metadata, RECV_PLAN_ATTR, {})
    _past_deadline(watch)
    assert _step(conn) == Results()  # deadline passed, but the transfer may still write
    assert _step(conn) == Results()
    conn.next_results = Results(finished_recving={"r5"})  # now it is over
    out = _step(conn)
    assert out.finished_recving == {"r5"} and out.failed_recving == {"r5"}
    assert watch.recv.outcomes == {"recomputed": 1}


def test_a_refused_cancel_is_retried_and_the_blocks_stay_until_it_succeeds(connector):
    conn, watch = connector
    watch.adapter = FakeAdapter(can_cancel=False)
    _plan(conn, "r6")
    _step(conn)
    setattr(conn.metadata, RECV_PLAN_ATTR, {})
    _past_deadline(watch)
    assert _step(conn) == Results()
    assert _step(conn) == Results()
    assert watch.adapter.cancelled == ["r6", "r6"]
    watch.adapter.can_cancel = True
    out = _step(conn)
    assert out.finished_recving == {"r6"} and out.failed_recving == {"r6"}


def test_transport_failure_is_recovered(connector):
    conn, watch = connector
    _plan(conn, "r2")
    _step(conn)
    conn.next_results = Results(finished_recving={"r2"}, failed_recving={"r2"})
    out = _step(conn)
    assert out.finished_recving == {"r2"} and out.failed_recving == {"r2"}
    assert watch.recv.outcomes == {"recomputed": 1}


def test_abort_while_loading_leaves_the_completion_to_the_connector(connector):
    conn, watch = connector
    _plan(conn, "r3")
    _step(conn)
    assert _step(conn, finished={"r3"}) == Results()
    assert watch.recv.outcomes == {"aborted": 1}
    # vLLM frees an aborted load's blocks when it is reported finished: let it through.
    conn.next_results = Results(finished_recving={"r3"})
    assert _step(conn) == Results(finished_recving={"r3"})


def _silent_prefill() -> str:
    """The address of a lease server that is gone: completions wait for its answer."""
    server = LeaseServer(LeaseTable(), "127.0.0.1")
    server.close()
    return server.endpoint


def test_abort_of_a_held_completion_reports_it_at_once():
    with watched(WATCHDOG_KV_KV_DEADLINE_FLOOR="5") as (conn, watch):
        _completed_load(conn, "r7", lease=[_silent_prefill()])
        assert _step(conn) == Results()  # held for the lease check
        assert _step(conn, finished={"r7"}) == Results(finished_recving={"r7"})
        assert watch.recv.outcomes == {"aborted": 1}


def test_disable_hands_held_completions_back_as_failed():
    with watched(WATCHDOG_KV_KV_DEADLINE_FLOOR="5") as (conn, watch):
        _completed_load(conn, "r8", lease=[_silent_prefill()])
        assert _step(conn) == Results()  # held
        watch._disable()  # as an internal error would
        assert _step(conn) == Results(finished_recving={"r8"}, failed_recving={"r8"})
        assert _step(conn) == Results()


def _until_reported(conn: FakeConnector, timeout: float = 5.0) -> Results:
    end = time.monotonic() + timeout
    while time.monotonic() < end:
        out = _step(conn)
        if out.finished_recving:
            return out
        time.sleep(0.01)
    raise AssertionError("never reported")


@pytest.mark.parametrize("expired", [False, True], ids=["lease held", "lease expired"])
def test_completion_is_held_for_the_lease_check(expired):
    leases = LeaseTable()
    leases.hold("p-r4")
    leases.apply("p-r4", LeaseEvent.LEASE)
    if expired:
        leases.apply("p-r4", LeaseEvent.EXPIRE)
        leases.apply("p-r4", LeaseEvent.RELEASE)
    server = LeaseServer(leases, "127.0.0.1")
    with watched(WATCHDOG_KV_KV_DEADLINE_FLOOR="2") as (conn, watch):
        _plan(conn, "r4", lease=[server.endpoint])
        _step(conn)
        setattr(conn.metadata, RECV_PLAN_ATTR, {})
        conn.next_results = Results(finished_recving={"r4"})
        held = _step(conn)
        assert held == Results(), "the completion must wait for the prefill's answer"
        out = _until_reported(conn)
        assert out.finished_recving == {"r4"}
        assert out.failed_recving == ({"r4"} if expired else set())
        assert watch.recv.outcomes == {"recomputed" if expired else "received": 1}
        server.close()


def test_own_failure_disables_the_watch_and_vllm_results_pass_untouched(connector):
    conn, watch = connector
    setattr(conn.metadata, RECV_PLAN_ATTR, {"bad": {"no_such_field": 1}})
    _step(conn)  # the plan does not parse: an internal error, contained
    from watchdog_kv import guard

    assert any("kv.start_load_kv" in e for e in guard.internal_errors())
    guard.clear_internal_errors()
    assert watch.enabled is False
    conn.next_results = Results(finished_recving={"x"}, failed_recving={"x"})
    assert _step(conn) == Results(finished_recving={"x"}, failed_recving={"x"})


def test_vllm_exceptions_pass_through_untouched():
    boom = RuntimeError("vLLM's own error")

    class Raising(FakeConnector):
        def get_transfer_results(self, finished_req_ids):
            raise boom

        def start_load_kv(self, forward_context, **kwargs):
            raise boom

    conn = Raising()
    got = attach(conn, "worker", _settings(), 0)
    try:
        for call in (lambda: conn.get_transfer_results(set()), lambda: conn.start_load_kv(None)):
            with pytest.raises(RuntimeError) as info:
                call()
            assert info.value is boom
    finally:
        got.detach()


def _completed_load(conn: FakeConnector, req: str, lease: list[str] | None = None) -> None:
    """Admit a load for ``req`` and make the connector report it finished next step."""
    _plan(conn, req, lease=lease)
    _step(conn)
    setattr(conn.metadata, RECV_PLAN_ATTR, {})
    conn.next_results = Results(finished_recving={req})


def test_fault_drop_swallows_the_completion_and_the_deadline_recovers():
    with watched(WATCHDOG_KV_FAULT="drop:1") as (conn, watch):
        _completed_load(conn, "d1")
        assert _step(conn) == Results()  # the completion is dropped...
        out = _until_reported(conn)  # ...until the verify-phase deadline passes
        assert out.failed_recving == {"d1"}
        assert watch.recv.outcomes == {"recomputed": 1}


def test_fault_delay_reports_late_but_received():
    with watched(WATCHDOG_KV_FAULT="delay:0.3") as (conn, watch):
        _completed_load(conn, "d2")
        t0 = time.monotonic()
        out = _until_reported(conn)
        assert time.monotonic() - t0 >= 0.3
        assert out == Results(finished_recving={"d2"})
        assert watch.recv.outcomes == {"received": 1}


@pytest.mark.needs_vllm  # torch / vLLM
def test_fault_corrupt_is_reported_broken_and_recomputed():
    with watched(WATCHDOG_KV_FAULT="corrupt:1") as (conn, watch):
        _completed_load(conn, "d3")
        out = _step(conn)
        assert out.finished_recving == {"d3"} and out.failed_recving == {"d3"}
        assert watch.recv.outcomes == {"recomputed": 1}
