"""vLLM's scheduler: the KV recovery policy, applied to every scheduler built here.

``Scheduler.__init__``: after vLLM's own, a scheduler with a KV connector gets
``recompute_kv_load_failures`` from ``WATCHDOG_KV_KV_RECOVERY`` (``recompute``:
a load reported failed is computed locally; ``fail``: the request fails), without
touching the user's ``--kv-transfer-config``.
"""

from __future__ import annotations

from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.instrument.base import Instrumentor, Target, Wrapper
from watchdog_kv.telemetry import get_logger

__all__ = ["SchedulerInstrumentor"]

MODULE = "vllm.v1.core.sched.scheduler"

_log = get_logger("watchdog_kv.kv")


class SchedulerInstrumentor(Instrumentor):
    name = "kv.scheduler_recovery"
    targets = (Target(MODULE, "Scheduler", "__init__"),)

    def wrapper(self, target: Target) -> Wrapper:
        def __init__(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> None:
            wrapped(*args, **kwargs)
            with contained("kv.scheduler_recovery"):
                self._apply(instance)

        return __init__

    def _apply(self, scheduler: Any) -> None:
        if getattr(scheduler, "connector", None) is None:
            return
        policy = self.settings.kv_recovery
        before = getattr(scheduler, "recompute_kv_load_failures", None)
        scheduler.recompute_kv_load_failures = policy == "recompute"
        _log.info(
            "kv.recovery_policy", policy=policy, vllm_policy_was="recompute" if before else "fail"
        )
