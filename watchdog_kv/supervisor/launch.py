"""Where a vLLM server runs: a local child process, or a Ray actor on a cluster node.

The supervisor's restart policy, readiness gate and status do not care which:
both backends give it a :class:`ServerProcess` -- start it, poll its exit code,
read its log tail, stop it whole. ``url`` is where the server answers once
started (a Ray actor binds on its node's address, known only after placement).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any, Protocol

from watchdog_kv.supervisor.process import ManagedProcess
from watchdog_kv.supervisor.servers import ServerSpec

__all__ = ["LocalServer", "ServerProcess"]


class ServerProcess(Protocol):
    name: str
    spec: ServerSpec

    @property
    def pid(self) -> int | None: ...

    @property
    def url(self) -> str: ...

    @property
    def log_path(self) -> Path: ...

    def start(self) -> None:
        """Launch the server (again, after a stop); returns once it is spawned."""

    def poll(self) -> int | None:
        """Its exit code once the server (or what hosts it) has died, else None."""

    def tail(self, lines: int = 20) -> list[str]: ...

    def stop(self, grace: float = 20.0) -> list[int]:
        """Stop it whole; return the pids that had to be killed."""

    def where(self) -> dict[str, Any]:
        """Where it runs, for status: host, node, actor -- whatever applies."""


class LocalServer:
    """A vLLM server as a child process tree of the supervisor."""

    def __init__(self, spec: ServerSpec, run_dir: Path) -> None:
        self.name = spec.name
        self.spec = spec
        self._proc = ManagedProcess(
            spec.name,
            spec.argv(),
            spec.env(os.environ, run_dir),
            run_dir / "logs" / f"{spec.name}.log",
        )

    @property
    def pid(self) -> int | None:
        return self._proc.pid

    @property
    def url(self) -> str:
        return self.spec.url

    @property
    def log_path(self) -> Path:
        return self._proc.log_path

    def start(self) -> None:
        self._proc.start()

    def poll(self) -> int | None:
        return self._proc.poll()

    def tail(self, lines: int = 20) -> list[str]:
        return self._proc.tail(lines)

    def stop(self, grace: float = 20.0) -> list[int]:
        return self._proc.stop(grace)

    def where(self) -> dict[str, Any]:
        return {"backend": "local", "host": self.spec.host}
