"""The router's stream relay and ladder without vLLM: chunk bookkeeping, rewriting, limits.

These drive the relay's bookkeeping with chunks shaped exactly like vLLM 0.32's
(captured from the real servers); the network side is covered by
tests/integration/test_resilience.py on real vLLM.
"""

from __future__ import annotations

import asyncio

import pytest

from watchdog_kv import cli
from watchdog_kv.router import stream as stream_mod
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


def captured(relay):
    """The relay's client side as a list of the events it writes (and "[DONE]")."""
    events = []

    async def write(event):
        events.append(event)

    async def end():
        events.append("[DONE]")
        return "response"

    relay._write, relay._end = write, end
    return events


def cont(text, ids, finish=None, stop_reason=None):
    out = chunk(text, ids, finish, id="cmpl-other")
    out["choices"][0]["stop_reason"] = stop_reason
    return out


def run(coro):
    return asyncio.run(coro)


def test_continuation_chunks_become_the_client_stream():
    relay = StreamRelay(
        None,
        "/v1/chat/completions",
        {"messages": [], "stream": True, "stream_options": {"include_usage": True}},
        "r",
    )
    events = captured(relay)
    relay._head = {"id": "chatcmpl-1", "created": 7, "model": "m"}
    relay._record(chat_chunk("", [], role=True, prompt_ids=[1, 2, 3]))
    relay._record(chat_chunk("ab", [4, 5]))
    relay.continuations = 1
    assert not run(relay._continued(cont("cd", [6], "length")))
    out = events[0]
    assert out["id"] == "chatcmpl-1" and out["object"] == "chat.completion.chunk"
    choice = out["choices"][0]
    assert choice["delta"] == {"content": "cd"} and choice["finish_reason"] == "length"
    assert choice["token_ids"] is None
    run(relay._close())
    assert events[1]["choices"] == [] and events[1]["id"] == "chatcmpl-1"
    assert events[1]["usage"] == {"prompt_tokens": 3, "completion_tokens": 3, "total_tokens": 6}
    assert events[2] == "[DONE]"
    assert relay.text == "abcd" and relay.emitted == [4, 5, 6]


def stopped_relay(stop, include=False, min_tokens=0, sent="abc", held="xE"):
    """A completions stream that sent ``sent`` and whose dead decode held ``held`` back."""
    body = {"prompt": "p", "stream": True, "stop": stop, "max_tokens": 50}
    if include:
        body["include_stop_str_in_output"] = True
    if min_tokens:
        body["min_tokens"] = min_tokens
    relay = StreamRelay(None, "/v1/completions", body, "r")
    events = captured(relay)
    relay._head = {"id": "cmpl-1", "created": 7, "model": "m"}
    relay._record(chunk(sent, [1, 2, 3], prompt_ids=[9]))
    relay.emitted.append(4)  # the token whose text was held back
    relay.continuations = 1
    relay._pending = held
    return relay, events


def texts(events):
    return "".join(e["choices"][0]["text"] for e in events if isinstance(e, dict) and e["choices"])


def test_a_stop_string_across_the_break_ends_the_answer_there():
    """The dead decode held "xE" back (it could begin "END"); the continuation's own
    vLLM never sees the "E", so the router matches "END" across the break."""
    relay, events = stopped_relay(["END"])
    assert not run(relay._continued(cont("N", [5])))
    assert texts(events) == "x"  # "EN" could still begin "END": held back
    assert run(relay._continued(cont("Dzz", [6])))  # the answer ends here
    assert texts(events) == "x"
    last = events[-1]["choices"][0]
    assert last["finish_reason"] == "stop" and last["stop_reason"] == "END"
    assert relay.text == "abcx" and relay.emitted == [1, 2, 3, 4, 5, 6]


def test_a_stop_string_kept_in_the_output_is_matched_across_the_break():
    relay, events = stopped_relay(["END"], include=True, sent="abcE", held="")
    run(relay._continued(cont("N", [5])))
    assert run(relay._continued(cont("Dzz", [6])))
    assert relay.text == "abcEND" and events[-1]["choices"][0]["stop_reason"] == "END"


