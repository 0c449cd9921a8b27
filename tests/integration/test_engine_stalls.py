"""Engine step stalls on real vLLM: detected from outside, named to the frame, acted on.

* a worker's model step blocked in C with the GIL held (the ``stall_step``
  fault: libc ``usleep`` through ``ctypes.PyDLL``, which keeps the GIL);
* the FIELD-NOTES heartbeat stall: NIXL's notification send, called from
  ``_send_heartbeats`` in ``start_load_kv``, blocked the same way
  (``stall_notif``) -- the report must name the NIXL notification send;
* a decode engine core stopped with SIGSTOP while it has a request;
* a data-parallel server (two engine ranks) with one rank stopped.

In every case vLLM's own ``/health`` tells the truth with the plugin (503 naming
the stall while no rank of the server can serve; 200 while another rank can),
and the router's ``/watchdog/health`` says the server is not progressing. The
requests caught in the stall are moved to a healthy rank when there is one
(answered as if nothing happened, also for clients that talk to vLLM directly);
otherwise they get a 503 naming it within the deadline instead of hanging.
After the stall the server answers correctly again.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import threading
import time
from pathlib import Path

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
    wait_running,
)

pytestmark = [pytest.mark.vllm, requires_vllm]

MODEL = "watchdog-kv-tiny"
STEP_FLOOR_S = 10.0  # the default step and connector-call deadline before anything is learned
STALL_S = 20  # how long the armed faults block (WATCHDOG_KV_FAULT in conftest's service)
DETECTION_SLACK_S = 3.0  # monitor interval, beacon reads and a busy 2-core machine


def complete(url: str, prompt: str, timeout: float = 120, **extra) -> tuple[int, dict, float]:
    t0 = time.monotonic()
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 8, "temperature": 0, **extra}
    code, answer = http_json(f"{url}/v1/completions", body, timeout=timeout)
    return code, answer, time.monotonic() - t0


def text_of(answer: dict) -> str:
    return answer["choices"][0]["text"]


def pids(svc, server: str, role: str) -> list[int]:
    return [
        r["pid"]
        for r in svc.status()["processes"]
        if r["server"] == server and r["role"] == role and r["alive"]
    ]


def wait_progressing(svc, server: str, timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        code, body = http_json(f"{svc.url}/watchdog/health?probe=progress")
        if code == 200:
            return
        time.sleep(0.5)
    pytest.fail(f"{server} still not progressing after {timeout} s: {body}")


def health_soon(svc, query: str = "", timeout: float = 5) -> tuple[int, dict]:
    """``/watchdog/health`` once it reports a failing check (or after ``timeout``).

    The client's 503 comes from the API server's guard, which reads the beacons
    on its own clock; the supervisor's monitor may see the stall a moment later.
    """
    deadline = time.monotonic() + timeout
    while True:
        code, body = http_json(f"{svc.url}/watchdog/health{query}")
        if code != 200 or time.monotonic() > deadline:
            return code, body
        time.sleep(0.1)


def new_stalls(svc, before: int, want=lambda s: True, timeout: float = 5) -> list[dict]:
    """Stalls the supervisor's monitor reported after the first ``before`` ones.

    The API server's guard and the supervisor's monitor read the same beacons on
    their own clocks, so the client's 503 may come a moment before the monitor's
    record: wait for it briefly.
    """
    deadline = time.monotonic() + timeout
    while True:
        found = [s for s in svc.status()["stalls"][before:] if want(s)]
        if found or time.monotonic() > deadline:
            return found
        time.sleep(0.2)


def run_report(path: Path) -> str:
    done = subprocess.run(
        cli("report", str(path)), capture_output=True, text=True, timeout=60, check=False
    )
    assert done.returncode == 0, done.stderr
    return done.stdout


def wait_incident(svc, stall: dict, timeout: float = 60) -> Path:
    """The incident directory the monitor wrote for ``stall`` (or for its server episode)."""
    dumps = svc.run_dir / "dumps"
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        for path in sorted(dumps.glob("*/incident.json")):
            head = json.loads(path.read_text()).get("stall")
            if (
                head is not None
                and head["server"] == stall["server"]
                and head["detected_wall"] >= stall["detected_wall"] - 1
            ):
                return path.parent
        time.sleep(0.5)
    pytest.fail(f"no incident written for {stall['message']}")


def stock_health(svc, server: str) -> tuple[int, dict]:
    """vLLM's own ``/health`` of ``server`` (with the plugin's guard in its API server)."""
    url = svc.status()["servers"][server]["url"]
    return http_json(f"{url}/health", timeout=10)


def report(name: str, seconds: float) -> None:
    print(
        f"\n[measured] {name} (deadline {STEP_FLOOR_S:g} s): "
        f"detected {seconds:.2f} s after the stall began"
    )


# --- the shared prefill/decode service ------------------------------------------------


def test_worker_step_holding_the_gil_is_detected_and_named(service):
    reference = text_of(complete(service.url, "Stall one: a worker step holds the GIL.")[1])
    before = len(service.status()["stalls"])
    worker = pids(service, "decode-0", "worker")
    faults.arm(service.run_dir, "decode-0", "stall_step")
    code, body, elapsed = complete(service.url, "Stall one: a worker step holds the GIL.")
    # the request is failed fast with a clear error, not left hanging for STALL_S
    assert code == 503, body
    assert "stalled" in body["error"]["message"] and "decode-0" in body["error"]["message"]
    assert elapsed < STEP_FLOOR_S + DETECTION_SLACK_S
    # vLLM's own health says what is wrong (without the plugin: 200 throughout)
    code, body = stock_health(service, "decode-0")
    assert code == 503 and "every engine rank is stalled" in body["error"]["message"], body
    code, health = health_soon(service)
    assert code == 503 and health["failing"] == {"decode-0": ["progressing"]}
    assert health["servers"]["decode-0"]["live"] and health["servers"]["decode-0"]["ready"]
    stalls = new_stalls(service, before)
    assert stalls and all(s["server"] == "decode-0" for s in stalls)
    latency = min(s["detected_after_s"] for s in stalls)
    assert STEP_FLOOR_S <= latency < STEP_FLOOR_S + DETECTION_SLACK_S
    report("GIL held in a worker step", latency)

    text = run_report(wait_incident(service, stalls[0]))
    assert f"culprit: pid {worker[0]} (VllmWorker-0), role worker, rank 0, server decode-0" in text
    assert "holding the GIL" in text
    assert "phase:   step (Worker.execute_model)" in text
    assert "fault injected by watchdog_kv: hold_gil" in text
    assert "sleep (libc" in text  # the native frames under the Python ones

    wait_progressing(service, "decode-0", timeout=STALL_S + 60)
    code, body, _ = complete(service.url, "Stall one: a worker step holds the GIL.")
    assert code == 200 and text_of(body) == reference


def test_heartbeat_stall_is_named_to_the_nixl_notification_send(service):
    """FIELD-NOTES: the decode worker sat ~30 s in nixl_agent.send_notif, called from
    _send_heartbeats in start_load_kv, while /health said 200."""
    before = len(service.status()["stalls"])
    armed = faults.arm(service.run_dir, "decode-0", "stall_notif")
    # vLLM sends a heartbeat at most every lease/6 (5 s): retry until one fired the fault
    for attempt in range(4):
        code, body, _ = complete(service.url, f"Stall two: heartbeat {attempt}.")
        answered_at = time.time()
        if not armed.exists():
            break
        assert code == 200, body
        time.sleep(5.5)
    assert not armed.exists(), "no heartbeat was sent in four hand-offs"
    assert code == 503, body
    assert "start_load_kv" in body["error"]["message"]
    code, health = stock_health(service, "decode-0")
    assert code == 503 and "start_load_kv" in health["error"]["message"], health
    stalls = new_stalls(service, before)
    connector = new_stalls(service, before, lambda s: s["phase"] == "connector")
    assert connector and connector[0]["what"] == "start_load_kv"
    # the request was answered soon after the stall began (not when it ended, 20 s in);
    # measured from the stall's start, not the request's: the hand-off before the
    # heartbeat fired takes a varying while on a busy machine
    stall = connector[0]  # detected_after_s leaves out the time it waited for a CPU
    began = stall["detected_wall"] - stall["detected_after_s"] - stall.get("starved_s", 0.0)
    assert answered_at - began < STEP_FLOOR_S + DETECTION_SLACK_S
    report("heartbeat send in start_load_kv", connector[0]["detected_after_s"])

    text = run_report(wait_incident(service, stalls[0]))
    assert "phase:   connector (start_load_kv)" in text
    assert "frame:   nixl_agent.send_notif (_api.py:" in text
    assert "called from NixlBaseConnectorWorker._send_heartbeats" in text
    assert "holding the GIL" in text
    wait_progressing(service, "decode-0", timeout=STALL_S + 60)


def test_stopped_decode_engine_is_detected_and_its_request_failed_fast(service):
    prompt = "Stall three: the decode engine core is stopped mid-request."
    reference = text_of(complete(service.url, prompt, max_tokens=64, ignore_eos=True)[1])
    before = len(service.status()["stalls"])
    (engine,) = pids(service, "decode-0", "engine_core")
    result: dict = {}

    def long_request() -> None:
        result["answer"] = complete(
            service.url, prompt, timeout=120, max_tokens=400, ignore_eos=True
        )

    with held_in_flight(service, "decode-0"):  # 400 slow steps: decoding for 8 s at least
        thread = threading.Thread(target=long_request)
        thread.start()
        wait_running(service, "decode-0")
        stopped_at = time.time()
        os.kill(engine, signal.SIGSTOP)
    try:
        thread.join(timeout=STEP_FLOOR_S + 20)
        assert not thread.is_alive(), "the request hung with its engine stopped"
        code, body, _ = result["answer"]
        assert code == 503 and "stalled" in body["error"]["message"], body
        code, body = stock_health(service, "decode-0")
        assert code == 503 and "every engine rank is stalled" in body["error"]["message"], body
        assert f"pid {engine}" in body["error"]["message"], body
        code, health = health_soon(service, "?probe=progress")
        assert code == 503 and "decode-0" in health["failing"]
        stalls = new_stalls(service, before, lambda s: s["pid"] == engine)
        assert stalls, "the stopped engine core was not reported"
        latency = stalls[0]["detected_wall"] - stopped_at
        assert latency < STEP_FLOOR_S + DETECTION_SLACK_S
        report("decode engine core stopped", latency)
        # new requests are refused at once while it is stalled, not sent into it
        code, body, elapsed = complete(service.url, prompt)
        assert code == 503 and elapsed < 2, body
        text = run_report(wait_incident(service, stalls[0]))
        assert f"culprit: pid {engine} (EngineCore), role engine_core" in text
        assert "state stopped (SIGSTOP or a debugger)" in text
    finally:
        os.kill(engine, signal.SIGCONT)
    wait_progressing(service, "decode-0")
    code, body, _ = complete(service.url, prompt, max_tokens=64, ignore_eos=True)
    assert code == 200 and text_of(body) == reference


# --- data parallel: one server, two engine ranks ------------------------------------------


@pytest.fixture(scope="module")
def dp(tmp_path_factory):
    svc = start_service(tmp_path_factory.mktemp("dp-run"), base_env(), "--data-parallel-size", "2")
    yield svc
    stop_service(svc)


def test_data_parallel_stalled_rank_is_named_and_its_requests_served_by_the_other(dp):
    """Rank 1 stopped: the requests vLLM's balancer gave it are moved to rank 0 once
    the stall is seen, inside the API server -- so a client that talks to vLLM
    directly, not through the router, gets its answer too -- and new ones avoid it;
    vLLM's ``/health`` stays 200 (rank 0 serves) and the router's ``ready`` too."""
    prompt = "Data parallel: rank one is stopped."
    reference = text_of(complete(dp.url, prompt)[1])
    vllm_url = dp.status()["servers"]["dp-0"]["url"]
    engines = {
        r["rank"]: r["pid"]
        for r in dp.status()["processes"]
        if r["role"] == "engine_core" and r["alive"]
    }
    assert sorted(engines) == [0, 1]
    os.kill(engines[1], signal.SIGSTOP)
    stopped_at = time.time()
    answers: list[tuple[int, dict, float]] = []
    try:
        workers = [
            threading.Thread(target=lambda i=i: answers.append(complete(vllm_url, prompt)))
            for i in range(6)
        ]
        for w in workers:
            w.start()
            time.sleep(0.2)
        for w in workers:
            w.join(timeout=STEP_FLOOR_S + 30)
        assert len(answers) == 6, "a request hung"
        assert all(code == 200 for code, _, _ in answers), [a[:2] for a in answers]
        assert all(text_of(body) == reference for _, body, _ in answers)
        assert max(elapsed for _, _, elapsed in answers) < STEP_FLOOR_S + DETECTION_SLACK_S + 2
        log = Path(dp.status()["servers"]["dp-0"]["log"]).read_text()
        moved = [e for e in events(log) if e.get("event") == "step.request_moved"]
        assert moved and all(e["from_rank"] == 1 and e["to_rank"] == 0 for e in moved), moved
        assert stock_health(dp, "dp-0")[0] == 200  # rank 0 serves
        stalls = new_stalls(dp, 0)
        assert stalls and stalls[0]["rank"] == 1 and stalls[0]["pid"] == engines[1]
        code, health = http_json(f"{dp.url}/watchdog/health")  # the monitor has seen it
        assert code == 200 and health["ready"] and not health["healthy"], health
        assert health["servers"]["dp-0"]["serving"] and health["failing"] == {
            "dp-0": ["progressing"]
        }
        report("data-parallel rank stopped", stalls[0]["detected_wall"] - stopped_at)
        # while rank 1 stays stopped, every new request is served by rank 0
        for url in (vllm_url, dp.url, dp.url, dp.url):
            code, body, _ = complete(url, prompt)
            assert code == 200 and text_of(body) == reference
        text = run_report(wait_incident(dp, stalls[0]))
        assert f"culprit: pid {engines[1]} (EngineCore_DP1), role engine_core, rank 1" in text
        assert "called from EngineCoreProc._process_input_queue" in text
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.kill(engines[1], signal.SIGCONT)
    wait_progressing(dp, "dp-0")
