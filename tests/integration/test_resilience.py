"""Nothing lost when a vLLM server dies: kill -9 and native crashes on real vLLM servers.

One supervised service with one prefill and two decode servers (module scope).
The killed servers are restarted by the supervisor; a prefill that keeps
crashing on start (the ``crash_start`` rehearsal fault) is given up on at the
restart limit with a report, while the service goes on answering. A worker
that dies of SIGILL in its model step (``crash_step``, the way vLLM's AMX
kernel dies without tile permission) is a crash: the request is answered by
another (or the restarted) decode and never sent to the dead engine again, the
crash incident names the signal and the frame, and a server that crashes the
same way twice in a row is marked failed with that diagnosis. Decodes killed
mid-answer, for every request kind: tests/integration/test_continuation.py.

The decodes' steps are slowed (``slow_step``, :func:`held_in_flight`) wherever a
test must act while a request is still being decoded, so none of this depends
on the host being slow.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import threading
import time
import urllib.error
import urllib.request

import pytest

from watchdog_kv import faults

from .conftest import (
    base_env,
    cli,
    events,
    held_in_flight,
    http_json,
    requires_vllm,
    start_service,
    stop_service,
)

pytestmark = [pytest.mark.vllm, requires_vllm]

RESTART_LIMIT = 3  # the prefill uses one on the way (killed), two crash in a row
MODEL = "watchdog-kv-tiny"
DECODES = ("decode-0", "decode-1")
# where crash_step's SIGILL lands: the frame of vLLM that runs the worker's model step
CRASH = "SIGILL in vllm/v1/worker/worker_base.py:execute_model"


@pytest.fixture(scope="module")
def resilient(tmp_path_factory):
    env = base_env(
        WATCHDOG_KV_RESTART_LIMIT=str(RESTART_LIMIT),
        WATCHDOG_KV_RESTART_BACKOFF="0.5",
        WATCHDOG_KV_FAULT="crash_start,crash_step,slow_step:0.02",
    )
    svc = start_service(tmp_path_factory.mktemp("resilience-run"), env, "--decode", "2")
    yield svc
    stop_service(svc)


def stream(url: str, path: str, body: dict, on_event=None) -> tuple[list[dict], dict]:
    """POST a streamed request; (the events' JSON, the response headers)."""
    req = urllib.request.Request(
        url + path, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    out: list[dict] = []
    with urllib.request.urlopen(req, timeout=400) as resp:
        headers = dict(resp.headers)
        for line in resp:
            line = line.strip()
            if not line.startswith(b"data:"):
                continue
            data = line[5:].strip()
            if data == b"[DONE]":
                out.append({"done": True})
                continue
            out.append(json.loads(data))
            if on_event is not None:
                on_event(len(out), headers)
    return out, headers


def text_of(events_: list[dict], chat: bool) -> str:
    parts = []
    for e in events_:
        for c in e.get("choices") or []:
            parts.append(((c.get("delta") or {}).get("content") or "") if chat else c["text"])
    return "".join(parts)


def long_request(chat: bool) -> tuple[str, dict]:
    common = {"model": MODEL, "max_tokens": 300, "temperature": 0, "ignore_eos": True}
    if chat:
        return "/v1/chat/completions", {
            **common,
            "messages": [{"role": "user", "content": "Tell the long story of a hung request."}],
            "stream": True,
            "stream_options": {"include_usage": True},
        }
    return "/v1/completions", {**common, "prompt": "Once upon a time a decode", "stream": True}


def server(svc, name: str) -> dict:
    return svc.status()["servers"][name]


def wait_state(svc, name: str, check, timeout_s: float) -> dict:
    deadline = time.monotonic() + timeout_s
    while True:
        state = server(svc, name)
        if check(state):
            return state
        assert time.monotonic() < deadline, f"{name} never got there: {state}"
        time.sleep(1)


def kill_tree(pid: int) -> None:
    """kill -9 of a whole vLLM server (its API server's process group): the machine is gone."""
    os.killpg(os.getpgid(pid), signal.SIGKILL)


def test_prefill_killed_requests_complete_then_it_is_back(resilient):
    svc = resilient
    wait_state(svc, "prefill-0", lambda s: s["state"] == "ready", 300)
    prompts = [f"Request {i}: the prefill server dies under it." for i in range(4)]

    def ask(prompt: str, stream_: bool = False) -> tuple[int, str, dict]:
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        if stream_:
            got, headers = stream(svc.url, "/v1/completions", {**body, "stream": True})
            return 200, text_of(got, False), headers
        req = urllib.request.Request(
            svc.url + "/v1/completions",
            data=json.dumps(body).encode(),
            headers={"Content-Type": "application/json"},
        )
        try:
            with urllib.request.urlopen(req, timeout=120) as resp:
                return resp.status, json.load(resp)["choices"][0]["text"], dict(resp.headers)
        except urllib.error.HTTPError as err:
            return err.code, err.read().decode(), {}

    references = [ask(p)[1] for p in prompts]
    pid = server(svc, "prefill-0")["pid"]
    kill_tree(pid)
    for i, prompt in enumerate(prompts):
        code, text, headers = ask(prompt, stream_=i % 2 == 1)
        assert code == 200, text
        assert text == references[i]
        assert "decode_computes_prompt" in headers["X-Watchdog-Recovery"]
    code, health = http_json(f"{svc.url}/health")
    assert code == 200 and health["status"] == "degraded"
    # (on a fast host all of the above fits in one of the supervisor's 0.5 s polls)
    state = wait_state(svc, "prefill-0", lambda s: s["state"] == "ready" and s["pid"] != pid, 300)
    assert state["restarts"][-1]["cause"] == "exited with signal SIGKILL"
    code, text, headers = ask(prompts[0])
    assert (code, text, headers["X-Watchdog-Recovery"]) == (200, references[0], "none")


def test_crash_looping_server_is_given_up_on_at_the_limit(resilient):
    svc = resilient
    before = wait_state(svc, "prefill-0", lambda s: s["state"] == "ready", 300)
    attempts = RESTART_LIMIT - before["restarts_in_a_row"]  # a row: not yet stable again
    assert attempts >= 2
    faults.arm(svc.run_dir, "prefill-0", "crash_start")
    try:
        kill_tree(before["pid"])
        state = wait_state(svc, "prefill-0", lambda s: s["state"] == "failed", 240)
    finally:
        faults.disarm(svc.run_dir, "prefill-0", "crash_start")
    failure = state["failure"]
    assert failure["reason"].startswith(f"restart limit reached: {RESTART_LIMIT} restarts in a row")
    restarts = state["restarts"][len(before["restarts"]) :]
    assert len(restarts) == attempts
    assert restarts[0]["cause"] == "exited with signal SIGKILL"
    for later in restarts[1:]:  # each restart crashed on start
        assert later["cause"].startswith("restart attempt failed: vLLM server prefill-0 exited")
        assert "with code 3" in later["cause"]
    assert "with code 3" in failure["last_cause"]
    assert any("fault.crash_injected" in line for line in failure["last_log_lines"])
    log = events(svc.stderr_path.read_text())
    (limit,) = [e for e in log if e["event"] == "server.restart_limit_reached"]
    assert limit["server"] == "prefill-0" and limit["reason"] == failure["reason"]
    # the service goes on without it: the decodes compute prompts themselves
    code, health = http_json(f"{svc.url}/health")
    assert code == 200 and health["failing"]["prefill-0"] == ["live", "ready"]
    code, body = http_json(
        f"{svc.url}/v1/completions",
        {"model": MODEL, "prompt": "Still answering.", "max_tokens": 5, "temperature": 0},
    )
    assert code == 200 and body["choices"][0]["text"]


def complete(svc, prompt: str) -> tuple[int, dict, dict]:
    """A short greedy completion through the router: (status, headers, body)."""
    req = urllib.request.Request(
        svc.url + "/v1/completions",
        data=json.dumps(
            {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0}
        ).encode(),
        headers={"Content-Type": "application/json"},
    )
    try:
        with urllib.request.urlopen(req, timeout=400) as resp:
            return resp.status, dict(resp.headers), json.load(resp)
    except urllib.error.HTTPError as err:
        return err.code, dict(err.headers), json.loads(err.read() or b"{}")


def run_report(path: str) -> str:
    done = subprocess.run(cli("report", path), capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    return done.stdout


def decode_failures(svc, request_id: str) -> list[str]:
    """The servers the router saw fail this request, in order (its log)."""
    return [
        e["server"]
        for e in events(svc.stderr_path.read_text())
        if e["event"] == "request.decode_failed" and e.get("request_id") == request_id
    ]


def test_engine_crash_the_request_is_answered_and_the_crash_explained(resilient):
    svc = resilient
    for name in DECODES:
        wait_state(svc, name, lambda s: s["state"] in ("ready", "failed"), 300)
    ready = [n for n in DECODES if server(svc, n)["state"] == "ready"]
    assert ready == list(DECODES), "both decodes must be up for this test"
    prompt = "A worker dies of SIGILL under this request."
    code, _, reference = complete(svc, prompt)
    assert code == 200
    before = {name: server(svc, name) for name in DECODES}
    for name in DECODES:  # whichever decode takes it dies, then the other one too
        faults.arm(svc.run_dir, name, "crash_step")
    code, headers, answer = complete(svc, prompt)
    assert code == 200, answer
    assert answer["choices"][0]["text"] == reference["choices"][0]["text"]
    # each decode failed it once (its engine dead), then a restarted one answered
    assert headers["X-Watchdog-Recovery"].endswith("decode_retry,decode_retry"), headers
    failed = decode_failures(svc, answer["id"].removeprefix("cmpl-"))
    assert sorted(failed) == sorted(DECODES), failed  # never the same dead engine twice
    for name in DECODES:
        state = wait_state(
            svc,
            name,
            lambda s, n=name: (
                len(s["restarts"]) > len(before[n]["restarts"]) and s["state"] == "ready"
            ),
            300,
        )
        assert state["pid"] != before[name]["pid"]
        (crash,) = state["crashes"][len(before[name]["crashes"]) :]
        assert crash["summary"] == CRASH
        assert state["restarts"][-1]["cause"] == f"engine died: {crash['message']}"
        assert crash["message"].startswith(f"{name} worker rank 0 (pid ")
        text = run_report(crash["incident"])
        assert f"crash:   {crash['message']}" in text
        assert "role worker, rank 0, server " + name in text
        assert "signal:  SIGILL (from its crash record)" in text
        assert "frame:   execute_model (vllm/v1/worker/worker_base.py:" in text
        assert "note:    a rehearsal" in text
    log = events(svc.stderr_path.read_text())
    assert {e["server"] for e in log if e["event"] == "server.crashed"} >= set(DECODES)


def test_a_server_that_crashes_the_same_way_twice_is_marked_failed(resilient):
    svc = resilient
    for name in DECODES:
        wait_state(svc, name, lambda s: s["state"] == "ready", 300)
    state = server(svc, "decode-0")
    if not (state["crashes"] and state["restarts"][-1]["cause"].endswith(CRASH)):
        # decode-0's last death was not this crash (run alone): crash it once first
        armed = faults.arm(svc.run_dir, "decode-0", "crash_step")
        for i in range(6):
            assert complete(svc, f"First crash {i}.")[0] == 200
            if not armed.exists():
                break
        assert not armed.exists(), "no request reached decode-0"
        wait_state(svc, "decode-0", lambda s: s["state"] != "ready", 30)
        state = wait_state(svc, "decode-0", lambda s: s["state"] == "ready", 300)
    restarts = len(state["restarts"])
    armed = faults.arm(svc.run_dir, "decode-0", "crash_step")
    for i in range(6):  # round robin: one of the first requests lands on decode-0
        code, _, answer = complete(svc, f"The same crash again {i}.")
        assert code == 200, answer  # decode-1 answers what decode-0 could not
        if not armed.exists():
            break
    assert not armed.exists(), "no request reached decode-0"
    state = wait_state(svc, "decode-0", lambda s: s["state"] == "failed", 60)
    failure = state["failure"]
    assert failure["reason"].startswith(f"crashed twice in a row the same way: {CRASH}")
    assert failure["diagnosis"]["signal"] == "SIGILL"
    assert failure["diagnosis"]["frame"] == "vllm/v1/worker/worker_base.py:execute_model"
    assert failure["incident"] and failure["incident"] == state["crashes"][-1]["incident"]
    assert len(state["restarts"]) == restarts  # not restarted again
    log = events(svc.stderr_path.read_text())
    assert [e["server"] for e in log if e["event"] == "server.crash_loop"] == ["decode-0"]
    # the service goes on with the other decode
    code, health = http_json(f"{svc.url}/health")
    assert code == 200 and health["status"] == "degraded"
    assert complete(svc, "Still answering after the crash loop.")[0] == 200


def test_drain_finishes_in_flight_requests_and_refuses_new_ones(resilient):
    svc = resilient
    for name in DECODES:  # a decode the crash tests left failed stays failed
        wait_state(svc, name, lambda s: s["state"] in ("ready", "failed"), 300)
    path, body = long_request(chat=False)
    body["max_tokens"] = 450  # 450 slow steps: still running when SIGTERM comes
    result: dict = {}
    started = threading.Event()

    def long_stream() -> None:
        result["events"], _ = stream(
            svc.url, path, body, on_event=lambda n, _h: n == 5 and started.set()
        )

    with held_in_flight(svc, *DECODES):
        thread = threading.Thread(target=long_stream)
        thread.start()
        assert started.wait(60)
        svc.proc.send_signal(signal.SIGTERM)
        # The signal is handled asynchronously: a request sent before the router took
        # it would be in flight (and served). Wait until the router says it drains.
        deadline = time.monotonic() + 10
        while http_json(f"{svc.url}/health")[1].get("status") != "draining":
            assert time.monotonic() < deadline, "the router never started draining"
            time.sleep(0.05)
        # new requests are refused while the stream finishes
        code, answer = http_json(
            f"{svc.url}/v1/completions", {"model": MODEL, "prompt": "late", "max_tokens": 2}
        )
        assert code == 503 and answer["error"]["type"] == "service_draining", (code, answer)
        thread.join(120)
    assert not thread.is_alive()
    got = result["events"]
    assert got[-1] == {"done": True} and not any("error" in e for e in got)
    assert [c["finish_reason"] for c in got[-2]["choices"]] == ["length"]
    assert svc.proc.wait(timeout=90) == 0
    log = [e["event"] for e in events(svc.stderr_path.read_text())]
    assert (
        log.index("router.draining")
        < log.index("router.drained")
        < log.index("supervisor.stopping")
    )