def test_the_earliest_stop_string_to_complete_wins_as_in_vllm():
    relay, events = stopped_relay(["zzz", "Ez"], held="E")
    assert run(relay._continued(cont("zzz", [5])))
    assert events[-1]["choices"][0]["stop_reason"] == "Ez" and relay.text == "abc"


def test_no_stop_string_before_min_tokens():
    relay, _events = stopped_relay(["END"], min_tokens=5)
    # this chunk brings the count to 5: text before it cannot end a match (vLLM's rule)
    assert not run(relay._continued(cont("ND", [5])))
    assert run(relay._continued(cont("qEND", [6])))
    assert relay.text == "abcxENDq"


def test_held_text_is_passed_on_at_the_finish():
    relay, events = stopped_relay(["END"])
    run(relay._continued(cont("q", [5], "length")))
    assert relay.text == "abcxEq" and events[-1]["choices"][0]["finish_reason"] == "length"


def test_nothing_is_continued_after_the_finish_chunk():
    relay = StreamRelay(None, "/v1/completions", {"prompt": "p", "stream": True}, "r")
    events = captured(relay)
    relay._record(chunk("ab", [4, 5], "stop", prompt_ids=[1]))
    relay.response = "begun"  # the client has its stream
    # the decode died between its finish chunk and [DONE]: the next decode is not asked
    assert run(relay.relay(None, Backend("decode-1", "http://unused"), None, 1.0)) == "response"
    assert events == ["[DONE]"]


def test_a_finish_chunk_lost_at_the_budget_is_sent_by_the_router():
    relay = StreamRelay(
        None, "/v1/completions", {"prompt": "p", "stream": True, "max_tokens": 2}, "r"
    )
    events = captured(relay)
    relay._head = {"id": "cmpl-1", "created": 7, "model": "m"}
    relay._record(chunk("ab", [4, 5], prompt_ids=[1]))
    relay.response = "begun"

    async def aligned(_http, _backend):
        return 2

    relay._aligned = aligned
    run(relay.relay(None, Backend("decode-1", "http://unused"), None, 1.0))
    assert events[0]["choices"][0]["finish_reason"] == "length" and events[-1] == "[DONE]"


def continuation_of(path, body, record, kept=2):
    relay = StreamRelay(None, path, body, "r")
    record(relay)

    async def aligned(_http, _backend):
        return kept

    async def text_of(_http, _backend, ids):  # the sent tokens' text: what was sent
        return relay.text

    relay._aligned, relay._text_of = aligned, text_of
    return run(relay._continuation(None, Backend("decode-1", "u")))


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
    got = continuation_of(
        "/v1/completions", body, lambda r: r._record(chunk("ab", [4, 5], prompt_ids=[1, 2]))
    )
    assert got == {
        "temperature": 0,
        "seed": 4,
        "model": "m",
        "prompt": [1, 2, 4, 5],
        "stream": True,
        "return_token_ids": True,
        "max_tokens": 8,
        "min_tokens": 1,
        "vllm_xargs": {"watchdog_kv_draws": 2},
    }


def test_the_budget_is_what_vllm_would_have_allowed(monkeypatch):
    def first(r):
        r._record(chat_chunk("", [], role=True, prompt_ids=[1, 2]))
        r._record(chat_chunk("ab", [4, 5]))

    async def max_model_len(_http, _backend, _model):
        return 100

    monkeypatch.setattr(stream_mod, "_max_model_len", max_model_len)
    chat = continuation_of("/v1/chat/completions", {"messages": [], "stream": True}, first)
    assert chat["max_tokens"] == 100 - 2 - 2  # vLLM's: max_model_len - prompt - sent
    chat = continuation_of(
        "/v1/chat/completions", {"messages": [], "max_completion_tokens": 7}, first
    )
    assert chat["max_tokens"] == 5
    for body in ({"prompt": "p"}, {"prompt": "p", "max_tokens": None}):
        plain = continuation_of(
            "/v1/completions", body, lambda r: r._record(chunk("ab", [4, 5], prompt_ids=[1]))
        )
        assert plain["max_tokens"] == 14  # vLLM's default of 16 for completions (null too)


