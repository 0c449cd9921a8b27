"""The engine core: its busy loop and steps, timed into the step watch's beacon.

==========================================  =========================================
``EngineCoreProc.run_busy_loop``            start-up ends
``EngineCoreProc._process_engine_step``     a step (vLLM calls it only with work); it
                                            returns whether the model ran
``EngineCore.execute_dummy_batch``          MoE data-parallel idle ranks' steps
==========================================  =========================================
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.instrument.base import Instrumentor, Target, Wrapper
from watchdog_kv.step.watch import StepWatch

__all__ = ["EngineCoreInstrumentor", "startup_ends", "stepping"]

MODULE = "vllm.v1.engine.core"


def startup_ends(watch: StepWatch) -> Wrapper:
    def busy_loop(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        with contained("step.startup_end", on_error=watch.disable):
            watch.end_startup()
        return wrapped(*args, **kwargs)

    return busy_loop


def stepping(
    watch: StepWatch,
    label: str,
    *,
    work: Callable[[Any], int | None] | None = None,
    model_ran: Callable[[Any, tuple[Any, ...]], bool] = lambda result, args: True,
) -> Wrapper:
    """A step of ``label``: its phase in the beacon around vLLM's call, which runs
    outside our bookkeeping (its exceptions reach vLLM untouched)."""

    def step(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        if not watch.enabled:
            return wrapped(*args, **kwargs)
        count = work(instance) if work is not None else None
        with watch.step(label, count) as note:
            result = wrapped(*args, **kwargs)
            with contained("step.model_ran"):
                note.model_ran = bool(model_ran(result, args))
            return result

    return step


def _requests(engine: Any) -> int | None:
    try:
        running, waiting = engine.scheduler.get_request_counts()
        return int(running) + int(waiting)
    except Exception:
        return None


class EngineCoreInstrumentor(Instrumentor):
    name = "step.engine_core"
    targets = (
        Target(MODULE, "EngineCoreProc", "run_busy_loop"),
        Target(MODULE, "EngineCoreProc", "_process_engine_step"),
        Target(MODULE, "EngineCore", "execute_dummy_batch"),
    )

    def __init__(self, watch: StepWatch) -> None:
        super().__init__()
        self.watch = watch

    def wrapper(self, target: Target) -> Wrapper:
        if target.name == "run_busy_loop":
            return startup_ends(self.watch)
        if target.name == "_process_engine_step":
            # vLLM's _process_engine_step returns whether the model ran
            return stepping(
                self.watch, "EngineCore.step", work=_requests, model_ran=lambda r, a: bool(r)
            )
        return stepping(self.watch, "EngineCore.dummy_batch")
