"""The router's stream relay and ladder without vLLM: chunk bookkeeping, rewriting, limits.

These drive the relay's bookkeeping with chunks shaped exactly like vLLM 0.32's
(captured from the real servers); the network side is covered by
tests/integration/test_resilience.py on real vLLM.
"""

from __future__ import annotations

import asyncio

import pytest

from watchdog_kv import cli
from watchdog_kv.router.handoff import Backend
from watchdog_kv.router.ladder import Recoveries
from watchdog_kv.router.stream import StreamRelay, not_continuable


def chunk(text, ids, finish=None, **extra):
    choice = {
        "index": 0,
        "text": text,
        "logprobs": None,
        "finish_reason": finish,
        "stop_reason": None,
        "prompt_token_ids": extra.pop("prompt_ids", None),
        "token_ids": ids,
    }
    return {
        "id": extra.pop("id", "cmpl-1"),
        "object": "text_completion",
        "created": 7,
        "model": "m",
        "choices": [choice],
        **extra,
    }


def chat_chunk(content, ids, finish=None, prompt_ids=None, role=False):
    delta = (
        {"role": "assistant", "content": content}
        if role
        else ({} if content is None else {"content": content})
    )
    out = {
        "id": "chatcmpl-1",
        "object": "chat.completion.chunk",
        "created": 7,
        "model": "m",
        "choices": [
            {
                "index": 0,
                "delta": delta,
                "logprobs": None,
                "finish_reason": finish,
                "token_ids": ids,
            }
        ],
    }
    if role:
        out["prompt_token_ids"] = prompt_ids
    return out


def test_first_hand_chunks_are_recorded_and_ids_hidden_from_the_client():
    relay = StreamRelay(None, "/v1/completions", {"prompt": "p", "stream": True}, "r")
    first = chunk(" a", [5], prompt_ids=[1, 2, 3])
    assert relay._record(first)
    assert relay.prompt_ids == [1, 2, 3] and relay.emitted == [5] and relay.text == " a"
    # as vLLM sends it without return_token_ids: the keys stay, set to null
    assert first["choices"][0]["token_ids"] is None
    assert first["choices"][0]["prompt_token_ids"] is None


def test_client_that_asked_for_ids_keeps_them():
    relay = StreamRelay(None, "/v1/completions", {"prompt": "p", "return_token_ids": True}, "r")
    first = chunk(" a", [5], prompt_ids=[1])
    relay._record(first)
    assert first["choices"][0]["token_ids"] == [5]


def test_chat_chunks_that_exist_only_for_token_ids_are_dropped_not_empty_content():
    relay = StreamRelay(None, "/v1/chat/completions", {"messages": [], "stream": True}, "r")
    assert relay._record(chat_chunk("", [], role=True, prompt_ids=[1, 2]))
    assert relay._record(chat_chunk("", [9]))  # vLLM sends this one without ids too
    assert not relay._record(chat_chunk(None, [10]))  # {} delta: only because of the ids
    assert relay.emitted == [9, 10] and relay.prompt_ids == [1, 2]