def test_vllm_default_max_tokens_for_completions_is_the_one_the_router_assumes():
    protocol = pytest.importorskip(
        "vllm.entrypoints.openai.completion.protocol", reason="vLLM is not installed here"
    )
    from watchdog_kv.router.stream import COMPLETIONS_MAX_TOKENS

    assert protocol.CompletionRequest.model_fields["max_tokens"].default == COMPLETIONS_MAX_TOKENS


def test_a_whole_answer_is_assembled_from_the_stream():
    relay = StreamRelay(None, "/v1/chat/completions", {"messages": [], "model": "m"}, "r")
    assert relay.whole and relay.usage_wanted
    relay._head = {"id": "chatcmpl-1", "created": 7, "model": "m"}
    relay._record(chat_chunk("", [], role=True, prompt_ids=[1, 2]))
    relay._record(chat_chunk("ab", [4, 5]))
    relay._record(chat_chunk("c", [6], "stop"))
    answer = relay._assembled()
    assert answer["object"] == "chat.completion" and answer["id"] == "chatcmpl-1"
    assert answer["choices"][0]["message"]["content"] == "abc"
    assert answer["choices"][0]["finish_reason"] == "stop"
    assert answer["usage"] == {
        "prompt_tokens": 2,
        "completion_tokens": 3,
        "total_tokens": 5,
        "prompt_tokens_details": None,
        "completion_tokens_details": None,
    }


