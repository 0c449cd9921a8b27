"""Every request kind continued exactly when its decode is killed mid-answer (kill -9).

One supervised service (one prefill, two decodes, module scope) whose decodes'
steps can be slowed (``slow_step``, :func:`held_in_flight`) so a request is
still being generated when the test kills its decode. Each test compares the
answer the client gets with the same request undisturbed -- text, finish reason,
usage -- for greedy completions and chat, chat without ``max_tokens``, seeded
sampling, a stop string cut by the kill, non-streamed answers (which the router
streams from the decode itself), and a kind that cannot be continued (a clear
error event). Every kill restarts a decode, so the restart limit is raised.
"""

from __future__ import annotations

import json
import os
import signal
import threading
import urllib.error
import urllib.request

import pytest

from .conftest import (
    base_env,
    held_in_flight,
    http_json,
    requires_vllm,
    start_service,
    stop_service,
    vllm_metric,
    wait_until,
)
from .test_resilience import DECODES, long_request, server, stream, text_of, wait_state

pytestmark = [pytest.mark.vllm, requires_vllm]


@pytest.fixture(scope="module")
def continued(tmp_path_factory):
    env = base_env(
        WATCHDOG_KV_RESTART_LIMIT="50",
        WATCHDOG_KV_RESTART_BACKOFF="0.5",
        WATCHDOG_KV_FAULT="slow_step:0.02",
    )
    svc = start_service(tmp_path_factory.mktemp("continuation-run"), env, "--decode", "2")
    yield svc
    stop_service(svc)


def variant(kind: str) -> tuple[str, dict, bool]:
    """A long streamed request of each kind users send: (path, body, chat)."""
    chat = kind.startswith("chat")
    path, body = long_request(chat)
    if kind == "chat-without-max-tokens":  # vLLM allows what the context has left
        body.pop("max_tokens")
    if kind == "seeded-sampling":
        body.update(temperature=0.8, top_k=40, seed=1234)
    return path, body, chat


def both_decodes_ready(svc) -> None:
    for name in DECODES:  # the previous test's kill is mended first
        wait_state(svc, name, lambda s: s["state"] == "ready", 300)


def killed_mid_stream(svc, path: str, body: dict, at: int) -> tuple[list[dict], dict, dict]:
    """Stream ``body`` and kill -9 the decode that serves it after ``at`` events:
    (the events, the response headers, what was killed)."""
    killed: dict = {}

    def kill(count: int, headers: dict) -> None:
        if count == at and not killed:
            name = headers["X-Watchdog-Decode"]
            state = server(svc, name)
            killed.update(name=name, pid=state["pid"], restarts=len(state["restarts"]))
            os.kill(killed["pid"], signal.SIGKILL)  # the decode's API server, mid-stream

    with held_in_flight(svc, *DECODES):  # slow steps: still streaming at the kill
        got, headers = stream(svc.url, path, body, on_event=kill)
    assert killed, "the stream ended before the kill"
    return got, headers, killed


def restarted(svc, killed: dict) -> None:
    """The killed decode is restarted, and says why; meanwhile the service is ready (the
    other decode answers: a load balancer keeps it) but not fully healthy."""
    state = wait_state(svc, killed["name"], lambda s: len(s["restarts"]) > killed["restarts"], 30)
    assert state["restarts"][-1]["cause"] == "exited with signal SIGKILL"
    code, health = http_json(f"{svc.url}/watchdog/health")
    if health["servers"][killed["name"]]["state"] != "ready":  # (it may be back already)
        assert code == 200 and health["ready"] and not health["healthy"], health
        assert http_json(f"{svc.url}/watchdog/health?probe=healthy")[0] == 503


def finish_reasons(events_: list[dict]) -> list:
    return [
        c["finish_reason"] for e in events_ for c in e.get("choices") or [] if c["finish_reason"]
    ]


@pytest.mark.parametrize(
    "kind", ["completions", "chat", "chat-without-max-tokens", "seeded-sampling"]
)
def test_decode_killed_mid_stream_the_stream_completes_identical(continued, kind):
    """The answer a client reads is the undisturbed one, whole: the same text, finish
    reason and usage, in one stream with one id -- with greedy decoding, with chat
    that names no max_tokens (the budget left is vLLM's own: the context), and with
    seeded sampling (the continuation replays the draws already spent)."""
    svc = continued
    both_decodes_ready(svc)
    path, body, chat = variant(kind)
    reference, _ = stream(svc.url, path, body)
    if kind == "seeded-sampling":  # a seed makes the undisturbed answer one answer
        assert text_of(stream(svc.url, path, body)[0], chat) == text_of(reference, chat)
    before = svc.status()["router"]["recoveries"].get("decode_continues_answer", 0)
    got, _, killed = killed_mid_stream(svc, path, body, at=30)
    assert text_of(got, chat) == text_of(reference, chat)
    assert len(text_of(got, chat)) > 0 and got[-1] == {"done": True}
    assert not any("error" in e for e in got)
    assert finish_reasons(got) == finish_reasons(reference) == ["length"]
    if chat:  # usage counts the whole answer, not just the continuation
        usage = [e["usage"] for e in got if e.get("usage")]
        assert usage[-1] == [e["usage"] for e in reference if e.get("usage")][-1]
    assert len({e["id"] for e in got if "id" in e}) == 1  # one stream, one id
    status = svc.status()
    assert status["router"]["recoveries"]["decode_continues_answer"] == before + 1
    restarted(svc, killed)


