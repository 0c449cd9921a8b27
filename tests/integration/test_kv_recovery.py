"""KV-transfer failures on real prefill/decode servers: never a hang, never stale KV.

Each test makes the hand-off by hand (prefill request, then the decode request
with the prefill's ``kv_transfer_params``) so the fault can be placed between the
two, and compares the decode's answer with the decode server computing the same
prompt itself (greedy, its own prefix cache bypassed with a ``cache_salt``).

Two services: the session's shared one (default settings), and a rehearsal one
started here with fault injection (``stall_handshake:3``, well below its 10 s
KV deadline floor, so the stall alone is never taken for a hang on a loaded
machine) and a 2 s NIXL lease, which reproduces the stock hazard of
FIELD-NOTES: the decode comes after the prefill's lease ran out and reads the
released blocks.
"""

from __future__ import annotations

import calendar
import json
import os
import signal
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from watchdog_kv.monitor.evidence import process_state
from watchdog_kv.wire import LEASE as LEASE_PARAM

from .conftest import (
    base_env,
    events,
    http_json,
    kv_outcomes,
    requires_vllm,
    start_service,
    stop_service,
    wait_until,
)
from .test_engine_stalls import wait_progressing

pytestmark = [pytest.mark.vllm, requires_vllm]

MODEL = "watchdog-kv-tiny"
RECOMPUTE_ALLOWANCE_S = 30  # a local prefill of a short prompt plus decoding, on 2 busy cores
VLLM_HANDSHAKE_TIMEOUT_S = 5  # NIXL side channel's receive timeout (vLLM base_worker)
REHEARSAL_FLOOR_S = 10  # the rehearsal service's KV deadline floor
STALE_COUNT_WAIT_S = 60  # a held prefill worker is reported at 10 s; this is far past that


class Servers:
    def __init__(self, svc) -> None:
        status = svc.status()
        self.svc = svc
        servers = status["servers"]
        self.prefill = servers["prefill-0"]["url"]
        self.decode = servers["decode-0"]["url"]
        self.prefill_log = Path(servers["prefill-0"]["log"])
        self.decode_log = Path(servers["decode-0"]["log"])
        self.prefill_pid = servers["prefill-0"]["pid"]
        records = [r for r in status["processes"] if r["server"] == "prefill-0"]
        self.prefill_engine = {
            r["pid"]: r["role"] for r in records if r["role"] in ("engine_core", "worker")
        }

    @staticmethod
    def _complete(url: str, prompt: str, timeout: float, **extra) -> tuple[int, dict, float]:
        t0 = time.monotonic()
        body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0, **extra}
        code, answer = http_json(f"{url}/v1/completions", body, timeout=timeout)
        return code, answer, time.monotonic() - t0

    def prefill_params(self, prompt: str) -> dict:
        code, body, _ = self._complete(
            self.prefill,
            prompt,
            120,
            max_tokens=1,
            kv_transfer_params={"do_remote_decode": True},
        )
        assert code == 200, body
        return body["kv_transfer_params"]

    def decode_with(
        self, prompt: str, params: dict, timeout: float = 180
    ) -> tuple[int, str, float]:
        code, body, elapsed = self._complete(
            self.decode, prompt, timeout, kv_transfer_params=params
        )
        return code, body["choices"][0]["text"] if code == 200 else json.dumps(body), elapsed

    def local(self, prompt: str) -> str:
        code, body, _ = self._complete(self.decode, prompt, 180, cache_salt=uuid.uuid4().hex)
        assert code == 200, body
        return body["choices"][0]["text"]


def kv_events(log: Path, name: str, since: float) -> list[dict]:
    """watchdog_kv events called ``name`` in a server log, logged after ``since`` (epoch s)."""
    out = []
    for e in events(log.read_text()):
        if e.get("event") != name:
            continue
        stamp = calendar.timegm(time.strptime(e["timestamp"][:19], "%Y-%m-%dT%H:%M:%S"))
        if stamp >= int(since):
            out.append(e)
    return out


