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
