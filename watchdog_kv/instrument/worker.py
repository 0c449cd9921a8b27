"""The worker: its busy loop and model steps, timed into the step watch's beacon.

==============================================  =====================================
``multiproc_executor.WorkerProc.worker_busy_loop``  start-up ends
``gpu_worker.Worker.execute_model``             a model step (the CPU worker inherits
                                                it); it ran the model when tokens
                                                were scheduled
``gpu_worker.Worker.sample_tokens``             the second half of a step (not counted
                                                again)
``gpu_worker.Worker.execute_dummy_batch``       MoE data-parallel idle ranks' steps
==============================================  =====================================
"""

from __future__ import annotations

from typing import Any

from watchdog_kv.instrument.base import Instrumentor, Target, Wrapper
from watchdog_kv.instrument.engine_core import startup_ends, stepping
from watchdog_kv.step.watch import StepWatch

__all__ = ["WorkerInstrumentor"]

EXECUTOR_MODULE = "vllm.v1.executor.multiproc_executor"
WORKER_MODULE = "vllm.v1.worker.gpu_worker"


def _tokens_scheduled(result: Any, args: tuple[Any, ...]) -> bool:
    return bool(args) and getattr(args[0], "total_num_scheduled_tokens", 1) > 0


class WorkerInstrumentor(Instrumentor):
    name = "step.worker"
    targets = (
        Target(EXECUTOR_MODULE, "WorkerProc", "worker_busy_loop"),
        Target(WORKER_MODULE, "Worker", "execute_model"),
        Target(WORKER_MODULE, "Worker", "sample_tokens"),
        Target(WORKER_MODULE, "Worker", "execute_dummy_batch"),
    )

    def __init__(self, watch: StepWatch) -> None:
        super().__init__()
        self.watch = watch

    def wrapper(self, target: Target) -> Wrapper:
        if target.name == "worker_busy_loop":
            return startup_ends(self.watch)
        if target.name == "execute_model":
            return stepping(self.watch, "Worker.execute_model", model_ran=_tokens_scheduled)
        if target.name == "sample_tokens":
            # the second half of a step whose execute_model already counted
            return stepping(self.watch, "Worker.sample_tokens", model_ran=lambda r, a: False)
        return stepping(self.watch, "Worker.dummy_batch")