def report(name: str, seconds: float) -> None:
    print(f"\n[measured] {name}: {seconds:.2f} s from fault to correct answer")


# --- the shared service -------------------------------------------------------


def test_stopped_prefill_engine_is_recovered_by_recompute(service):
    """a. SIGSTOP the prefill's engine right after it answered: stock waits forever.

    Which part of the load notices the stopped prefill depends on the transport
    and on what the decode already knows (seen: the handshake or transfer
    deadline; vLLM's own handshake timeout, a transport error): any of those,
    as long as the load was watched, nothing it read was used, and the answer
    is right within the deadline plus a recompute.
    """
    s = Servers(service)
    prompt = "Recovery a: the prefill engine stops right after it answered the prefill."
    params = s.prefill_params(prompt)
    assert params.get("do_remote_prefill") and params.get(LEASE_PARAM), params
    before = kv_outcomes(service, "decode-0")
    since = time.time()
    assert sorted(s.prefill_engine.values()) == ["engine_core", "worker"], s.prefill_engine
    for pid in s.prefill_engine:
        os.kill(pid, signal.SIGSTOP)
    try:
        wait_until(
            lambda: all(process_state(pid) == "T" for pid in s.prefill_engine),
            5,
            "the prefill's engine core and worker stopped",
            detail=lambda: {pid: process_state(pid) for pid in s.prefill_engine},
        )
        code, text, elapsed = s.decode_with(prompt, params)
        still = {role: process_state(pid) for pid, role in s.prefill_engine.items()}
        assert set(still.values()) == {"T"}, f"the prefill was resumed during the decode: {still}"
        # the decode's record of how the load ended, read while the prefill is
        # still stopped: nothing it could have verified was used
        wait_until(
            lambda: sum(kv_outcomes(service, "decode-0").values()) > sum(before.values()),
            10,
            "the decode worker's record of the load",
            detail=lambda: (kv_outcomes(service, "decode-0"), tail(s.decode_log)),
        )
        after = kv_outcomes(service, "decode-0")
    finally:
        for pid in s.prefill_engine:
            os.kill(pid, signal.SIGCONT)
    # the step watchdog rightly saw the prefill stopped; let it see it move again
    wait_progressing(service, "prefill-0")
    assert code == 200, text
    assert text == s.local(prompt)
    assert after - before == Counter(recomputed=1), (before, after, tail(s.decode_log))
    recovered = kv_events(s.decode_log, "kv.recovered", since)
    assert recovered and recovered[0]["action"] == "recompute", tail(s.decode_log)
    cause = recovered[0]["cause"]
    if cause.startswith("deadline:"):
        missed = kv_events(s.decode_log, "kv.deadline_missed", since)
        assert missed and cause == f"deadline:{missed[0]['phase']}", missed
        limit = missed[0]["deadline_s"]
    else:
        assert cause == "transport", recovered
        assert kv_events(s.decode_log, "kv.transfer_broken", since), tail(s.decode_log)
        limit = VLLM_HANDSHAKE_TIMEOUT_S
    assert elapsed < limit + RECOMPUTE_ALLOWANCE_S
    print(f"\n[path] stopped prefill engine: {cause}")
    report("stopped prefill engine", elapsed)


def tail(log: Path, lines: int = 40) -> str:
    """The end of a server log (what a failed assertion shows)."""
    return "\n".join(log.read_text().splitlines()[-lines:])


BAD_PARAMS = {
    "block ids out of range": lambda p: {**p, "remote_block_ids": [[10**6]]},
    "block ids not a list": lambda p: {**p, "remote_block_ids": "nonsense"},
    "block id beyond int32": lambda p: {**p, "remote_block_ids": [[2**40]]},
    "unreachable port": lambda p: {**p, "remote_port": 1, "remote_engine_id": str(uuid.uuid4())},
    "unknown engine id": lambda p: {**p, "remote_engine_id": str(uuid.uuid4())},
    "no host": lambda p: {k: v for k, v in p.items() if k != "remote_host"},
    "lease server unreachable": lambda p: {**p, "watchdog_kv_lease": ["tcp://127.0.0.1:1"]},
}


