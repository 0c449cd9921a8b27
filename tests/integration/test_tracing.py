"""Traces on a real trace backend: one trace per request across processes, failures labelled.

Jaeger cannot be installed on this machine (no Debian, PyPI or npm build; no
Docker), so the spans go to Arize Phoenix, a trace backend from PyPI that takes
OTLP over gRPC and over HTTP, stores the spans and answers queries for them
(``GET /v1/projects/default/spans?trace_id=...``). Phoenix's dependencies clash
with vLLM's, so ``nox -s tests`` installs it into a virtual environment of its own
and names its ``phoenix`` command in ``TEST_PHOENIX_COMMAND``; without it these
tests skip and say so.

One Phoenix for the module, and one traced prefill/decode service per OTLP
protocol (gRPC, then HTTP). The client sends its own ``traceparent``, so each test
knows its trace id and that the router's root span hangs under the client's span.
The gRPC service records prompt and output text (``WATCHDOG_KV_TRACE_TEXT``), the
HTTP one does not (the default), and both are checked.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import time
import urllib.error
import urllib.request
import uuid
from collections import Counter
from dataclasses import dataclass
from pathlib import Path

import pytest

from watchdog_kv.supervisor.ports import free_port as free_port_on

from .conftest import (
    Service,
    base_env,
    http_json,
    requires_vllm,
    start_service,
    stop_service,
    wait_healthy,
)
from .test_engine_stalls import wait_progressing

pytestmark = [pytest.mark.vllm, requires_vllm]

MODEL = "watchdog-kv-tiny"
PHOENIX = os.environ.get("TEST_PHOENIX_COMMAND", "")
PREFILL_TIMEOUT_S = 8  # the router's prefill call timeout in the traced services
SPANS_DEADLINE_S = 60  # for every expected span to be exported and stored
ROOT = "POST /v1/completions"


# --- the trace backend --------------------------------------------------------------------


@dataclass
class Phoenix:
    proc: subprocess.Popen
    http_port: int
    grpc_port: int

    def spans(self, trace_id: str) -> list[dict]:
        url = (
            f"http://127.0.0.1:{self.http_port}/v1/projects/default/spans"
            f"?trace_id={trace_id}&limit=1000"
        )
        code, body = http_json(url)
        assert code == 200, body
        return [s for s in body["data"] if s["context"]["trace_id"] == trace_id]

    def trace(self, trace_id: str, needed: dict[str, int]) -> Trace:
        """The trace once it holds at least ``needed`` spans of each name."""
        deadline = time.monotonic() + SPANS_DEADLINE_S
        while True:
            spans = self.spans(trace_id)
            have = Counter(s["name"] for s in spans)
            if all(have[name] >= n for name, n in needed.items()):
                return Trace(spans)
            if time.monotonic() > deadline:
                pytest.fail(
                    f"trace {trace_id} incomplete after {SPANS_DEADLINE_S} s: "
                    f"have {dict(have)}, need {needed}"
                )
            time.sleep(0.5)


class Trace:
    def __init__(self, spans: list[dict]) -> None:
        self.spans = spans

    def named(self, name: str, parent: dict | None = None) -> list[dict]:
        return [
            s
            for s in self.spans
            if s["name"] == name
            and (parent is None or s.get("parent_id") == parent["context"]["span_id"])
        ]

    def one(self, name: str, parent: dict | None = None) -> dict:
        found = self.named(name, parent)
        assert len(found) == 1, f"{len(found)} {name!r} spans under {_name(parent)}: {self}"
        return found[0]

    def children(self, span: dict) -> list[str]:
        return sorted(s["name"] for s in self.spans if s.get("parent_id") == _id(span))

    def __str__(self) -> str:
        return "\n".join(
            f"  {s['name']} id={_id(s)} parent={s.get('parent_id')} {s['status_code']}"
            for s in self.spans
        )


def _id(span: dict) -> str:
    return span["context"]["span_id"]


def _name(span: dict | None) -> str:
    return "the trace" if span is None else f"{span['name']} ({_id(span)})"


def _events(span: dict) -> list[tuple[str, str, str]]:
    return [
        (e["name"], e["attributes"].get("watchdog.cause"), e["attributes"].get("watchdog.action"))
        for e in span["events"]
    ]


@pytest.fixture(scope="module")
def phoenix(tmp_path_factory):
    if not PHOENIX or not Path(PHOENIX).exists():
        pytest.skip(
            "no trace backend: TEST_PHOENIX_COMMAND does not name Arize Phoenix's "
            "`phoenix` command; `nox -s tests` installs it and sets it"
        )
    work = tmp_path_factory.mktemp("phoenix")
    http_port = free_port_on("127.0.0.1", set())
    grpc_port = free_port_on("127.0.0.1", {http_port})
    env = {
        **os.environ,
        "PHOENIX_WORKING_DIR": str(work),
        "PHOENIX_HOST": "127.0.0.1",
        "PHOENIX_PORT": str(http_port),
        "PHOENIX_GRPC_PORT": str(grpc_port),
        "PHOENIX_TELEMETRY_ENABLED": "false",
    }
    log = work / "phoenix.log"
    proc = subprocess.Popen(
        [PHOENIX, "serve"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=open(log, "wb"),  # noqa: SIM115 - closed when the process exits
        start_new_session=True,
    )
    try:
        wait_healthy(
            f"http://127.0.0.1:{http_port}/healthz", lambda: proc.poll() is not None, 180, log
        )
        yield Phoenix(proc, http_port, grpc_port)
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=30)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module", params=["grpc", "http/protobuf"])
def traced(request, phoenix, tmp_path_factory):
    protocol = request.param
    port = phoenix.grpc_port if protocol == "grpc" else phoenix.http_port
    env = base_env(
        OTEL_EXPORTER_OTLP_ENDPOINT=f"http://127.0.0.1:{port}",
        OTEL_EXPORTER_OTLP_PROTOCOL=protocol,
        OTEL_BSP_SCHEDULE_DELAY="500",  # ms; the SDK's default is 5 s
        WATCHDOG_KV_PREFILL_TIMEOUT=str(PREFILL_TIMEOUT_S),
    )
    if protocol == "grpc":
        env["WATCHDOG_KV_TRACE_TEXT"] = "true"
    else:
        env.pop("WATCHDOG_KV_TRACE_TEXT", None)
    run_dir = tmp_path_factory.mktemp("traced-" + protocol.split("/")[0])
    svc = start_service(run_dir, env)
    yield Traced(svc, protocol, text_recorded=protocol == "grpc")
    stop_service(svc)


@dataclass
class Traced:
    svc: Service
    protocol: str
    text_recorded: bool


# --- requests ------------------------------------------------------------------------------


def new_traceparent() -> tuple[str, str, str]:
    """(traceparent, trace id, the client's span id)."""
    trace_id, span_id = os.urandom(16).hex(), os.urandom(8).hex()
    return f"00-{trace_id}-{span_id}-01", trace_id, span_id


def complete(url: str, body: dict, traceparent: str | None = None) -> tuple[int, dict, dict]:
    """POST /v1/completions; (status, JSON body, response headers)."""
    headers = {"content-type": "application/json"}
    if traceparent:
        headers["traceparent"] = traceparent
    req = urllib.request.Request(f"{url}/v1/completions", json.dumps(body).encode(), headers)
    try:
        with urllib.request.urlopen(req, timeout=240) as resp:
            return resp.status, json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        return err.code, {"text": err.read().decode(errors="replace")}, dict(err.headers)


def ask(prompt: str, **extra) -> dict:
    return {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, **extra}


def reference(svc: Service, prompt: str) -> str:
    """The decode server computing the prompt itself (its prefix cache bypassed)."""
    decode = svc.status()["servers"]["decode-0"]["url"]
    code, body, _ = complete(decode, ask(prompt, cache_salt=uuid.uuid4().hex))
    assert code == 200, body
    return body["choices"][0]["text"]


def attribute_values(trace: Trace) -> list[str]:
    return [str(v) for s in trace.spans for v in s["attributes"].values()]


# --- the tests -----------------------------------------------------------------------------


def test_healthy_request_is_one_trace_from_router_to_kv_transfer(traced, phoenix):
    """The first request of the service: router, both servers, vLLM's spans, the KV hand-off."""
    prompt = f"A healthy traced hand-off over {traced.protocol}, told plainly."
    traceparent, trace_id, client_span = new_traceparent()
    code, body, headers = complete(traced.svc.url, ask(prompt), traceparent)
    assert code == 200, body
    assert headers["X-Watchdog-Recovery"] == "none"
    text = body["choices"][0]["text"]

    needed = {ROOT: 1, "prefill": 1, "decode": 1, "llm_request": 2, "kv.lease": 1}
    needed |= {"kv.load": 1, "kv.handshake": 1, "kv.pull": 1, "kv.lease_check": 1}
    trace = phoenix.trace(trace_id, needed)

    root = trace.one(ROOT)
    assert root["parent_id"] == client_span, "the router's span is not under the client's"
    assert root["attributes"]["watchdog.recovery"] == "none"
    assert trace.children(root) == ["decode", "prefill"]
    prefill, decode = trace.one("prefill", root), trace.one("decode", root)
    assert prefill["attributes"]["watchdog.server"] == "prefill-0"
    assert decode["attributes"]["watchdog.server"] == "decode-0"
    # vLLM's own spans (--otlp-traces-endpoint) under the router's calls
    trace.one("llm_request", prefill)
    trace.one("llm_request", decode)
    # the prefill engine kept the blocks until the decode's read was confirmed
    lease = trace.one("kv.lease", prefill)
    assert lease["attributes"]["watchdog.outcome"] == "read"
    # the decode engine's load and its phases (the first load meets the prefill)
    load = trace.one("kv.load", decode)
    assert load["attributes"]["watchdog.outcome"] == "received"
    assert trace.children(load) == ["kv.handshake", "kv.lease_check", "kv.pull"]
    bad = [s["name"] for s in trace.spans if s["status_code"] == "ERROR"]
    assert not bad, f"error spans in a healthy request: {bad}"

    if traced.text_recorded:  # WATCHDOG_KV_TRACE_TEXT=true
        assert root["attributes"]["watchdog.prompt"] == prompt
        assert root["attributes"]["watchdog.output"] == text
    else:
        values = attribute_values(trace)
        assert not [v for v in values if prompt in v or (text.strip() and text in v)], (
            "prompt or output text recorded although WATCHDOG_KV_TRACE_TEXT is off"
        )


def test_recovered_request_shows_the_whole_ladder(traced, phoenix):
    """The prefill's API server is stopped: its call times out, the decode computes the prompt."""
    prompt = f"A recovered traced request over {traced.protocol}: the prefill went silent."
    expected = reference(traced.svc, prompt)
    prefill_pid = traced.svc.status()["servers"]["prefill-0"]["pid"]
    traceparent, trace_id, client_span = new_traceparent()
    os.kill(prefill_pid, signal.SIGSTOP)
    try:
        code, body, headers = complete(traced.svc.url, ask(prompt), traceparent)
    finally:
        os.kill(prefill_pid, signal.SIGCONT)
    assert code == 200, body
    assert headers["X-Watchdog-Recovery"] == "decode_computes_prompt"
    assert body["choices"][0]["text"] == expected

    trace = phoenix.trace(trace_id, {ROOT: 1, "prefill": 1, "decode": 1, "llm_request": 1})
    root = trace.one(ROOT)
    assert root["parent_id"] == client_span
    assert root["attributes"]["watchdog.recovery"] == "decode_computes_prompt"
    assert ("watchdog.recovery", "stall", "decode_computes_prompt") in _events(root)

    prefill, decode = trace.one("prefill", root), trace.one("decode", root)
    assert prefill["status_code"] == "ERROR"
    assert ("watchdog.call_failed", "stall", "next rung") in _events(prefill)
    assert prefill["end_time"] <= decode["start_time"], "the ladder's rungs out of order"
    assert decode["status_code"] != "ERROR"
    assert decode["attributes"]["watchdog.kv"] == "computed here"
    trace.one("llm_request", decode)
    assert not trace.named("kv.load"), "a decode that computed the prompt loaded KV"


def test_kv_load_recovered_by_recompute_is_labelled_in_the_trace(traced, phoenix):
    """The prefill engine stops right after answering: the decode's load misses its deadline,
    is cancelled and recomputed; the trace says which phase failed and what was done."""
    servers = traced.svc.status()
    prefill = servers["servers"]["prefill-0"]["url"]
    decode = servers["servers"]["decode-0"]["url"]
    engine = [
        r["pid"]
        for r in servers["processes"]
        if r["server"] == "prefill-0" and r["role"] in ("engine_core", "worker")
    ]
    prompt = f"A KV load recovered by recompute over {traced.protocol}."
    expected = reference(traced.svc, prompt)
    traceparent, trace_id, client_span = new_traceparent()
    # as the router does: the traceparent in the headers and in kv_transfer_params
    traced_params = {"watchdog_kv_trace": traceparent}
    code, body, _ = complete(
        prefill,
        ask(prompt, max_tokens=1, kv_transfer_params={"do_remote_decode": True, **traced_params}),
        traceparent,
    )
    assert code == 200, body
    params = {**body["kv_transfer_params"], **traced_params}
    for pid in engine:
        os.kill(pid, signal.SIGSTOP)
    try:
        code, body, _ = complete(decode, ask(prompt, kv_transfer_params=params), traceparent)
    finally:
        for pid in engine:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGCONT)
    wait_progressing(traced.svc, "prefill-0")
    assert code == 200, body
    assert body["choices"][0]["text"] == expected

    trace = phoenix.trace(trace_id, {"kv.load": 1})
    load = trace.one("kv.load")
    assert load["parent_id"] == client_span
    assert load["attributes"]["watchdog.outcome"] == "recomputed"
    assert load["status_code"] != "ERROR", "a recovered load is not an error"
    assert ("kv.recovered", "transport", "recompute the prompt here") in _events(load)
    failed = [s for s in trace.spans if s.get("parent_id") == _id(load)]
    failed = [s for s in failed if s["status_code"] == "ERROR"]
    assert len(failed) == 1, f"expected one failed phase under the load:\n{trace}"
    assert failed[0]["attributes"]["watchdog.outcome"] == "timed_out"
    assert ("kv.deadline_missed", "transport", "cancel the load") in _events(failed[0])
