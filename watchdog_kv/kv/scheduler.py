"""Scheduler side: tell the workers what each remote load is, advertise the lease check.

:class:`SchedulerWatch` wraps the scheduler-side methods of the connector vLLM
built, in the engine-core process:

* ``get_num_new_matched_tokens`` / ``update_state_after_alloc``: a request that
  will load KV asynchronously becomes a :class:`~watchdog_kv.kv.worker.RecvPlan`
  (blocks to load, remote engine and request, the prefill's lease servers);
* ``build_connector_meta``: the plans made since the last step ride to the
  workers on the connector metadata (attribute ``watchdog_kv_recv``);
* ``request_finished``: when the prefill keeps blocks for a decode, the
  ``kv_transfer_params`` it returns gain ``watchdog_kv_lease`` -- the addresses of
  this engine's lease servers -- so the decode can check its read -- and
  ``watchdog_kv_prompt``, a digest of the prompt's token ids;
* ``get_num_new_matched_tokens`` (decode side): parameters that do not hold
  together, or whose prompt digest is not this request's own prompt's (the KV of
  another prompt: a client or router that gave one request's parameters to
  another), are refused and the prompt is computed here.

:func:`patch_scheduler_recovery` makes vLLM's scheduler recompute failed loads
(``WATCHDOG_KV_KV_RECOVERY=recompute``) without touching the user's
``--kv-transfer-config``.
"""

from __future__ import annotations

import hashlib
import os
import time
from dataclasses import asdict
from typing import Any

from watchdog_kv import process
from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.kv.lease import LEASE_PARAM
from watchdog_kv.kv.spans import TRACE_ATTR
from watchdog_kv.kv.worker import RECV_PLAN_ATTR, RecvPlan
from watchdog_kv.patching import InstancePatches
from watchdog_kv.telemetry import get_logger, tracing

__all__ = [
    "PROMPT_PARAM",
    "SchedulerWatch",
    "bad_remote_params",
    "patch_scheduler_recovery",
    "prompt_digest",
]

# The key of the prompt's digest in kv_transfer_params (prefill -> decode).
PROMPT_PARAM = "watchdog_kv_prompt"


def prompt_digest(token_ids: Any) -> str | None:
    """A digest of a prompt's token ids (their count and a hash), or None without them."""
    try:
        ids = [int(t) for t in token_ids]
    except (TypeError, ValueError):
        return None
    raw = b"".join(t.to_bytes(4, "little", signed=True) for t in ids)
    return f"{len(ids)}:{hashlib.blake2b(raw, digest_size=12).hexdigest()}"


_log = get_logger("watchdog_kv.kv")


