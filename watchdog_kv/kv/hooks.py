"""Installing and removing the KV-transfer hooks in a vLLM process.

:func:`install` arms two post-import hooks; nothing is patched until vLLM
imports the modules, and a process that never builds a KV connector is never
touched:

* ``KVConnectorFactory.create_connector`` -- every connector vLLM builds, of
  whatever class the user's ``--kv-transfer-config`` names, gets a
  :class:`~watchdog_kv.kv.scheduler.SchedulerWatch` (scheduler role) or a
  :class:`~watchdog_kv.kv.worker.WorkerWatch` (worker role) on its instance;
* ``Scheduler.__init__`` -- the KV recovery policy
  (:func:`~watchdog_kv.kv.scheduler.patch_scheduler_recovery`);
* ``nixl_cu*._bindings.nixlAgent`` -- NIXL's Python API creates every agent with
  ``pthrDelay = 0``, so its UCX progress thread polls with a zero timeout: a
  busy loop taking one full core per vLLM worker, idle or not (measured: 1.96
  cores for two idle agents). With ``WATCHDOG_KV_NIXL_PROGRESS_DELAY_US`` > 0 the
  agent gets that poll timeout instead; the thread still wakes on UCX's event
  file descriptors, so transfers and notifications are not delayed by it.

:func:`uninstall` restores the original class attributes and removes every
instance wrapper, so the objects behave exactly as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any

import wrapt

from watchdog_kv import faults
from watchdog_kv.config import Settings
from watchdog_kv.guard import contained
from watchdog_kv.patching import ClassPatches
from watchdog_kv.telemetry import get_logger

__all__ = ["FACTORY_MODULE", "SCHEDULER_MODULE", "install", "uninstall", "watches"]

FACTORY_MODULE = "vllm.distributed.kv_transfer.kv_connector.factory"
SCHEDULER_MODULE = "vllm.v1.core.sched.scheduler"
NIXL_BINDINGS = ("nixl_cu12._bindings", "nixl_cu13._bindings", "nixl_rocm._bindings")

_log = get_logger("watchdog_kv.kv")
_lock = threading.RLock()
_settings: Settings | None = None
_rank: int = 0
_publish: Callable[[dict[str, Any]], None] | None = None
_patches = ClassPatches()
_watches: list[Any] = []
_held_back: set[int] = set()  # ids of watches with a change the throttle has not published
_armed_hooks = False


def install(
    settings: Settings, rank: int | None, publish: Callable[[dict[str, Any]], None]
) -> list[str]:
    """Arm the hooks in this process; ``publish`` receives the watch's status when it changes."""
    global _settings, _rank, _publish, _armed_hooks
    with _lock:
        _settings, _rank, _publish = settings, rank or 0, publish
        if not _armed_hooks:
            wrapt.register_post_import_hook(_patch_factory, FACTORY_MODULE)
            wrapt.register_post_import_hook(_patch_scheduler, SCHEDULER_MODULE)
            for name in NIXL_BINDINGS:
                wrapt.register_post_import_hook(_patch_nixl_agent, name)
            _armed_hooks = True
    hooks = ["kv.connector_factory", "kv.scheduler_recovery"]
    if settings.nixl_progress_delay_us:
        hooks.append("kv.nixl_progress_delay")
    return hooks


def uninstall() -> None:
    """Restore every patched attribute and unwrap every watched connector."""
    global _settings
    with _lock:
        for watch in _watches:
            watch.unhook()
        _watches.clear()
        _held_back.clear()
        _patches.undo()
        _settings = None


def watches() -> list[Any]:
    with _lock:
        return list(_watches)


def _replace(owner: Any, name: str, make: Callable[[Any], Any]) -> None:
    """Set ``owner.name`` to ``make(original)``, remembering the original for uninstall."""
    with _lock, contained("kv.install"):
        if _settings is None:
            return
        _patches.replace(owner, name, make)


