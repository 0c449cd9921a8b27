"""Every instrumentor and the table of the vLLM methods they need.

:data:`TABLE` lists, per instrumentor, the vLLM attributes it wraps (or, for the
NIXL transport, wraps on each NIXL worker it finds); ``watchdog-kv doctor``
checks them all against the installed vLLM (:func:`missing`), and
docs/architecture.md lists them (a test keeps the two equal).
"""

from __future__ import annotations

from watchdog_kv.instrument.api_server import ApiServerInstrumentor
from watchdog_kv.instrument.base import Instrumentor, Target, missing_targets
from watchdog_kv.instrument.connector import ConnectorInstrumentor
from watchdog_kv.instrument.engine_core import EngineCoreInstrumentor
from watchdog_kv.instrument.faults import FaultInstrumentor
from watchdog_kv.instrument.model_runner import ModelRunnerInstrumentor
from watchdog_kv.instrument.nixl import WORKER_TARGETS, NixlInstrumentor
from watchdog_kv.instrument.openmp import OpenMPInstrumentor
from watchdog_kv.instrument.scheduler import SchedulerInstrumentor
from watchdog_kv.instrument.worker import WorkerInstrumentor

__all__ = ["INSTRUMENTORS", "TABLE", "missing"]

INSTRUMENTORS: tuple[type[Instrumentor], ...] = (
    ConnectorInstrumentor,
    SchedulerInstrumentor,
    EngineCoreInstrumentor,
    WorkerInstrumentor,
    ModelRunnerInstrumentor,
    ApiServerInstrumentor,
    NixlInstrumentor,
    OpenMPInstrumentor,
    FaultInstrumentor,
)

TABLE: dict[str, tuple[Target, ...]] = {
    **{cls.name: cls.targets for cls in INSTRUMENTORS},
    "kv.nixl_transport": WORKER_TARGETS,
}


def missing() -> list[str]:
    """The required vLLM attributes the installed vLLM lacks (imports their modules)."""
    seen: set[Target] = set()
    out = []
    for targets in TABLE.values():
        for target in targets:
            if target not in seen:
                seen.add(target)
                out += missing_targets([target], import_modules=True)
    return out