def test_continuation_chunks_become_the_client_stream():
    relay = StreamRelay(
        None,
        "/v1/chat/completions",
        {"messages": [], "stream": True, "stream_options": {"include_usage": True}},
        "r",
    )
    relay._head = {"id": "chatcmpl-1", "created": 7, "model": "m"}
    relay._record(chat_chunk("", [], role=True, prompt_ids=[1, 2, 3]))
    relay._record(chat_chunk("ab", [4, 5]))
    out = relay._from_continuation(chunk("cd", [6], "length", id="cmpl-other"))
    assert out["id"] == "chatcmpl-1" and out["object"] == "chat.completion.chunk"
    choice = out["choices"][0]
    assert choice["delta"] == {"content": "cd"} and choice["finish_reason"] == "length"
    assert choice["token_ids"] is None
    usage = relay._from_continuation(
        {
            "id": "x",
            "object": "text_completion",
            "created": 9,
            "model": "m",
            "choices": [],
            "usage": {"prompt_tokens": 5, "completion_tokens": 1, "total_tokens": 6},
        }
    )
    assert usage["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert relay.text == "abcd" and relay.emitted == [4, 5, 6]


def test_continuation_request_asks_for_what_is_still_owed():
    body = {
        "model": "m",
        "prompt": "p",
        "max_tokens": 10,
        "min_tokens": 3,
        "temperature": 0,
        "seed": 4,
        "stream": True,
        "echo": False,
    }
    relay = StreamRelay(None, "/v1/completions", body, "r")
    relay._record(chunk("ab", [4, 5], prompt_ids=[1, 2]))

    async def aligned(_http, _backend):
        return 2

    relay._aligned = aligned
    cont = asyncio.run(relay._continuation(None, Backend("decode-1", "u")))
    assert cont == {
        "temperature": 0,
        "seed": 4,
        "model": "m",
        "prompt": [1, 2, 4, 5],
        "stream": True,
        "return_token_ids": True,
        "max_tokens": 8,
        "min_tokens": 1,
    }


@pytest.mark.parametrize(
    "chat,body,why",
    [
        (False, {"prompt": "p", "n": 2}, "n > 1"),
        (False, {"prompt": "p", "echo": True}, "echo"),
        (False, {"prompt": "p", "logprobs": 2}, "logprobs"),
        (True, {"messages": [], "logprobs": True}, "logprobs"),
        (True, {"messages": [], "tools": [{"type": "function"}]}, "tools or structured output"),
        (
            True,
            {"messages": [], "response_format": {"type": "json_object"}},
            "tools or structured output",
        ),
        (False, {"prompt": ["a", "b"]}, "several prompts"),
        (False, {"prompt": [1, 2, 3]}, None),
        (True, {"messages": [], "temperature": 0.7, "seed": 3, "stop": ["x"]}, None),
    ],
)
def test_what_cannot_be_continued_exactly_is_named(chat, body, why):
    assert not_continuable(chat, body) == why


def test_round_robin_per_role():
    rec = Recoveries()
    b = [Backend("d0", "u0"), Backend("d1", "u1")]
    assert [rec.rotate("decode", b)[0].name for _ in range(4)] == ["d0", "d1", "d0", "d1"]
    assert rec.rotate("prefill", b)[0].name == "d0"


@pytest.mark.parametrize(
    "args,fragment",
    [
        (["--decode", "0"], "--decode 0: expected a whole number, 1 or more"),
        (["--prefill", "-1"], "--prefill -1: expected a whole number, 0 or more"),
        (["--data-parallel-size", "2", "--decode", "2"], "does not combine"),
    ],
)
def test_bad_topology_stops_before_anything_starts(args, fragment, capsys):
    assert cli.main(["serve", "--port", "1", *args]) == cli.EXIT_USAGE
    assert fragment in capsys.readouterr().err


def test_no_server_available_names_every_one_and_why():
    """Two decodes, both stalled (or one starting): the client's 503 names each, not the
    first one only."""
    from types import SimpleNamespace

    from watchdog_kv.router.ladder import Ladder

    def refusal(health: dict) -> tuple[str, str]:
        backends = SimpleNamespace(health=lambda: health)
        err = Ladder._unavailable(SimpleNamespace(backends=backends), "decode")
        return err.kind, err.message

    stall = "stuck in its step for 12.0 s (deadline 10.0 s)"
    kind, message = refusal(
        {
            "prefill-0": {"role": "prefill", "state": "ready", "stalls": []},
            "decode-0": {"role": "decode", "state": "ready", "stalls": [stall]},
            "decode-1": {"role": "decode", "state": "ready", "stalls": [stall]},
        }
    )
    assert kind == "server_stalled"
    assert message.count("is stalled") == 2 and "decode-0" in message and "decode-1" in message
    assert "prefill-0" not in message
    kind, message = refusal(
        {
            "decode-0": {"role": "decode", "state": "ready", "stalls": [stall]},
            "decode-1": {"role": "decode", "state": "restarting", "stalls": []},
        }
    )
    assert kind == "server_stalled" and "decode-1 is restarting" in message
    kind, message = refusal({"decode-0": {"role": "decode", "state": "exited", "stalls": []}})
    assert kind == "service_unavailable" and "decode-0 is exited" in message
