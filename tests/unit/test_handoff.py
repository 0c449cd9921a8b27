"""The router's request handling, without vLLM: validation and the prefill request."""

from __future__ import annotations

import json

import aiohttp
import pytest

from watchdog_kv.router.handoff import (
    Backend,
    HandoffError,
    no_answer,
    prefill_body,
    validate_body,
)


@pytest.mark.parametrize(
    "raw,fragment",
    [
        (b"{not json", "not valid JSON"),
        (b"\xff\xfe", "not valid JSON"),
        (b"[1, 2]", "must be a JSON object"),
        (b'{"prompt": "x", "stream": "yes"}', "'stream' must be true or false"),
        (b'{"prompt": "x", "max_tokens": "8"}', "'max_tokens' must be an integer"),
        (b'{"prompt": "x", "max_tokens": true}', "'max_tokens' must be an integer"),
        (b'{"prompt": "x", "kv_transfer_params": {}}', "set by the router"),
    ],
)
def test_malformed_requests_are_400_naming_the_problem(raw, fragment):
    with pytest.raises(HandoffError) as err:
        validate_body(raw)
    assert err.value.status == 400
    assert fragment in err.value.message
    payload = json.loads(err.value.response().body)
    assert payload["error"]["code"] == 400 and fragment in payload["error"]["message"]


def test_prefill_request_is_one_token_no_stream_remote_decode():
    body = {
        "model": "m",
        "prompt": "p",
        "stream": True,
        "max_tokens": 50,
        "max_completion_tokens": 50,
        "stream_options": {"include_usage": True},
        "min_tokens": 3,
        "temperature": 0,
    }
    out = prefill_body(body)
    assert out == {
        "model": "m",
        "prompt": "p",
        "stream": False,
        "max_tokens": 1,
        "max_completion_tokens": 1,
        "temperature": 0,
        "kv_transfer_params": {"do_remote_decode": True, "do_remote_prefill": False},
    }
    assert body["stream"] is True and body["max_tokens"] == 50  # the original is untouched


def test_no_answer_names_role_server_and_cause():
    backend = Backend("prefill-0", "http://127.0.0.1:1")
    late = no_answer("prefill", backend, TimeoutError(), 2.5)
    assert (late.status, late.kind) == (504, "prefill_timeout")
    assert late.message == "prefill server prefill-0 did not answer within 2.5 s"
    gone = no_answer(
        "decode", Backend("decode-0", "x"), aiohttp.ClientConnectionError("refused"), 9
    )
    assert (gone.status, gone.kind) == (502, "decode_unreachable")
    assert gone.message == "decode server decode-0 is unreachable: refused"


def test_several_prompts_are_told_from_one():
    from watchdog_kv.router.handoff import several_prompts

    done = "/v1/completions"
    assert several_prompts(done, {"prompt": ["a", "b"]}) == ["a", "b"]
    assert several_prompts(done, {"prompt": [[1, 2], [3]]}) == [[1, 2], [3]]
    assert several_prompts(done, {"prompt": [1, 2, 3]}) is None  # token ids of one prompt
    assert several_prompts(done, {"prompt": ["only"]}) is None
    assert several_prompts(done, {"prompt": "one"}) is None
    assert several_prompts("/v1/chat/completions", {"prompt": ["a", "b"]}) is None


def test_answers_per_prompt_are_merged_as_vllm_numbers_them():
    from watchdog_kv.router.ladder import merge_answers

    def answer(texts, prompt_tokens, completion_tokens):
        return {
            "id": "cmpl-x",
            "object": "text_completion",
            "model": "m",
            "choices": [
                {"index": j, "text": t, "finish_reason": "length"} for j, t in enumerate(texts)
            ],
            "usage": {
                "prompt_tokens": prompt_tokens,
                "completion_tokens": completion_tokens,
                "total_tokens": prompt_tokens + completion_tokens,
            },
        }

    merged = merge_answers([answer(["a0", "a1"], 3, 4), answer(["b0", "b1"], 5, 4)], 2, "cmpl-r")
    assert merged["id"] == "cmpl-r" and merged["object"] == "text_completion"
    assert [(c["index"], c["text"]) for c in merged["choices"]] == [
        (0, "a0"),
        (1, "a1"),
        (2, "b0"),
        (3, "b1"),
    ]
    assert merged["usage"] == {"prompt_tokens": 8, "completion_tokens": 8, "total_tokens": 16}
