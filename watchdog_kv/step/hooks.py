"""Installing the step watch into vLLM's engine core and worker (class level).

Post-import hooks, so nothing is touched before vLLM imports the module:

==========================================  =========================================
``vllm.v1.engine.core``                     ``EngineCoreProc.run_busy_loop`` (startup
                                            ends), ``EngineCoreProc._process_engine_step``
                                            (a step; vLLM calls it only with work),
                                            ``EngineCore.execute_dummy_batch`` (MoE
                                            data-parallel idle ranks)
``vllm.v1.executor.multiproc_executor``     ``WorkerProc.worker_busy_loop`` (startup ends)
``vllm.v1.worker.gpu_worker``               ``Worker.execute_model``, ``sample_tokens``,
                                            ``execute_dummy_batch`` (the CPU worker
                                            inherits them)
==========================================  =========================================

KV-connector calls are timed on the connector instance the KV hooks attach to
(:func:`watch_connector`). Every wrapper calls vLLM's method outside our own
bookkeeping, so vLLM's exceptions pass through untouched; :func:`uninstall`
puts the original attributes back.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import wrapt

from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.patching import ClassPatches, InstancePatches
from watchdog_kv.step.watch import StepWatch

__all__ = [
    "CONNECTOR_CALLS",
    "install",
    "install_front",
    "uninstall",
    "watch_connector",
]

ASYNC_LLM_MODULE = "vllm.v1.engine.async_llm"
ENGINE_MODULE = "vllm.v1.engine.core"
EXECUTOR_MODULE = "vllm.v1.executor.multiproc_executor"
WORKER_MODULE = "vllm.v1.worker.gpu_worker"
# The connector calls of a worker step that move KV or wait on its transport.
# vLLM 0.32's model runner asks get_transfer_results (NIXL's poll for the
# notifications of finished reads, a C call that holds the GIL); get_finished
# is what the base class's get_transfer_results calls for other connectors.
CONNECTOR_CALLS = (
    "handle_preemptions",
    "start_load_kv",
    "wait_for_save",
    "get_transfer_results",
    "get_finished",
    "get_block_ids_with_load_errors",
)

_lock = threading.RLock()
_watch: StepWatch | None = None
_patches = ClassPatches()
_instance_patches = InstancePatches()
_armed = False
_front_settings: Settings | None = None
_fronts: list[Any] = []


def install(watch: StepWatch) -> list[str]:
    """Arm the hooks for this process's ``watch`` (engine core or worker)."""
    global _watch, _armed
    with _lock:
        _watch = watch
        if not _armed:
            wrapt.register_post_import_hook(_patch_engine, ENGINE_MODULE)
            wrapt.register_post_import_hook(_patch_executor, EXECUTOR_MODULE)
            wrapt.register_post_import_hook(_patch_worker, WORKER_MODULE)
            _armed = True
    return ["step.engine_core", "step.worker", "step.connector"]


def install_front(settings: Settings) -> list[str]:
    """API server: start a stall guard (:mod:`.front`) for each ``AsyncLLM`` built here."""
    global _front_settings
    with _lock:
        if _front_settings is None:
            wrapt.register_post_import_hook(_patch_async_llm, ASYNC_LLM_MODULE)
        _front_settings = settings
    return ["step.front_guard"]


def _patch_async_llm(module: Any) -> None:
    def make(original: Any) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            settings = _front_settings
            if settings is None:
                return
            with contained("step.front_guard_start"):
                import asyncio

                from watchdog_kv.step.front import FrontGuard
                from watchdog_kv.telemetry import logs

                try:
                    loop = asyncio.get_running_loop()
                except RuntimeError:
                    return  # not serving from an event loop: nothing to answer early
                guard = FrontGuard(self, settings, loop)
                _fronts.append(guard)
                logs.set_recorder(guard.beacon.record)

        return __init__

    with _lock, contained("step.install"):
        if _front_settings is not None:
            _patches.replace(module.AsyncLLM, "__init__", make)


def uninstall() -> None:
    global _watch, _front_settings
    with _lock:
        for guard in _fronts:
            guard.stop()
        _fronts.clear()
        _front_settings = None
        _instance_patches.undo()
        _patches.undo()
        _watch = None


def _replace(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    with _lock, contained("step.install"):
        if _watch is not None and name in vars(owner):
            _patches.replace(owner, name, make)


def _startup_ends(original: Any) -> Any:
    def busy_loop(self: Any, *args: Any, **kwargs: Any) -> Any:
        watch = _watch
        if watch is not None:
            with contained("step.startup_end", on_error=watch.disable):
                watch.end_startup()
        return original(self, *args, **kwargs)

    return busy_loop


def _stepping(
    label: str,
    *,
    count_work: bool = False,
    rehearse: bool = False,
    model_ran: Callable[[Any, tuple[Any, ...]], bool] = lambda result, args: True,
) -> Any:
    def make(original: Any) -> Any:
        def step(self: Any, *args: Any, **kwargs: Any) -> Any:
            watch = _watch
            if watch is None or not watch.enabled:
                return original(self, *args, **kwargs)
            work = _work(self) if count_work else None
            with watch.step(label, work) as note:
                if rehearse:
                    watch.rehearse_step()
                result = original(self, *args, **kwargs)
                with contained("step.model_ran"):
                    note.model_ran = bool(model_ran(result, args))
                return result

        return step

    return make


def _no_count(result: Any, args: tuple[Any, ...]) -> bool:
    return False  # the second half of a step whose execute_model already counted


def _engine_executed(result: Any, args: tuple[Any, ...]) -> bool:
    return bool(result)  # _process_engine_step returns whether the model ran


def _tokens_scheduled(result: Any, args: tuple[Any, ...]) -> bool:
    return bool(args) and getattr(args[0], "total_num_scheduled_tokens", 1) > 0


def _work(engine: Any) -> int | None:
    try:
        running, waiting = engine.scheduler.get_request_counts()
        return int(running) + int(waiting)
    except Exception:
        return None


def _patch_engine(module: Any) -> None:
    _replace(module.EngineCoreProc, "run_busy_loop", _startup_ends)
    _replace(
        module.EngineCoreProc,
        "_process_engine_step",
        _stepping("EngineCore.step", count_work=True, model_ran=_engine_executed),
    )
    _replace(module.EngineCore, "execute_dummy_batch", _stepping("EngineCore.dummy_batch"))


def _patch_executor(module: Any) -> None:
    _replace(module.WorkerProc, "worker_busy_loop", _startup_ends)


def _patch_worker(module: Any) -> None:
    _replace(
        module.Worker,
        "execute_model",
        _stepping("Worker.execute_model", rehearse=True, model_ran=_tokens_scheduled),
    )
    _replace(module.Worker, "sample_tokens", _stepping("Worker.sample_tokens", model_ran=_no_count))
    _replace(module.Worker, "execute_dummy_batch", _stepping("Worker.dummy_batch"))


def watch_connector(connector: Any) -> None:
    """Time each KV-connector call of this (worker-side) connector instance."""
    watch = _watch
    if watch is None:
        return
    with _lock, contained("step.watch_connector"):
        for name in CONNECTOR_CALLS:
            if not callable(getattr(connector, name, None)):
                continue
            original = getattr(connector, name)
            _instance_patches.replace(connector, name, _timed_call(watch, name, original))


def _timed_call(watch: StepWatch, name: str, original: Callable[..., Any]) -> Callable[..., Any]:
    def call(*args: Any, **kwargs: Any) -> Any:
        with watch.connector_call(name):
            return original(*args, **kwargs)

    return call
