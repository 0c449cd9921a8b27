"""The supervised prefill/decode service on real vLLM servers (shared, started once).

The last test shuts the service down; keep it last in this file.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
import urllib.error
import urllib.request
from pathlib import Path

import aiohttp
import pytest

from watchdog_kv.demo import DemoRequest, compare_with_local

from .conftest import alive, events, http_json, requires_vllm

pytestmark = [pytest.mark.vllm, requires_vllm]

ROLES = {"api_server", "engine_core", "worker"}


def test_plugin_is_registered_in_every_vllm_process(service):
    status = service.status()
    records = status["processes"]
    for name, server in status["servers"].items():
        assert server["state"] == "ready"
        mine = [r for r in records if r["server"] == name]
        assert {r["role"] for r in mine} == ROLES, mine
        assert all(r["alive"] for r in mine)
        # Each record is a real process of this server's tree, with the role vLLM gave it.
        tree = service.remember_tree()
        for rec in mine:
            assert rec["pid"] in tree
        by_role = {r["role"]: r for r in mine}
        assert by_role["api_server"]["pid"] == server["pid"]
        assert by_role["engine_core"]["ppid"] == server["pid"]
        assert by_role["worker"]["ppid"] == by_role["engine_core"]["pid"]
        assert by_role["worker"]["process_name"] == "VllmWorker-0"
        # ...and each process said so in its log.
        logged = [
            e
            for e in events(Path(server["log"]).read_text())
            if e.get("event") == "watchdog_kv.registered"
        ]
        assert {(e["pid"], e["role"]) for e in logged} == {(r["pid"], r["role"]) for r in mine}


@pytest.mark.parametrize("endpoint", ["/v1/completions", "/v1/chat/completions"])
@pytest.mark.parametrize("stream", [False, True], ids=["whole", "streamed"])
def test_disaggregated_answer_equals_local_and_kv_came_over_nixl(service, endpoint, stream):
    status = service.status()
    decode_url = status["servers"]["decode-0"]["url"]
    req = DemoRequest(
        endpoint,
        stream,
        f"{endpoint} stream={stream}: the lease expires and "
        "the decode must still answer with the same tokens.",
        max_tokens=20,
    )

    async def run():
        async with aiohttp.ClientSession() as http:
            return await compare_with_local(
                http, service.url, decode_url, "watchdog-kv-tiny", req, timeout_s=240
            )

    row = asyncio.run(run())
    assert row.disagg == row.local
    assert len(row.disagg) > 0
    assert row.transfers >= 1, "the decode server's NIXL counter did not move"
    assert row.nbytes > 0


def test_malformed_request_gets_400_not_a_hang(service):
    t0 = time.monotonic()
    code, _body = http_json(f"{service.url}/v1/completions", None, timeout=10)  # GET: 405
    assert code == 405
    req = urllib.request.Request(
        f"{service.url}/v1/completions", data=b"{oops", headers={"content-type": "application/json"}
    )
    try:
        urllib.request.urlopen(req, timeout=10)
        raise AssertionError("expected HTTP 400")
    except urllib.error.HTTPError as err:
        assert err.code == 400
        assert "not valid JSON" in json.loads(err.read())["error"]["message"]
    assert time.monotonic() - t0 < 10


def test_request_vllm_rejects_is_passed_through_as_4xx(service):
    code, body = http_json(
        f"{service.url}/v1/completions",
        {"model": "watchdog-kv-tiny", "prompt": "x", "max_tokens": -5},
        timeout=60,
    )
    assert 400 <= code < 500, body
    assert "error" in body


def test_health_says_ready(service):
    code, body = http_json(f"{service.url}/health")
    assert code == 200
    assert body["servers"] == {"prefill-0": "ready", "decode-0": "ready"}


MODEL = "watchdog-kv-tiny"
# (equal lengths; a longer second): a request's answers were once another prompt's
SEVERAL = (
    ("Prompt one of two: the lease and the blocks.", "Prompt two of two: the step and the rank."),
    (
        "A short first prompt.",
        "A much longer second prompt, whose answer must be its own and never the first "
        "prompt's, whatever KV the prefill handed over for the request as a whole.",
    ),
)


def alone(url: str, prompt: str, max_tokens: int = 12) -> dict:
    """One prompt computed by itself on ``url`` (a fresh cache salt: nothing reused)."""
    code, body = http_json(
        f"{url}/v1/completions",
        {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "cache_salt": f"alone-{time.monotonic_ns()}",
        },
        timeout=120,
    )
    assert code == 200, body
    return body


def streamed_texts(url: str, body: dict) -> dict[int, str]:
    req = urllib.request.Request(
        f"{url}/v1/completions",
        data=json.dumps({**body, "stream": True}).encode(),
        headers={"content-type": "application/json"},
    )
    texts: dict[int, str] = {}
    with urllib.request.urlopen(req, timeout=240) as resp:
        for raw in resp:
            line = raw.strip()
            if not line.startswith(b"data:") or line[5:].strip() == b"[DONE]":
                continue
            event = json.loads(line[5:])
            assert "error" not in event, event
            for choice in event.get("choices") or []:
                texts[choice["index"]] = texts.get(choice["index"], "") + choice["text"]
    return texts


@pytest.mark.parametrize("prompts", SEVERAL, ids=["equal", "longer_second"])
def test_a_request_with_several_prompts_answers_each_with_its_own(service, prompts):
    decode = service.status()["servers"]["decode-0"]["url"]
    refs = [alone(decode, p) for p in prompts]
    texts = [r["choices"][0]["text"] for r in refs]
    for attempt in range(20):
        order = list(prompts) if attempt % 2 == 0 else list(reversed(prompts))
        want = texts if attempt % 2 == 0 else list(reversed(texts))
        code, body = http_json(
            f"{service.url}/v1/completions",
            {"model": MODEL, "prompt": order, "max_tokens": 12, "temperature": 0},
            timeout=240,
        )
        assert code == 200, body
        assert [c["index"] for c in body["choices"]] == [0, 1]
        assert [c["text"] for c in body["choices"]] == want, f"attempt {attempt}"
        assert body["usage"]["prompt_tokens"] == sum(r["usage"]["prompt_tokens"] for r in refs)
    streamed = streamed_texts(
        service.url, {"model": MODEL, "prompt": list(prompts), "max_tokens": 12, "temperature": 0}
    )
    assert [streamed[0], streamed[1]] == texts


def test_the_decode_refuses_kv_that_belongs_to_another_prompt(service):
    """Whatever a router does: the decode's own check. The prefill's parameters for the
    first prompt, sent with both prompts straight to the decode (what the router did
    once), pull the first prompt's KV and compute the second prompt there."""
    status = service.status()
    prefill, decode = (status["servers"][n]["url"] for n in ("prefill-0", "decode-0"))
    first, second = SEVERAL[1]
    code, prefilled = http_json(
        f"{prefill}/v1/completions",
        {
            "model": MODEL,
            "prompt": first,
            "max_tokens": 1,
            "temperature": 0,
            "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
        },
        timeout=120,
    )
    assert code == 200, prefilled
    params = prefilled["kv_transfer_params"]
    assert params["watchdog_kv_prompt"].startswith(f"{prefilled['usage']['prompt_tokens']}:")
    log = Path(status["servers"]["decode-0"]["log"])
    seen = len(log.read_text().splitlines())
    code, body = http_json(
        f"{decode}/v1/completions",
        {
            "model": MODEL,
            "prompt": [first, second],
            "max_tokens": 12,
            "temperature": 0,
            "kv_transfer_params": params,
        },
        timeout=120,
    )
    assert code == 200, body
    want = [alone(decode, p)["choices"][0]["text"] for p in (first, second)]
    assert [c["text"] for c in body["choices"]] == want
    refused = [
        e
        for e in events("\n".join(log.read_text().splitlines()[seen:]))
        if e.get("event") == "kv.bad_transfer_params"
    ]
    assert len(refused) == 1 and "another prompt" in refused[0]["problem"], refused


def test_sigterm_stops_every_process_it_started(service):
    """Runs last: SIGTERM to the supervisor leaves no process of the service running."""
    pids = service.remember_tree()
    assert len(pids) >= 7  # supervisor + 2 x (api server, engine core, worker)
    service.proc.send_signal(signal.SIGTERM)
    code = service.proc.wait(timeout=90)
    assert code == 0, service.stderr_path.read_text()[-3000:]
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(alive(p) for p in pids):
        time.sleep(0.2)
    assert [p for p in pids if alive(p)] == []
    stopped = [e["event"] for e in events(service.stderr_path.read_text())]
    assert "service.signal" in stopped and "supervisor.stopped" in stopped