def test_a_stop_string_cut_by_the_kill_still_ends_the_answer(continued):
    """vLLM holds back text that could begin a stop string; when the decode dies with
    half of one generated, the rest comes from the continuation, whose own vLLM never
    sees the first half: the router matches it across the break and ends the answer
    where the undisturbed one ends."""
    svc = continued
    both_decodes_ready(svc)
    path, body, _ = variant("completions")
    reference, _ = stream(svc.url, path, body)
    pieces = [c["text"] for e in reference for c in e.get("choices") or []]
    whole = "".join(pieces)
    start = len("".join(pieces[:12]))
    stop = whole[start : start + 40]
    assert whole.find(stop) == start and len(stop) == 40, "pick another stop string"
    body = {**body, "stop": [stop]}
    undisturbed, _ = stream(svc.url, path, body)
    assert text_of(undisturbed, False) == whole[:start]  # vLLM's own answer, as a check
    # ~13 tokens of stop string: at event 18 some are generated, none sent (held back)
    got, _, killed = killed_mid_stream(svc, path, body, at=18)
    assert text_of(got, False) == whole[:start]
    assert finish_reasons(got) == ["stop"]
    assert [c.get("stop_reason") for e in got for c in e.get("choices") or []][-1] == stop
    assert not any("error" in e for e in got) and got[-1] == {"done": True}
    restarted(svc, killed)


def test_a_stream_that_cannot_be_continued_ends_with_a_clear_error(continued):
    """``logprobs: 0`` asks for the chosen token's logprob with every token: a
    continuation would not give them for what was computed before, so the stream
    ends with an error event that says why, not with an answer that lacks them."""
    svc = continued
    both_decodes_ready(svc)
    # vLLM compiles its logprob kernel (torch inductor) on a server's first request
    # with logprobs, inside a step: long enough here to be seen as a stall. Done
    # once on every server first, so the test is about the kill alone.
    for name in ("prefill-0", *DECODES):
        warm = {"model": body_model(), "prompt": "warm up", "max_tokens": 2, "logprobs": 0}
        post(server(svc, name)["url"] + "/v1/completions", warm, check=False)
    both_decodes_ready(svc)
    path, body, _ = variant("completions")
    body = {**body, "logprobs": 0}
    before = svc.status()["router"]["recoveries"].get("decode_continues_answer", 0)
    got, _, killed = killed_mid_stream(svc, path, body, at=30)
    errors = [e["error"] for e in got if "error" in e]
    assert len(errors) == 1 and "logprobs" in errors[0]["message"], errors
    assert got[-1] == {"done": True}
    assert svc.status()["router"]["recoveries"].get("decode_continues_answer", 0) == before
    restarted(svc, killed)


def tokens_generated(url: str) -> float:
    """vLLM's own count of the tokens its engine generated."""
    return vllm_metric(url, "vllm:generation_tokens_total")


def post(url: str, body: dict, check: bool = True) -> tuple[dict, dict]:
    req = urllib.request.Request(
        url, data=json.dumps(body).encode(), headers={"Content-Type": "application/json"}
    )
    try:
        with urllib.request.urlopen(req, timeout=400) as resp:
            return json.loads(resp.read()), dict(resp.headers)
    except urllib.error.HTTPError as err:
        if check:
            raise
        return {"status": err.code}, dict(err.headers)


def body_model() -> str:
    return long_request(False)[1]["model"]


@pytest.mark.parametrize("chat", [False, True], ids=["completions", "chat"])
def test_decode_killed_mid_answer_a_whole_answer_is_continued_identical(continued, chat):
    """A non-streamed request is streamed from the decode by the router, which sees
    the tokens come: a decode killed mid-answer is continued from them (not redone
    from the start), and the client gets the undisturbed answer, shaped as vLLM's."""
    svc = continued
    both_decodes_ready(svc)
    path, body = long_request(chat)
    body = {k: v for k, v in body.items() if k not in ("stream", "stream_options")}
    reference, _ = post(svc.url + path, body)
    urls = {name: server(svc, name)["url"] for name in DECODES}
    counts = {name: tokens_generated(url) for name, url in urls.items()}
    result: dict = {}

    def ask() -> None:
        result["answer"], result["headers"] = post(svc.url + path, body)

    with held_in_flight(svc, *DECODES):
        asker = threading.Thread(target=ask)
        asker.start()
        busy: list[str] = []

        def generating() -> bool:
            busy[:] = [n for n, u in urls.items() if tokens_generated(u) >= counts[n] + 30]
            return bool(busy)

        wait_until(generating, 60, "30 tokens of the answer generated")
        state = server(svc, busy[0])
        killed = {"name": busy[0], "pid": state["pid"], "restarts": len(state["restarts"])}
        os.kill(state["pid"], signal.SIGKILL)
        asker.join(400)
    answer, headers = result["answer"], result["headers"]
    assert "decode_continues_answer" in headers["X-Watchdog-Recovery"]

    def content(a: dict) -> str:
        choice = a["choices"][0]
        return choice["message"]["content"] if chat else choice["text"]

    assert content(answer) == content(reference) and len(content(answer)) > 0
    assert answer["usage"] == reference["usage"]
    assert answer["choices"][0]["finish_reason"] == reference["choices"][0]["finish_reason"]
    # shaped as vLLM's own answer (which the undisturbed one is not: it is assembled too)
    direct, _ = post(urls[DECODES[0] if busy[0] != DECODES[0] else DECODES[1]] + path, body)
    assert set(answer) == set(direct) and set(answer["choices"][0]) == set(direct["choices"][0])
    assert set(answer["usage"]) == set(direct["usage"])
    if chat:
        assert set(answer["choices"][0]["message"]) == set(direct["choices"][0]["message"])
    restarted(svc, killed)
