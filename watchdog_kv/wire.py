"""The wire contract: every key the router, the prefill and the decode exchange.

One request's hand-off crosses four boundaries, and every key watchdog_kv puts on
or reads from them is defined here, with its validation:

===============================  ==================================================
``kv_transfer_params``           router -> prefill (:func:`prefill_params`: remote
                                 decode, the call's trace), prefill -> router ->
                                 decode (vLLM's NIXL keys, checked by
                                 :func:`bad_remote_params`, plus :data:`LEASE` and
                                 :data:`PROMPT`, added by the prefill's scheduler)
connector metadata attributes    scheduler -> worker in one engine: the plans of
                                 the loads starting (:data:`RECV_PLANS`, each a
                                 :class:`RecvPlan`) and the traces of the requests
                                 kept for a decode (:data:`LEASE_TRACES`)
``vllm_xargs``                   router -> decode on a continuation: the seeded
                                 draws already spent (:data:`DRAWS`,
                                 :func:`draws_to_skip`)
lease questions (ZeroMQ)         decode worker -> prefill worker: ``{"req": id}``,
                                 answered ``{"req": id, "verdict": ...}``
                                 (:func:`lease_question`, :func:`read_question`,
                                 :func:`read_answer`)
===============================  ==================================================

Nothing here imports vLLM: the contract is plain data.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "DO_REMOTE_DECODE",
    "DO_REMOTE_PREFILL",
    "DRAWS",
    "LEASE",
    "LEASE_TRACES",
    "PROMPT",
    "RECV_PLANS",
    "REMOTE_ENGINE_ID",
    "REMOTE_REQUEST_ID",
    "TRACE",
    "RecvPlan",
    "bad_remote_params",
    "draws_to_skip",
    "lease_answer",
    "lease_question",
    "other_prompt",
    "prefill_params",
    "prompt_digest",
    "read_answer",
    "read_question",
]

# -- kv_transfer_params -------------------------------------------------------------------
DO_REMOTE_DECODE = "do_remote_decode"  # router -> prefill: keep the KV for a decode
DO_REMOTE_PREFILL = "do_remote_prefill"  # prefill -> decode: pull the KV
REMOTE_ENGINE_ID = "remote_engine_id"
REMOTE_REQUEST_ID = "remote_request_id"
TRACE = "watchdog_kv_trace"  # the router's W3C traceparent for the call
LEASE = "watchdog_kv_lease"  # the prefill's lease servers, by TP rank
PROMPT = "watchdog_kv_prompt"  # digest of the prefilled prompt's token ids

# -- connector metadata (scheduler -> worker) -----------------------------------------
RECV_PLANS = "watchdog_kv_recv"  # {req_id: RecvPlan as a dict}
LEASE_TRACES = "watchdog_kv_trace"  # {req_id: traceparent} of requests kept for a decode

# -- vllm_xargs (router -> decode) ----------------------------------------------------
DRAWS = "watchdog_kv_draws"  # draws a seeded continuation skips (one per token sent)

_INT32 = 2**31
_MAX_QUESTION = 4096  # bytes: a request id, in JSON


def prefill_params(traceparent: str | None) -> dict[str, Any]:
    """The ``kv_transfer_params`` the router sends a prefill."""
    params: dict[str, Any] = {DO_REMOTE_DECODE: True, DO_REMOTE_PREFILL: False}
    if traceparent is not None:
        params[TRACE] = traceparent
    return params


def prompt_digest(token_ids: Any) -> str | None:
    """A digest of a prompt's token ids (their count and a hash), or None without them."""
    try:
        ids = [int(t) for t in token_ids]
    except (TypeError, ValueError):
        return None
    raw = b"".join(t.to_bytes(4, "little", signed=True) for t in ids)
    return f"{len(ids)}:{hashlib.blake2b(raw, digest_size=12).hexdigest()}"


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def bad_remote_params(params: dict[str, Any]) -> str | None:
    """Why NIXL-style remote-prefill ``kv_transfer_params`` cannot be used, or None."""
    for key in (REMOTE_ENGINE_ID, REMOTE_REQUEST_ID, "remote_host"):
        if not isinstance(params.get(key), str) or not params[key]:
            return f"{key} must be a non-empty string, got {params.get(key)!r}"
    if not _is_int(params.get("remote_port"), 1, 65536):
        return f"remote_port must be an integer port, got {params.get('remote_port')!r}"
    blocks = params.get("remote_block_ids")
    if not isinstance(blocks, list) or not all(isinstance(group, list) for group in blocks):
        return f"remote_block_ids must be a list of lists of block ids, got {blocks!r}"[:200]
    if not all(_is_int(b, 0, _INT32) for group in blocks for b in group):
        return "remote_block_ids must hold integers from 0 to 2**31-1"
    for key in ("tp_size", "dcp_size", "pp_size"):
        if key in params and not _is_int(params[key], 1, 1 << 16):
            return f"{key} must be a positive integer, got {params[key]!r}"
    if params.get("remote_num_tokens") is not None and not _is_int(
        params["remote_num_tokens"], 0, _INT32
    ):
        return (
            f"remote_num_tokens must be a non-negative integer, got {params['remote_num_tokens']!r}"
        )
    if params.get(PROMPT) is not None and not isinstance(params[PROMPT], str):
        return f"{PROMPT} must be a string, got {params[PROMPT]!r}"[:200]
    lease = params.get(LEASE)
    if lease is not None and not (
        isinstance(lease, list) and lease and all(isinstance(e, str) for e in lease)
    ):
        return f"{LEASE} must be a list of addresses, got {lease!r}"[:200]
    if params.get(TRACE) is not None and not isinstance(params[TRACE], str):
        return f"{TRACE} must be a string, got {params[TRACE]!r}"[:200]
    return None