def _patch_factory(module: Any) -> None:
    def make(original: Any) -> Any:
        def create_connector(klass: Any, *args: Any, **kwargs: Any) -> Any:
            connector = original.__func__(klass, *args, **kwargs)
            role = kwargs.get("role", args[1] if len(args) > 1 else None)
            _attach(connector, getattr(role, "name", str(role)))
            return connector

        return classmethod(create_connector)

    _replace(module.KVConnectorFactory, "create_connector", make)


def _patch_scheduler(module: Any) -> None:
    def make(original: Any) -> Any:
        def __init__(self: Any, *args: Any, **kwargs: Any) -> None:
            original(self, *args, **kwargs)
            settings = _settings
            if settings is not None:
                with contained("kv.scheduler_recovery"):
                    from watchdog_kv.kv.scheduler import patch_scheduler_recovery

                    patch_scheduler_recovery(self, settings)

        return __init__

    _replace(module.Scheduler, "__init__", make)


def _patch_nixl_agent(module: Any) -> None:
    settings = _settings
    if settings is None:
        return
    delay = settings.nixl_progress_delay_us
    stall_notif = settings.fault.stall_notif_s > 0
    if not delay and not stall_notif:
        return

    def make(original: Any) -> Any:
        def nixl_agent(name: str, agent_config: Any) -> Any:
            with contained("kv.nixl_progress_delay"):
                if delay and getattr(agent_config, "pthrDelay", None) == 0:
                    agent_config.pthrDelay = delay
                    _log.info("kv.nixl_progress_delay", agent=name, delay_us=delay)
            agent = original(name, agent_config)
            if stall_notif:
                return _StallingNotifications(agent, settings)
            return agent

        return nixl_agent

    _replace(module, "nixlAgent", make)


class _StallingNotifications(wrapt.ObjectProxy):  # type: ignore[misc,type-arg,unused-ignore]
    """Rehearsals only (``stall_notif`` fault): NIXL's notification send, armed to block
    in C with the GIL held, the way the field's 30 s heartbeat stall did."""

    def __init__(self, agent: Any, settings: Settings) -> None:
        super().__init__(agent)
        self._self_settings = settings

    def genNotif(self, *args: Any, **kwargs: Any) -> Any:
        s = self._self_settings
        faults.maybe_stall(s.fault, s.state_dir, s.server, "stall_notif")
        return self.__wrapped__.genNotif(*args, **kwargs)


def _attach(connector: Any, role: str) -> None:
    settings = _settings
    if settings is None:
        return
    with contained("kv.attach"):
        if role == "SCHEDULER":
            from watchdog_kv.kv.scheduler import SchedulerWatch

            watch: Any = SchedulerWatch(connector, settings)
        elif role == "WORKER":
            from watchdog_kv.kv.worker import WorkerWatch

            watch = WorkerWatch(connector, settings, _rank)
            watch.on_change = _throttled_publisher(watch)
            from watchdog_kv.step import hooks as step_hooks

            step_hooks.watch_connector(connector)
        else:
            return
        with _lock:
            _watches.append(watch)
        _log.info("kv.watching", connector=type(connector).__name__, side=role.lower())
        _report(watch, role.lower())


def _report(watch: Any, side: str) -> None:
    """Publish the watch's status (workers have one) into the process's status record."""
    if _publish is None:
        return
    status = getattr(watch, "status", None)
    extra = status() if status is not None else {}
    _publish({"side": side, "connector": type(watch.connector).__name__, **extra})


def _throttled_publisher(watch: Any) -> Callable[[], None]:
    """At most one status write a second from the engine step; a change held back is
    written by :func:`flush`."""
    last = [0.0]

    def changed() -> None:
        now = time.monotonic()
        with _lock:
            if now - last[0] < 1.0:
                _held_back.add(id(watch))
                return
            last[0] = now
            _held_back.discard(id(watch))
        _report(watch, "worker")

    return changed


def flush() -> None:
    """Publish the status changes the throttle held back (the plugin calls this every few
    seconds from its own thread), so the status record ends up with the last state."""
    with _lock:
        due = [w for w in _watches if id(w) in _held_back]
        _held_back.clear()
    for watch in due:
        with contained("kv.status"):
            _report(watch, "worker")