@pytest.mark.parametrize("case", list(BAD_PARAMS))
def test_malformed_transfer_params_give_the_right_answer_not_a_hang(service, case):
    """d. Bad kv_transfer_params: the prompt is recomputed (or refused), within the deadline."""
    s = Servers(service)
    prompt = f"Recovery d: {case}."
    good = s.prefill_params(prompt)
    code, text, elapsed = s.decode_with(prompt, BAD_PARAMS[case](good), timeout=120)
    local = s.local(prompt)
    if not 400 <= code < 500:  # a client error would also be a bounded outcome
        assert code == 200, f"{case}: {text}"
        assert text == local
        floor = 5.0  # the shared service runs with the default deadline floor
        assert elapsed < 2 * floor + RECOMPUTE_ALLOWANCE_S
    assert http_json(f"{s.decode}/health")[0] == 200, "the decode server did not survive"
    # The well-formed parameters still work afterwards (a replay after a read is
    # refused by the lease check and recomputed: the same answer either way). This
    # also ends the prefill's lease, which would otherwise keep its engine stepping
    # -- a full core on this machine -- until it runs out.
    code, text, _ = s.decode_with(prompt, good, timeout=120)
    assert code == 200 and text == local


# --- the rehearsal service ------------------------------------------------------


@pytest.fixture(scope="module")
def rehearsal(tmp_path_factory):
    env = base_env(
        WATCHDOG_KV_FAULT="stall_handshake:3",
        WATCHDOG_KV_KV_DEADLINE_FLOOR=str(REHEARSAL_FLOOR_S),
    )
    svc = start_service(tmp_path_factory.mktemp("rehearsal"), env, "--kv-lease", "2")
    # Warm both engines with plain generations (no hand-off, so no handshake yet):
    # the first multi-token step of a fresh server took over 20 s here once, and a
    # prefill stuck in a step cannot reap its expired leases.
    s = Servers(svc)
    for url in (s.prefill, s.decode):
        for _ in range(2):
            code, body, _ = s._complete(url, "Warm-up generation.", 300, max_tokens=32)
            assert code == 200, body
    yield svc
    stop_service(svc)


