"""vLLM's OpenMP manager (engine core): the cores its workers' threads are bound to.

``OMPProcessManager._parse_omp_threads_bind_env``: after vLLM's own choice, the
policy of :mod:`watchdog_kv.host.cpus` claims those cores host-wide and, on
vLLM's ``auto`` choice, moves off cores other servers hold.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from watchdog_kv.guard import contained
from watchdog_kv.host import cpus
from watchdog_kv.instrument.base import Instrumentor, Target, Wrapper

__all__ = ["OpenMPInstrumentor"]


class OpenMPInstrumentor(Instrumentor):
    name = "host.cpu_claims"
    targets = (Target(cpus.OMP_MODULE, "OMPProcessManager", "_parse_omp_threads_bind_env"),)

    def __init__(self, server: str | None, publish: Callable[[dict[str, Any]], None]) -> None:
        super().__init__()
        self.server, self.publish = server, publish

    def hooks(self) -> list[str]:
        return ["host.cpu_claims"] if self.active else []

    def wrapper(self, target: Target) -> Wrapper:
        def parse(wrapped: Any, instance: Any, args: Any, kwargs: Any) -> None:
            wrapped(*args, **kwargs)  # vLLM's own choice first; ours only adjusts it
            with contained("host.cpu_claims"):
                self._claim(instance)

        return parse

    def _claim(self, manager: Any) -> None:
        if getattr(manager, "skip_setup", True) or not getattr(manager, "cpu_lists", None):
            return
        lists = [list(map(int, rank)) for rank in manager.cpu_lists]
        reserved = {int(c) for c in getattr(manager, "reserved_cpu_list", None) or []}
        cores = cpus.claim_for(lists, bool(manager.auto_setup), reserved, self.server, self.publish)
        if cores is not None:
            manager.cpu_lists = cores
