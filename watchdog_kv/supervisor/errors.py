"""Why the service could not be brought up: the errors start-up and restarts raise.

Every error of start-up is a :class:`StartupError` whose message says what to
fix; a restart attempt that raises one has failed and is retried (or the
server given up on) by the restart policy. Backends add their own
(:class:`watchdog_kv.supervisor.ray.RayBackendError`).
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    from watchdog_kv.monitor.crashes import Crash

__all__ = ["ServerExitedError", "ServerStartTimeout", "StartupError"]


class StartupError(RuntimeError):
    """The service could not be brought up; the message says why."""


class ServerExitedError(StartupError):
    """A server died before it was healthy: its API server exited or its engine is gone."""

    def __init__(
        self,
        name: str,
        code: int | None,
        tail: list[str],
        log_path: Path,
        crash: Crash | None = None,
    ):
        lines = "\n".join(f"    {ln}" for ln in tail) or "    (no output)"
        how = f"exited with code {code}" if code is not None else "lost its engine"
        why = f" ({crash.describe()})" if crash is not None and crash.signal else ""
        super().__init__(f"vLLM server {name} {how}{why}; last log lines ({log_path}):\n{lines}")
        self.name, self.code, self.tail, self.crash = name, code, tail, crash


class ServerStartTimeout(StartupError):
    """A server was not healthy within the start-up timeout."""

    def __init__(self, name: str, timeout_s: float, tail: list[str], log_path: Path):
        lines = "\n".join(f"    {ln}" for ln in tail) or "    (no output)"
        super().__init__(
            f"vLLM server {name} was not healthy within {timeout_s:g} s; last log lines "
            f"({log_path}):\n{lines}"
        )
        self.name, self.tail = name, tail