@pytest.mark.parametrize(
    "chat,body,why",
    [
        (False, {"prompt": "p", "n": 2}, "n > 1"),
        (False, {"prompt": "p", "echo": True}, "echo"),
        (False, {"prompt": "p", "logprobs": 2}, "logprobs"),
        (False, {"prompt": "p", "logprobs": 0}, "logprobs"),
        (True, {"messages": [], "logprobs": False}, None),
        (False, {"prompt": "p", "presence_penalty": 0.5}, "presence or frequency penalty"),
        (False, {"prompt": "p", "frequency_penalty": 0.0}, None),
        (
            True,
            {"messages": [{"role": "user", "content": [{"type": "image_url"}]}]},
            "non-text input (a continuation carries token ids only)",
        ),
        (True, {"messages": [{"role": "user", "content": [{"type": "text", "text": "x"}]}]}, None),
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


def test_a_seed_is_continued_only_where_the_plugin_replays_its_draws():
    body = {"prompt": "p", "seed": 3, "temperature": 0.8}
    assert not_continuable(False, body, seeds_replayed=True) is None
    assert "seed" in not_continuable(False, body, seeds_replayed=False)
    assert not_continuable(False, {**body, "temperature": 0}, seeds_replayed=False) is None


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


def test_what_the_decode_sends_can_make_an_answer_uncontinuable():
    """A reasoning parser's deltas, or text without its token ids (vLLM hides them with
    some parser settings), cannot be carried: a clear error, never a doubled opening."""
    relay = StreamRelay(None, "/v1/chat/completions", {"messages": [], "stream": True}, "r")
    relay._record(chat_chunk("", [], role=True, prompt_ids=[1]))
    assert relay.why_not is None
    reasoning = chat_chunk(None, [7])
    reasoning["choices"][0]["delta"] = {"reasoning": "hmm"}
    relay._record(reasoning)
    assert "reasoning" in relay.why_not
    hidden = StreamRelay(None, "/v1/completions", {"prompt": "p"}, "r")
    hidden._record(chunk("ab", None, prompt_ids=[1]))
    assert hidden.started and hidden.why_not == "the decode sent text without its token ids"


def test_a_continuation_with_stop_strings_asks_for_its_text_uncut():
    body = {"prompt": "p", "stream": True, "stop": ["END"], "max_tokens": 9}
    got = continuation_of(
        "/v1/completions", body, lambda r: r._record(chunk("ab", [4, 5], prompt_ids=[1]))
    )
    assert got["include_stop_str_in_output"] is True and got["stop"] == ["END"]


# --- stop strings across a break, against vLLM's own detokenizer ---------------------------

detokenizer = pytest.importorskip("vllm.v1.engine.detokenizer", reason="vLLM is not installed")
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402


class PieceDetokenizer(detokenizer.BaseIncrementalDetokenizer):
    """vLLM's incremental detokenizer (stop strings, hold-back, min_tokens) over tokens
    whose text is given: token i reads ``pieces[i]``."""

    def __init__(self, pieces, stop, min_tokens, include):
        from types import SimpleNamespace

        params = SimpleNamespace(
            stop=stop, min_tokens=min_tokens, include_stop_str_in_output=include
        )
        super().__init__(SimpleNamespace(sampling_params=params))
        self.pieces, self.token_ids = pieces, []

    def decode_next(self, token_id):
        return self.pieces[token_id]

    def num_output_tokens(self):
        return len(self.token_ids)


def vllm_stream(pieces, tokens, stop, min_tokens, include, max_tokens, last=True):
    """The chunks vLLM streams for ``tokens`` (one per step): (text, ids, finish, reason)."""
    det = PieceDetokenizer(pieces, stop, min_tokens, include)
    out, kept = [], 0
    for i, token in enumerate(tokens):
        matched = det.update([token], False)
        finish = "stop" if matched else None
        if not finish and (
            det.num_output_tokens() >= max_tokens or (last and i == len(tokens) - 1)
        ):
            finish = "length"
        ids = [token][: det.num_output_tokens() - kept]
        kept = det.num_output_tokens()
        out.append((det.get_next_output_text(finish is not None, True), ids, finish, matched))
        if finish:
            break
    return out


@settings(max_examples=300, deadline=None)
@given(
    pieces=st.lists(st.text("abXY", min_size=1, max_size=3), min_size=2, max_size=10),
    stop=st.lists(st.text("abXY", min_size=1, max_size=4), min_size=1, max_size=2),
    min_tokens=st.integers(0, 3),
    include=st.booleans(),
    data=st.data(),
)
def test_an_answer_broken_anywhere_ends_where_vllm_ends_it(pieces, stop, min_tokens, include, data):
    """The decode dies after k tokens; the continuation (its own vLLM, asked for its text
    uncut) is relayed: text, finish, stop_reason and token count are vLLM's undisturbed."""
    tokens = list(range(len(pieces)))
    k = data.draw(st.integers(1, len(pieces) - 1))
    reference = vllm_stream(pieces, tokens, stop, min_tokens, include, 100)
    first = vllm_stream(pieces, tokens[:k], stop, min_tokens, include, 100, last=False)
    if first[-1][2]:
        return  # it ended before the break: nothing to continue
    body = {"prompt": "p", "stream": True, "stop": stop, "max_tokens": 100}
    body.update(min_tokens=min_tokens, include_stop_str_in_output=include)
    relay = StreamRelay(None, "/v1/completions", body, "r")
    for i, (text, ids, _, _) in enumerate(first):
        relay._record(chunk(text, ids, prompt_ids=[99] if i == 0 else None))
    # what _continuation finds: the held-back text, where stop strings start to count
    generated = "".join(pieces[:k])
    relay._pending = "" if include else generated[len(relay.text) :]
    if 0 < min_tokens <= k:
        relay._min_offset = len("".join(pieces[:min_tokens]))
    relay.continuations = 1
    events = captured(relay)
    rest = vllm_stream(pieces, tokens[k:], stop, max(0, min_tokens - k), True, 100 - k)
    for text, ids, finish, matched in rest:
        if run(relay._continued(cont(text, ids, finish, matched))) or finish:
            break
    run(relay._close())
    assert isinstance(events[-1], str)
    assert relay.text == "".join(text for text, *_ in reference)
    assert (relay.finish, relay.stop_reason) == (reference[-1][2], reference[-1][3])
    assert len(relay.emitted) == sum(len(ids) for _, ids, _, _ in reference)