def test_read_after_the_lease_expired_is_never_used(rehearsal):
    """c. The decode comes late: the prefill's 2 s lease has run out and the blocks are free."""
    s = Servers(rehearsal)
    prompt = "Recovery c: the decode is late and the prefill lease has already run out."
    params = s.prefill_params(prompt)
    remote = params["remote_request_id"]
    assert params.get("watchdog_kv_lease"), "the prefill did not advertise its lease check"
    since = time.time()
    # Other traffic keeps the prefill engine stepping: vLLM reaps expired leases only
    # between engine steps, and an idle prefill would keep the blocks (a valid read).
    busy = threading.Event()

    def other_traffic() -> None:
        while not busy.is_set():
            s._complete(s.prefill, "Other traffic on the prefill.", 60, max_tokens=32)

    traffic = threading.Thread(target=other_traffic, daemon=True)
    traffic.start()
    try:
        # The decode is held up until the prefill has released the blocks (stock
        # NIXL then lets it read them anyway), and its handshake is stalled besides.
        deadline = time.monotonic() + 60
        while not [
            e
            for e in kv_events(s.prefill_log, "kv.lease_expired", since)
            if e["request_id"] == remote
        ]:
            assert time.monotonic() < deadline, "the prefill did not release the lease in 60 s"
            time.sleep(0.2)
        code, text, elapsed = s.decode_with(prompt, params)
    finally:
        busy.set()
        traffic.join(timeout=120)
    assert code == 200, text
    assert text == s.local(prompt)
    # The prefill released the blocks on lease expiry (vLLM says so too)...
    assert [
        e for e in kv_events(s.prefill_log, "kv.lease_expired", since) if e["request_id"] == remote
    ]
    assert f"Releasing expired KV blocks for request {remote}" in s.prefill_log.read_text()
    # ...the decode read them anyway (stock would use them), asked, and did not use
    # them: the prefill answered "stale", or -- when the prefill's worker was itself
    # held up inside one step past the check's deadline (its step answers only
    # between steps, and its lease server's thread needs the GIL the step holds) --
    # no answer came, which fails closed the same.
    refused = [
        e
        for e in kv_events(s.decode_log, "kv.stale_kv_refused", since)
        if e["remote_request_id"] == remote
    ]
    seen = [
        {k: e.get(k) for k in ("event", "phase", "cause", "verdict", "elapsed_s", "deadline_s")}
        for e in events(s.decode_log.read_text())
        if str(e.get("event", "")).startswith("kv.")
    ]
    recovered = kv_events(s.decode_log, "kv.recovered", since)
    assert recovered, f"the decode used the KV it read; its KV events: {seen}"
    cause = recovered[0]["cause"]
    assert cause in ("lease:stale", "deadline:verify"), f"the decode's KV events: {seen}"
    if cause == "lease:stale":
        assert refused and refused[0]["verdict"] == "stale", f"the decode's KV events: {seen}"
    # The late read is also counted on the prefill side, when its worker's step next
    # polls NIXL for the decode's notification: seconds later if that worker is held
    # in a step (seen in CI: the prefill worker stuck in one step for over 10 s right
    # at this first hand-off, which its watchdog reported as a stall).
    wait_until(
        lambda: kv_events(s.prefill_log, "kv.stale_read_detected", since),
        STALE_COUNT_WAIT_S,
        "the prefill counting the late read",
        poll_s=0.5,
        detail=lambda: f"prefill stalls {prefill_stalls(rehearsal, since)}",
    )
    stalls = prefill_stalls(rehearsal, since)
    report(f"read after lease expiry (refused: {cause}; prefill stalls: {stalls})", elapsed)


def prefill_stalls(svc, since: float) -> list[str]:
    """What the supervisor's monitor said about prefill-0 stalls since ``since``."""
    return [
        st["message"]
        for st in svc.status()["stalls"]
        if st["server"] == "prefill-0" and st["detected_wall"] >= since
    ]


def test_killed_prefill_is_recovered_by_recompute(rehearsal):
    """b. kill -9 of the whole prefill server after it answered."""
    # Start from a prefill that steps: one held in a step by the test before is
    # refused with 503 (server_stalled) by design, which is not what this test is about.
    wait_progressing(rehearsal, "prefill-0")
    s = Servers(rehearsal)
    prompt = "Recovery b: the prefill server is killed after it answered the prefill."
    params = s.prefill_params(prompt)
    since = time.time()
    os.killpg(os.getpgid(s.prefill_pid), signal.SIGKILL)
    code, text, elapsed = s.decode_with(prompt, params)
    assert code == 200, text
    assert text == s.local(prompt)
    recovered = kv_events(s.decode_log, "kv.recovered", since)
    assert recovered and recovered[0]["action"] == "recompute"
    assert elapsed < REHEARSAL_FLOOR_S + 1 + RECOMPUTE_ALLOWANCE_S
    report("killed prefill", elapsed)
    # The supervisor saw the prefill go, restarts it and keeps the decode serving.
    deadline = time.monotonic() + 30
    while not rehearsal.status()["servers"]["prefill-0"]["restarts"]:
        assert time.monotonic() < deadline, "the supervisor did not notice the prefill exit"
        time.sleep(0.5)
    code, health = http_json(f"{rehearsal.url}/health")
    assert code == 200 and health["status"] == "degraded", health
    assert rehearsal.proc.poll() is None
