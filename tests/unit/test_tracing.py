"""Traces and metrics, with spans caught in memory (the SDK's own in-memory exporter).

The KV spans are driven through the real worker watch around the stand-in
connector of test_kv_worker; the router's spans through RequestTrace.
"""

from __future__ import annotations

import sys
import time
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from watchdog_kv import config, wire
from watchdog_kv.telemetry import logs, metrics, tracing
from watchdog_kv.wire import RECV_PLANS as RECV_PLAN_ATTR
from watchdog_kv.wire import RecvPlan

sys.path.insert(0, str(Path(__file__).parent))
from test_kv_worker import _step, watched


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    memory = InMemorySpanExporter()
    provider = TracerProvider(id_generator=tracing.SystemRandomIds())
    provider.add_span_processor(SimpleSpanProcessor(memory))
    tracing.use(provider)
    try:
        yield memory
    finally:
        tracing.use(None)
        logs.set_trace_lookup(None)


def _by_name(memory: InMemorySpanExporter) -> dict[str, list]:
    out: dict[str, list] = {}
    for span in memory.get_finished_spans():
        out.setdefault(span.name, []).append(span)
    return out


# --- configuration -------------------------------------------------------------------


def test_tracing_is_off_without_an_endpoint():
    assert not config.load({}).otel.enabled
    assert not config.load({"OTEL_SERVICE_NAME": "x"}).otel.enabled