class SchedulerWatch:
    def __init__(self, connector: Any, settings: Settings) -> None:
        self.connector = connector
        self.settings = settings
        self.enabled = True
        self._async: dict[str, int] = {}  # req_id -> external tokens to load
        self._plans: dict[str, dict[str, Any]] = {}
        self._lease_traces: dict[str, str] = {}  # kept for a decode: the prefill call's trace
        self._lease_endpoints: list[str] | None = None
        self._lease_looked_at = 0.0
        self.leases_advertised = 0
        self.refused_params = 0
        # The parameter check knows NixlConnector's keys only (Mooncake, for one,
        # uses others): other connectors' parameters are passed on unchecked.
        self.nixl_params = "Nixl" in type(connector).__name__
        self._patches = InstancePatches()
        self._originals: dict[str, Any] = {}
        for name in (
            "get_num_new_matched_tokens",
            "update_state_after_alloc",
            "build_connector_meta",
        ):
            self._originals[name] = self._patches.replace(
                connector, name, getattr(self, f"_{name}")
            )
        # vLLM calls one or the other, depending on whether the connector supports HMA.
        for name in ("request_finished", "request_finished_all_groups"):
            if hasattr(connector, name):
                self._originals[name] = self._patches.replace(connector, name, self._finisher(name))

    def unhook(self) -> None:
        self._patches.undo()
        self._originals.clear()

    def _disable(self) -> None:
        self.enabled = False

    def _get_num_new_matched_tokens(self, request: Any, num_computed_tokens: int) -> Any:
        if self.enabled:
            with contained("kv.check_params", on_error=self._disable):
                self._refuse_bad_params(request)
        result = self._originals["get_num_new_matched_tokens"](request, num_computed_tokens)
        if self.enabled:
            with contained("kv.get_num_new_matched_tokens", on_error=self._disable):
                count, load_async = result
                if count and load_async:
                    self._async[request.request_id] = int(count)
        return result

    def _refuse_bad_params(self, request: Any) -> None:
        """Malformed remote-prefill parameters: compute the prompt here instead.

        Stock NixlConnector takes them as given; a block id list that is not a list
        of integers stops the whole decode engine. A request whose parameters do
        not hold together is computed locally -- the same answer -- and logged.
        """
        params = request.kv_transfer_params
        if not self.nixl_params or not isinstance(params, dict):
            return
        if not params.get("do_remote_prefill"):
            return
        problem = bad_remote_params(params) or _other_prompt(request, params)
        if problem is None:
            return
        _log.warning("kv.bad_transfer_params", request_id=request.request_id, problem=problem)
        parent = tracing.context_from(params.get(tracing.TRACE_PARAM))
        if parent is not None:
            with tracing.tracer("watchdog_kv.kv").start_as_current_span(
                "kv.params_refused", context=parent
            ) as span:
                tracing.label(
                    span,
                    "kv.bad_transfer_params",
                    "bad_input",
                    "compute the prompt here",
                    problem=problem,
                )
        request.kv_transfer_params = {**params, "do_remote_prefill": False}
        self.refused_params += 1

    def _update_state_after_alloc(self, request: Any, blocks: Any, num_external_tokens: int) -> Any:
        result = self._originals["update_state_after_alloc"](request, blocks, num_external_tokens)
        if self.enabled:
            with contained("kv.update_state_after_alloc", on_error=self._disable):
                tokens = self._async.pop(request.request_id, 0)
                if tokens and num_external_tokens > 0:
                    params = request.kv_transfer_params or {}
                    block_size = int(
                        getattr(request, "block_size", 0) or _block_size(self.connector)
                    )
                    ids = blocks.get_block_ids()
                    local = [int(b) for group in ids for b in group] if ids else []
                    lease = params.get(LEASE_PARAM)
                    plan = RecvPlan(
                        req_id=request.request_id,
                        num_blocks=-(-num_external_tokens // block_size)
                        if block_size
                        else len(local),
                        remote_engine_id=params.get("remote_engine_id"),
                        remote_request_id=params.get("remote_request_id"),
                        lease=list(lease) if isinstance(lease, list) else None,
                        local_blocks=local,
                        trace=_str_or_none(params.get(tracing.TRACE_PARAM)),
                    )
                    self._plans[request.request_id] = asdict(plan)
        return result

    def _build_connector_meta(self, scheduler_output: Any) -> Any:
        metadata = self._originals["build_connector_meta"](scheduler_output)
        if self.enabled and (self._plans or self._lease_traces):
            with contained("kv.build_connector_meta", on_error=self._disable):
                if self._plans:
                    setattr(metadata, RECV_PLAN_ATTR, self._plans)
                    self._plans = {}
                if self._lease_traces:
                    setattr(metadata, TRACE_ATTR, self._lease_traces)
                    self._lease_traces = {}
        return metadata

    def _finisher(self, name: str) -> Any:
        def finished(request: Any, block_ids: Any) -> Any:
            return self._request_finished(name, request, block_ids)

        return finished

    def _request_finished(self, name: str, request: Any, block_ids: Any) -> Any:
        delay_free, params = self._originals[name](request, block_ids)
        if self.enabled:
            with contained("kv.request_finished", on_error=self._disable):
                self._async.pop(request.request_id, None)
                if delay_free and params and params.get("do_remote_prefill"):
                    asked = request.kv_transfer_params or {}
                    traceparent = _str_or_none(asked.get(tracing.TRACE_PARAM))
                    if traceparent is not None and tracing.enabled():
                        self._lease_traces[request.request_id] = traceparent
                    digest = prompt_digest(getattr(request, "prompt_token_ids", None))
                    if digest is not None:
                        params = {**params, PROMPT_PARAM: digest}
                    endpoints = self._lease_servers()
                    if endpoints:
                        params = {**params, LEASE_PARAM: endpoints}
                        self.leases_advertised += 1
        return delay_free, params

    def _lease_servers(self) -> list[str] | None:
        """The lease servers of this engine's workers, from their status records."""
        if self._lease_endpoints is not None:
            return self._lease_endpoints
        now = time.monotonic()
        if now - self._lease_looked_at < 5:
            return None
        self._lease_looked_at = now
        found: dict[int, str] = {}
        me = os.getpid()
        for record in process.read_records(self.settings.state_dir):
            endpoint = (record.get("kv") or {}).get("lease_endpoint")
            if endpoint and record.get("ppid") == me and record["alive"]:
                found[int(record.get("rank") or 0)] = endpoint
        if not found:
            _log.warning("kv.lease_servers_not_found", hint="decodes will not check their reads")
            return None
        self._lease_endpoints = [found[r] for r in sorted(found)]
        _log.info("kv.lease_servers", endpoints=self._lease_endpoints)
        return self._lease_endpoints


_INT32 = 2**31


def _str_or_none(value: Any) -> str | None:
    return value if isinstance(value, str) and value else None


def _is_int(value: Any, low: int, high: int) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and low <= value < high


def bad_remote_params(params: dict[str, Any]) -> str | None:
    """Why NIXL-style remote-prefill ``kv_transfer_params`` cannot be used, or None."""
    for key in ("remote_engine_id", "remote_request_id", "remote_host"):
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
    if params.get(PROMPT_PARAM) is not None and not isinstance(params[PROMPT_PARAM], str):
        return f"{PROMPT_PARAM} must be a string, got {params[PROMPT_PARAM]!r}"[:200]
    lease = params.get(LEASE_PARAM)
    if lease is not None and not (
        isinstance(lease, list) and lease and all(isinstance(e, str) for e in lease)
    ):
        return f"{LEASE_PARAM} must be a list of addresses, got {lease!r}"[:200]
    return None


def _other_prompt(request: Any, params: dict[str, Any]) -> str | None:
    """Why the KV behind ``params`` is not this request's prompt's, or None (also when
    the prefill did not say whose it is: a prefill without watchdog_kv)."""
    theirs = params.get(PROMPT_PARAM)
    if theirs is None:
        return None
    mine = prompt_digest(getattr(request, "prompt_token_ids", None))
    if mine is None or mine == theirs:
        return None
    return (
        f"the KV belongs to another prompt (prefilled prompt {theirs}, this request's "
        f"{mine}); computing this prompt here"
    )


def _block_size(connector: Any) -> int:
    cfg = getattr(connector, "_vllm_config", None)
    return int(getattr(getattr(cfg, "cache_config", None), "block_size", 0) or 0)


def patch_scheduler_recovery(scheduler: Any, settings: Settings) -> None:
    """After vLLM's Scheduler.__init__: apply the KV recovery policy to this scheduler."""
    if getattr(scheduler, "connector", None) is None:
        return
    before = getattr(scheduler, "recompute_kv_load_failures", None)
    scheduler.recompute_kv_load_failures = settings.kv_recovery == "recompute"
    _log.info(
        "kv.recovery_policy",
        policy=settings.kv_recovery,
        vllm_policy_was="recompute" if before else "fail",
    )
