"""The router's request handling, without vLLM: validation and the prefill request."""

from __future__ import annotations

import json

import pytest

from watchdog_kv.router.handoff import HandoffError, prefill_body, validate_body


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
