"""The restart action on real vLLM: a stalled decode server is restarted by the
supervisor once its incident is written, and only up to the restart limit."""

from __future__ import annotations

import os
import signal
import threading
import time

import pytest

from .conftest import (
    base_env,
    events,
    held_in_flight,
    requires_vllm,
    start_service,
    stop_service,
    wait_running,
)
from .test_engine_stalls import (
    complete,
    new_stalls,
    pids,
    text_of,
    wait_incident,
    wait_progressing,
)

pytestmark = [pytest.mark.vllm, requires_vllm]


@pytest.fixture(scope="module")
def restarting(tmp_path_factory):
    env = base_env(
        WATCHDOG_KV_STALL_ACTION="restart",
        WATCHDOG_KV_RESTART_LIMIT="1",
        WATCHDOG_KV_FAULT="slow_step:0.02",  # holds the request in flight (held_in_flight)
    )
    svc = start_service(tmp_path_factory.mktemp("restart-run"), env)
    yield svc
    if svc.proc.poll() is None:  # the test ends with the service gone (no decode left)
        for pid in pids(svc, "decode-0", "engine_core"):
            os.kill(pid, signal.SIGCONT)
    stop_service(svc)


def stop_engine_mid_request(svc, prompt: str) -> tuple[int, dict]:
    """SIGSTOP the decode engine core while it decodes (its steps slowed, so the request
    is still decoding whatever the host's speed); returns the request's answer."""
    (engine,) = pids(svc, "decode-0", "engine_core")
    result: dict = {}
    thread = threading.Thread(
        target=lambda: result.update(
            answer=complete(svc.url, prompt, timeout=120, max_tokens=400, ignore_eos=True)
        )
    )
    with held_in_flight(svc, "decode-0"):
        thread.start()
        wait_running(svc, "decode-0")
        os.kill(engine, signal.SIGSTOP)
    thread.join(timeout=60)
    assert not thread.is_alive(), "the request hung"
    code, body, _ = result["answer"]
    return code, body


def server_state(svc) -> dict:
    return svc.status()["servers"]["decode-0"]


def test_stalled_server_is_restarted_then_given_up_on_at_the_limit(restarting):
    svc = restarting
    prompt = "Restart: the decode engine is stopped and the server restarted."
    reference = text_of(complete(svc.url, prompt)[1])
    old_pid = server_state(svc)["pid"]

    code, body = stop_engine_mid_request(svc, prompt)
    assert code == 503 and "decode-0 engine_core" in body["error"]["message"], body
    (stall, *_) = new_stalls(svc, 0, lambda s: s["server"] == "decode-0")
    wait_incident(svc, stall)  # the evidence is written before the restart destroys it
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        state = server_state(svc)
        if state["state"] == "ready" and state["pid"] != old_pid:
            break
        time.sleep(1)
    else:
        pytest.fail(f"decode-0 was not restarted: {server_state(svc)}")
    assert len(state["restarts"]) == 1 and state["restarts"][0]["cause"].startswith("stall:")
    code, body, _ = complete(svc.url, prompt)
    assert code == 200 and text_of(body) == reference
    wait_progressing(svc, "decode-0")

    # a second stall: the limit (1) is reached; the server is reported failed, not
    # restarted, and with no decode left the service ends with a non-zero code
    code, body = stop_engine_mid_request(svc, prompt)
    assert code == 503, body
    assert svc.proc.wait(timeout=120) == 1
    log = events(svc.stderr_path.read_text())
    limit = [e for e in log if e["event"] == "server.restart_limit_reached"]
    assert (
        limit and limit[0]["server"] == "decode-0" and "restart limit reached" in limit[0]["reason"]
    )
    assert limit[0]["causes"][0].startswith("stall:")
    (failed,) = [e for e in log if e["event"] == "service.failed"]
    assert failed["servers"]["decode-0"]["reason"] == limit[0]["reason"]
    # nothing else was restarted on the way (no false stall of a healthy server)
    assert {e["server"] for e in log if e["event"] == "server.restarting"} == {"decode-0"}
