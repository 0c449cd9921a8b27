"""Scheduler side: tell the workers what each remote load is, advertise the lease check.

:class:`SchedulerWatch` is told, on plain data, what the scheduler-side
connector vLLM built does in the engine-core process
(:mod:`watchdog_kv.instrument.connector` wraps the connector and calls it):

* a request that will load KV asynchronously (:meth:`~SchedulerWatch.matched`,
  then :meth:`~SchedulerWatch.allocated`) becomes a :class:`~watchdog_kv.wire.RecvPlan`
  (blocks to load, remote engine and request, the prefill's lease servers);
* the plans made since the last step ride to the workers on the connector
  metadata (:meth:`~SchedulerWatch.metadata_extras`);
* when the prefill keeps blocks for a decode (:meth:`~SchedulerWatch.finished`),
  the ``kv_transfer_params`` it returns gain :data:`~watchdog_kv.wire.LEASE` -- the
  addresses of this engine's lease servers -- so the decode can check its read --
  and :data:`~watchdog_kv.wire.PROMPT`, a digest of the prompt's token ids;
* on the decode side (:meth:`~SchedulerWatch.check_params`), parameters that do
  not hold together, or whose prompt digest is not this request's own prompt's
  (the KV of another prompt: a client or router that gave one request's
  parameters to another), are refused and the prompt is computed here.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict
from typing import Any

from watchdog_kv import process, wire
from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.telemetry import get_logger, tracing
from watchdog_kv.wire import RecvPlan, str_or_none

__all__ = ["SchedulerWatch"]

_log = get_logger("watchdog_kv.kv")


class SchedulerWatch:
    def __init__(self, settings: Settings, connector: str = "") -> None:
        self.connector = connector  # the connector's class name
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
        self.nixl_params = "Nixl" in connector

    def _disable(self) -> None:
        self.enabled = False

    def check_params(
        self, request_id: str, params: Any, prompt_token_ids: Any
    ) -> dict[str, Any] | None:
        """Malformed remote-prefill parameters: the parameters to use instead (the
        prompt computed here), or None to keep them.

        Stock NixlConnector takes them as given; a block id list that is not a list
        of integers stops the whole decode engine. A request whose parameters do
        not hold together is computed locally -- the same answer -- and logged.
        """
        if not self.enabled:
            return None
        with contained("kv.check_params", on_error=self._disable):
            if not self.nixl_params or not isinstance(params, dict):
                return None
            if not params.get(wire.DO_REMOTE_PREFILL):
                return None
            problem = wire.bad_remote_params(params) or wire.other_prompt(params, prompt_token_ids)
            if problem is None:
                return None
            _log.warning("kv.bad_transfer_params", request_id=request_id, problem=problem)
            parent = tracing.context_from(params.get(wire.TRACE))
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
            self.refused_params += 1
            return {**params, wire.DO_REMOTE_PREFILL: False}
        return None

    def matched(self, request_id: str, count: int, load_async: bool) -> None:
        """The connector will load ``count`` tokens of ``request_id`` (asynchronously?)."""
        if self.enabled and count and load_async:
            self._async[request_id] = int(count)

    def awaiting(self, request_id: str) -> bool:
        """Whether ``request_id`` will load KV asynchronously (its plan is wanted)."""
        return self.enabled and request_id in self._async

    def allocated(
        self,
        request_id: str,
        params: Any,
        local_blocks: list[int],
        num_external_tokens: int,
        block_size: int,
    ) -> None:
        """Blocks were allocated for ``request_id``'s load: its plan for the workers."""
        if not self.enabled:
            return
        with contained("kv.update_state_after_alloc", on_error=self._disable):
            tokens = self._async.pop(request_id, 0)
            if tokens and num_external_tokens > 0:
                blocks = -(-num_external_tokens // block_size) if block_size else len(local_blocks)
                plan = RecvPlan.from_params(
                    request_id, params if isinstance(params, dict) else {}, blocks, local_blocks
                )
                self._plans[request_id] = asdict(plan)

    def metadata_extras(self) -> dict[str, Any]:
        """Attributes to put on this step's connector metadata (the wire's)."""
        extras: dict[str, Any] = {}
        if self.enabled and (self._plans or self._lease_traces):
            if self._plans:
                extras[wire.RECV_PLANS], self._plans = self._plans, {}
            if self._lease_traces:
                extras[wire.LEASE_TRACES], self._lease_traces = self._lease_traces, {}
        return extras

    def finished(
        self,
        request_id: str,
        delay_free: bool,
        params: Any,
        asked: Any,
        prompt_token_ids: Any,
    ) -> Any:
        """The request finished; vLLM's connector keeps its blocks (``delay_free``) and
        returns ``params`` for a decode. Returns the parameters to return instead."""
        if not self.enabled:
            return params
        with contained("kv.request_finished", on_error=self._disable):
            self._async.pop(request_id, None)
            if delay_free and params and params.get(wire.DO_REMOTE_PREFILL):
                asked = asked if isinstance(asked, dict) else {}
                traceparent = str_or_none(asked.get(wire.TRACE))
                if traceparent is not None and tracing.enabled():
                    self._lease_traces[request_id] = traceparent
                digest = wire.prompt_digest(prompt_token_ids)
                if digest is not None:
                    params = {**params, wire.PROMPT: digest}
                endpoints = self._lease_servers()
                if endpoints:
                    params = {**params, wire.LEASE: endpoints}
                    self.leases_advertised += 1
        return params

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