def test_endpoint_protocol_and_service_name():
    grpc = config.load({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317"}).otel
    assert (grpc.exporter, grpc.protocol, grpc.endpoint) == ("otlp", "grpc", "http://h:4317")
    http = config.load(
        {
            "OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4318/",
            "OTEL_EXPORTER_OTLP_PROTOCOL": "http/protobuf",
            "OTEL_SERVICE_NAME": "shop",
        }
    ).otel
    assert http.endpoint == "http://h:4318/v1/traces"  # the specification's signal path
    assert tracing.service_name(http.service_name, "decode") == "shop-decode"
    assert tracing.service_name("shop-decode", "decode") == "shop-decode"
    explicit = config.load(
        {
            "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://h:9/custom",
            "OTEL_EXPORTER_OTLP_TRACES_PROTOCOL": "http/protobuf",
        }
    ).otel
    assert explicit.endpoint == "http://h:9/custom"
    off = config.load({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://h:4317", "OTEL_SDK_DISABLED": "true"})
    assert not off.otel.enabled


@pytest.mark.parametrize(
    "env, name",
    [
        ({"OTEL_EXPORTER_OTLP_PROTOCOL": "http/json"}, "OTEL_EXPORTER_OTLP_PROTOCOL"),
        ({"OTEL_TRACES_SAMPLER": "sometimes"}, "OTEL_TRACES_SAMPLER"),
        (
            {"OTEL_TRACES_SAMPLER": "traceidratio", "OTEL_TRACES_SAMPLER_ARG": "1.5"},
            "OTEL_TRACES_SAMPLER_ARG",
        ),
        ({"OTEL_EXPORTER_OTLP_HEADERS": "novalue"}, "OTEL_EXPORTER_OTLP_HEADERS"),
        ({"OTEL_TRACES_EXPORTER": "zipkin"}, "OTEL_TRACES_EXPORTER"),
        ({"OTEL_SDK_DISABLED": "maybe"}, "OTEL_SDK_DISABLED"),
    ],
)
def test_bad_otel_values_stop_start_up_naming_the_variable(env, name):
    with pytest.raises(config.ConfigError) as err:
        config.load(env)
    assert str(err.value).startswith(f"{name}=") and "Accepted:" in str(err.value)


def test_ids_do_not_come_from_the_seeded_random_module():
    """vLLM seeds ``random`` alike in every engine process: ids drawn from it repeat
    across processes, and drawing them would move vLLM's own random sequence."""
    import random

    ids = tracing.SystemRandomIds()
    random.seed(0)
    state = random.getstate()
    first = (ids.generate_trace_id(), ids.generate_span_id())
    assert random.getstate() == state
    random.seed(0)
    assert (ids.generate_trace_id(), ids.generate_span_id()) != first


# --- propagation -------------------------------------------------------------------------


def test_traceparent_round_trip_and_malformed_input(spans):
    span = tracing.tracer("t").start_span("call")
    parent = tracing.traceparent_of(span)
    assert parent is not None and parent.startswith("00-")
    ctx = tracing.context_from(parent)
    assert ctx is not None
    for bad in (None, "", "garbage", 42, "00-0-0-01"):
        assert tracing.context_from(bad) is None
    span.end()


def test_no_tracing_means_no_spans_and_no_errors():
    tracing.use(None)
    spans = tracing.RequestSpans("t")
    spans.start("r", "kv.load", "00-" + "1" * 32 + "-" + "2" * 16 + "-01")
    assert "r" not in spans
    assert not tracing.tracer("t").start_span("x").is_recording()


# --- KV spans through the worker watch -------------------------------------------------------


def test_a_received_load_is_one_kv_load_span_with_its_phases(spans):
    parent = tracing.tracer("router").start_span("decode")
    with watched(WATCHDOG_KV_KV_LEASE_CHECK="0") as (conn, _watch):
        plan = RecvPlan(req_id="r1", num_blocks=1, remote_request_id="p-r1")
        plan.trace = tracing.traceparent_of(parent)
        setattr(conn.metadata, RECV_PLAN_ATTR, {"r1": asdict(plan)})
        _step(conn)
        conn.next_results.finished_recving.add("r1")
        _step(conn)
    parent.end()
    found = _by_name(spans)
    (load,) = found["kv.load"]
    assert load.parent.span_id == parent.get_span_context().span_id
    assert load.context.trace_id == parent.get_span_context().trace_id
    assert load.attributes["watchdog.outcome"] == "received"
    for phase in ("kv.pull", "kv.lease_check"):
        (child,) = found[phase]
        assert child.parent.span_id == load.context.span_id
    assert load.status.is_ok


def test_a_load_past_its_deadline_carries_the_detection_and_the_recovery(spans):
    parent = tracing.tracer("router").start_span("decode")
    with watched() as (conn, _watch):  # deadline floor 0.2 s in these tests
        plan = RecvPlan(req_id="r2", num_blocks=1, remote_request_id="p-r2")
        plan.trace = tracing.traceparent_of(parent)
        setattr(conn.metadata, RECV_PLAN_ATTR, {"r2": asdict(plan)})
        _step(conn)
        time.sleep(0.5)
        _step(conn)  # past the deadline; this connector cannot cancel: wait for it
        conn.next_results.finished_recving.add("r2")
        results = _step(conn)
        assert "r2" in results.failed_recving
    parent.end()
    (load,) = _by_name(spans)["kv.load"]
    assert load.attributes["watchdog.outcome"] == "recomputed"
    events = [
        (e.name, e.attributes["watchdog.cause"], e.attributes["watchdog.action"])
        for e in load.events
    ]
    pull = _by_name(spans)["kv.pull"][0]
    missed = [e for e in pull.events if e.name == "kv.deadline_missed"]
    assert missed and missed[0].attributes["watchdog.cause"] == "transport"
    assert ("kv.recovered", "transport", "recompute the prompt here") in events
    # the phase that missed its deadline is an error; the recovered load is not
    assert not pull.status.is_ok and pull.attributes["watchdog.outcome"] == "timed_out"
    assert load.status.is_ok


def test_log_events_carry_the_trace_of_their_request(spans, capsys):
    parent = tracing.tracer("router").start_span("decode")
    with tracing.current(parent):
        logs.get_logger("t").warning("inside")
    parent.end()
    err = capsys.readouterr().err
    trace_id = format(parent.get_span_context().trace_id, "032x")
    assert f'"trace_id": "{trace_id}"' in err


# --- metrics ---------------------------------------------------------------------------------


def test_service_collector_sums_processes_and_keeps_dead_ones(tmp_path):
    from watchdog_kv import process

    def record(pid: int, server: str, misses: int, step: float) -> None:
        m = metrics.ProcessMetrics()
        m.count("kv_deadline_misses", "handshake", misses)
        m.count("kv_recoveries", "recompute", misses)
        m.observe("step_seconds", step, metrics.STEP_BUCKETS)
        rec = process.StatusRecord(pid, 1, "worker", 0, "w", server, metrics=m.snapshot())
        process.write_record(tmp_path, rec)

    import os

    record(os.getpid(), "decode-0", 2, 0.02)
    collector = metrics.ServiceCollector(
        lambda: tmp_path,
        lambda: {
            "recoveries": {("decode_retry", ""): 1},
            "deadline_misses": {("step", "decode-0"): 3},
        },
    )
    out = {m.name: m for m in collector.collect()}
    misses = {tuple(s.labels.values()): s.value for s in out["watchdog_kv_deadline_misses"].samples}
    assert misses[("kv_handshake", "decode-0")] == 2 and misses[("step", "decode-0")] == 3
    kinds = {s.labels["kind"]: s.value for s in out["watchdog_kv_recoveries"].samples}
    assert kinds == {"kv_recompute": 2, "decode_retry": 1}
    steps = out["watchdog_kv_step_seconds"].samples
    assert any(s.name.endswith("_count") and s.value == 1 for s in steps)
    # the process's record is gone (it died): its counts stay
    for f in (tmp_path / "procs").iterdir():
        f.unlink()
    again = {m.name: m for m in collector.collect()}
    misses = {
        tuple(s.labels.values()): s.value for s in again["watchdog_kv_deadline_misses"].samples
    }
    assert misses[("kv_handshake", "decode-0")] == 2


# --- the router's spans ------------------------------------------------------------------------


def test_router_call_spans_label_failures_and_detections(spans):
    from types import SimpleNamespace

    from watchdog_kv.router.handoff import Backend, HandoffError
    from watchdog_kv.router.spans import InFlight, RequestTrace

    inflight = InFlight()
    request = RequestTrace(SimpleNamespace(headers={}), "/v1/completions", "r1", inflight, False)
    decode = Backend("decode-0", "http://127.0.0.1:9")
    with pytest.raises(HandoffError), request.call("decode", decode, kv="remote") as call:
        params = call.params({"remote_engine_id": "e"})
        assert tracing.context_from(params[wire.TRACE]) is not None
        assert inflight.label("decode-0", "watchdog.stall_detected", "stall", "abort") == 1
        raise HandoffError(504, "decode server decode-0 went silent for 5 s", "decode_timeout")
    assert inflight.label("decode-0", "watchdog.stall_detected", "stall", "abort") == 0
    request.finish(200, ["decode_retry"], ["decode-0", "decode-1"], None)
    found = _by_name(spans)
    (root,) = found["POST /v1/completions"]
    (span,) = found["decode"]
    assert span.parent.span_id == root.context.span_id
    assert params[wire.TRACE].split("-")[2] == format(span.context.span_id, "016x")
    (failed,) = span.events
    assert (failed.attributes["watchdog.cause"], failed.attributes["watchdog.action"]) == (
        "stall",
        "next rung",
    )
    assert [e.name for e in root.events] == ["watchdog.stall_detected"]
    assert root.attributes["watchdog.recovery"] == "decode_retry"
    assert "watchdog.prompt" not in root.attributes  # text only when enabled
