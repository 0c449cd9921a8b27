"""A non-streamed answer's decode timeout is silence, not the whole answer.

The decode is a stand-in that streams vLLM 0.32-shaped chunks at a set pace (the
router's timing rule is what is checked, and a real decode cannot be made to
answer slowly and steadily on demand); answers continued after a real decode is
killed are in tests/integration/test_continuation.py.
"""

from __future__ import annotations

import asyncio
import json

import aiohttp
from aiohttp import web
from aiohttp.test_utils import TestServer

from watchdog_kv import config
from watchdog_kv.router.app import build_app
from watchdog_kv.router.handoff import Backend

from .test_router_health import View

IDLE_S = 1.0


def paced_decode(tokens: int, pause_s: float, calls: list[dict]) -> web.Application:
    """A decode that streams ``tokens`` one-token chunks, ``pause_s`` apart."""

    async def handle(request: web.Request) -> web.StreamResponse:
        body = await request.json()
        calls.append(body)
        stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await stream.prepare(request)
        for i in range(tokens):
            await asyncio.sleep(pause_s)
            choice = {
                "index": 0,
                "text": f"t{i} ",
                "logprobs": None,
                "finish_reason": "length" if i == tokens - 1 else None,
                "stop_reason": None,
                "token_ids": [100 + i],
                "prompt_token_ids": [1, 2] if i == 0 else None,
            }
            chunk = {"id": "cmpl-x", "object": "text_completion", "created": 1, "model": "m"}
            await stream.write(f"data: {json.dumps({**chunk, 'choices': [choice]})}\n\n".encode())
        usage = {"prompt_tokens": 2, "completion_tokens": tokens, "total_tokens": 2 + tokens}
        await stream.write(f"data: {json.dumps({'choices': [], 'usage': usage})}\n\n".encode())
        await stream.write(b"data: [DONE]\n\n")
        await stream.write_eof()
        return stream

    app = web.Application()
    app.router.add_post("/v1/completions", handle)
    return app


def ask_whole(tokens: int, pause_s: float) -> tuple[int, dict, dict, list[dict]]:
    calls: list[dict] = []

    async def run() -> tuple[int, dict, dict]:
        decode = TestServer(paced_decode(tokens, pause_s, calls))
        await decode.start_server()
        view = View({"decode-0": ("ready", [])})
        url = str(decode.make_url("")).rstrip("/")
        view.available = lambda role: [Backend("decode-0", url)]
        settings = config.load({"WATCHDOG_KV_DECODE_IDLE_TIMEOUT": str(IDLE_S)})
        router = TestServer(build_app(view, settings))
        await router.start_server()
        try:
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    router.make_url("/v1/completions"),
                    json={"model": "m", "prompt": "p", "max_tokens": tokens, "temperature": 0},
                ) as resp,
            ):
                return resp.status, await resp.json(), dict(resp.headers)
        finally:
            await router.close()
            await decode.close()

    status, body, headers = asyncio.run(run())
    return status, body, headers, calls


def test_a_whole_answer_longer_than_the_timeout_arrives_untouched():
    """12 tokens 0.25 s apart: 3 s in all, three times the 1 s decode timeout, never
    silent for 1 s -- one call to the decode, the whole answer, no recovery."""
    status, body, headers, calls = ask_whole(tokens=12, pause_s=0.25)
    assert status == 200, body
    assert body["choices"][0]["text"] == "".join(f"t{i} " for i in range(12))
    assert body["usage"]["completion_tokens"] == 12
    assert headers["X-Watchdog-Recovery"] == "none"
    assert len(calls) == 1 and calls[0]["stream"] is True  # streamed from the decode


def test_a_decode_silent_past_the_timeout_is_given_up_on():
    """The control: 1.5 s of silence before each token is past the 1 s timeout."""
    status, body, headers, calls = ask_whole(tokens=3, pause_s=1.5)
    assert len(calls) >= 2  # the router did not wait on a silent decode
    if status == 200:
        assert headers["X-Watchdog-Recovery"] != "none"
    else:
        assert "silent" in body["error"]["message"]