def other_prompt(params: dict[str, Any], prompt_token_ids: Any) -> str | None:
    """Why the KV behind ``params`` is not the KV of the prompt ``prompt_token_ids``, or
    None (also when the prefill did not say whose it is: a prefill without watchdog_kv)."""
    theirs = params.get(PROMPT)
    if theirs is None:
        return None
    mine = prompt_digest(prompt_token_ids)
    if mine is None or mine == theirs:
        return None
    return (
        f"the KV belongs to another prompt (prefilled prompt {theirs}, this request's "
        f"{mine}); computing this prompt here"
    )


def str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


@dataclass
class RecvPlan:
    """What the scheduler knows of one remote load, sent to the worker."""

    req_id: str
    num_blocks: int
    remote_engine_id: str | None = None
    remote_request_id: str | None = None
    lease: list[str] | None = None  # lease servers of the prefill, by TP rank
    local_blocks: list[int] = field(default_factory=list)
    trace: str | None = None  # the router's traceparent for the decode call

    @classmethod
    def from_params(
        cls, req_id: str, params: dict[str, Any], num_blocks: int, local_blocks: list[int]
    ) -> RecvPlan:
        lease = params.get(LEASE)
        return cls(
            req_id=req_id,
            num_blocks=num_blocks,
            remote_engine_id=str_or_none(params.get(REMOTE_ENGINE_ID)),
            remote_request_id=str_or_none(params.get(REMOTE_REQUEST_ID)),
            lease=list(lease) if isinstance(lease, list) else None,
            local_blocks=local_blocks,
            trace=str_or_none(params.get(TRACE)),
        )

    @classmethod
    def from_dict(cls, raw: dict[str, Any]) -> RecvPlan:
        return cls(**raw)


def draws_to_skip(vllm_xargs: Any) -> int:
    """The draws a continuation names in its ``vllm_xargs`` (vLLM's ``extra_args``), or 0."""
    n = vllm_xargs.get(DRAWS) if isinstance(vllm_xargs, dict) else None
    return n if isinstance(n, int) and not isinstance(n, bool) and n > 0 else 0


# -- lease questions ---------------------------------------------------------------------
def lease_question(remote_request_id: str) -> bytes:
    return json.dumps({"req": remote_request_id}).encode()


def read_question(frame: bytes) -> str | None:
    """The request id a lease question asks about, or None for anything malformed."""
    if len(frame) > _MAX_QUESTION:
        return None
    try:
        req = json.loads(frame)["req"]
    except Exception:
        return None
    return req if isinstance(req, str) and req else None


def lease_answer(req: str | None, verdict: str) -> bytes:
    return json.dumps({"req": req, "verdict": verdict}).encode()


def read_answer(frame: bytes) -> tuple[str, str] | None:
    """``(request id, verdict)`` of a lease answer, or None for anything malformed."""
    try:
        msg = json.loads(frame)
        req, verdict = msg["req"], msg["verdict"]
    except (ValueError, KeyError, TypeError):
        return None
    if not isinstance(req, str) or not isinstance(verdict, str):
        return None
    return req, verdict
