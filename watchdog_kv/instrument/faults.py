"""Fault injection for rehearsals, an instrumentor of its own: installed only when
``WATCHDOG_KV_FAULT`` is set (the faults and how they are armed:
:mod:`watchdog_kv.faults`). No other code path of watchdog_kv injects anything.

=========================================  ==========================================
where                                      fault
=========================================  ==========================================
registration of an API server              ``crash_start`` (exit before serving)
``gpu_worker.Worker.execute_model``        ``stall_step``, ``slow_step``,
                                           ``crash_step`` -- beneath the step
                                           watch's layer, so the step is seen late
``nixl_*._bindings.nixlAgent``             ``stall_notif``: the agent's
                                           ``genNotif`` blocks with the GIL held
each worker-side connector built           ``delay``, ``drop``, ``corrupt`` (the KV
                                           watch's :class:`~watchdog_kv.kv.worker.FaultHook`);
                                           ``stall_handshake`` on NIXL's handshake
=========================================  ==========================================
"""

from __future__ import annotations

import time
from typing import Any

import wrapt

from watchdog_kv import faults
from watchdog_kv.guard import contained
from watchdog_kv.instrument.base import Instrumentor, Target, Wrapper, wrap
from watchdog_kv.instrument.connector import Attached, ConnectorInstrumentor, _num_blocks
from watchdog_kv.instrument.nixl import NIXL_BINDINGS
from watchdog_kv.instrument.worker import WORKER_MODULE
from watchdog_kv.kv.worker import WorkerWatch
from watchdog_kv.telemetry import get_logger
from watchdog_kv.wire import RecvPlan

__all__ = ["FaultInstrumentor", "KVFaults", "attach_kv_faults"]

_log = get_logger("watchdog_kv.faults")


class KVFaults:
    """The KV faults of one worker-side connector (the decode's)."""

    def __init__(self, settings: Any, rank: int, connector: Any) -> None:
        self.plan = settings.fault
        self.dice = faults.FaultDice(settings.fault_seed + rank)
        self.connector = connector
        self.kv_caches: dict[str, Any] = {}

    def on_completed(self, req_id: str, plan: RecvPlan) -> tuple[str, float] | None:
        fault = self.plan
        if fault.corrupt_p and self.dice.roll(fault.corrupt_p):
            self._corrupt(plan.local_blocks)
            return ("corrupt", 0.0)
        if fault.drop_p and self.dice.roll(fault.drop_p):
            return ("drop", 0.0)
        if fault.delay_s:
            return ("delay", fault.delay_s)
        return None

    def _corrupt(self, blocks: list[int]) -> None:
        """Overwrite what arrived, so only a recompute gives the right answer."""
        import torch

        total = _num_blocks(self.connector)
        if not blocks or not total:
            return
        for tensor in self.kv_caches.values():
            dim = next((i for i, n in enumerate(tensor.shape) if n == total), None)
            if dim is not None:
                index = tensor.new_tensor(blocks, dtype=torch.long)
                tensor.index_fill_(dim, index, 7.0)


class _StallingNotifications(wrapt.ObjectProxy):  # type: ignore[misc,type-arg,unused-ignore]
    """NIXL's notification send, armed to block in C with the GIL held, the way the
    field's 30 s heartbeat stall did."""

    def __init__(self, agent: Any, settings: Any) -> None:
        super().__init__(agent)
        self._self_settings = settings

    def genNotif(self, *args: Any, **kwargs: Any) -> Any:
        s = self._self_settings
        faults.maybe_stall(s.fault, s.state_dir, s.server, "stall_notif")
        return self.__wrapped__.genNotif(*args, **kwargs)


class FaultInstrumentor(Instrumentor):
    name = "faults"
    targets = (
        Target(WORKER_MODULE, "Worker", "execute_model"),
        *(Target(m, "", "nixlAgent", optional=True) for m in NIXL_BINDINGS),
    )

    def __init__(self, role: str, connectors: ConnectorInstrumentor | None) -> None:
        super().__init__()
        self.role = role
        self.connectors = connectors

    def hooks(self) -> list[str]:
        return [f"faults:{self.settings.fault.describe()}"] if self.active else []

    def setup(self) -> None:
        s = self.settings
        _log.warning("kv.fault_injection_on", faults=s.fault.describe())
        if self.role == "api_server":
            faults.maybe_crash(s.fault, s.state_dir, s.server)
        if self.connectors is not None:
            self.connectors.on_connector.append(self._on_connector)

    def teardown(self) -> None:
        if self.connectors is not None and self._on_connector in self.connectors.on_connector:
            self.connectors.on_connector.remove(self._on_connector)

    def wrapper(self, target: Target) -> Wrapper:
        s = self.settings
        if target.name == "execute_model":

            def execute_model(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
                if s.fault.active:
                    with contained("step.rehearse"):  # a fault of the rehearsal's own stays ours
                        faults.rehearse_step(s.fault, s.state_dir, s.server)
                return wrapped(*args, **kwargs)

            return execute_model

        def nixl_agent(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            agent = wrapped(*args, **kwargs)
            return _StallingNotifications(agent, s) if s.fault.stall_notif_s > 0 else agent

        return nixl_agent

    def _on_connector(self, got: Attached) -> None:
        attach_kv_faults(got, self.settings)


def attach_kv_faults(got: Attached, settings: Any) -> None:
    """The KV faults of ``settings`` on one worker-side connector's watch."""
    if not isinstance(got.watch, WorkerWatch):
        return
    hook = KVFaults(settings, got.watch.rank, got.connector)
    got.watch.faults = hook

    def register(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
        caches = args[0] if args else kwargs["kv_caches"]
        hook.kv_caches = dict(caches)
        return wrapped(*args, **kwargs)

    got.layers.append(wrap(got.connector, "register_kv_caches", register))
    seconds = settings.fault.stall_handshake_s
    if got.transport is not None and seconds > 0:
        on_event = got.watch._event

        def handshake(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> Any:
            # Runs on NIXL's handshake thread, as a peer that does not answer would.
            with contained("kv.nixl_fault"):
                on_event("kv.fault_injected", fault="stall_handshake", seconds=seconds)
            time.sleep(seconds)
            return wrapped(*args, **kwargs)

        got.layers.append(wrap(got.transport.worker, "_nixl_handshake", handshake))
