"""Start-up progress: a live table on a terminal, log events otherwise.

Until every vLLM server is healthy the operator sees each one's state, elapsed
time and latest log line.
"""

from __future__ import annotations

import sys
import time
from typing import Any

from rich.console import Console
from rich.live import Live
from rich.table import Table

from watchdog_kv.telemetry import get_logger

__all__ = ["StartupProgress"]

_log = get_logger("watchdog_kv.supervisor")


class StartupProgress:
    """Collects per-server state; renders it live, or logs changes and a periodic line."""

    def __init__(self, names: list[str], *, live: bool | None = None, every_s: float = 15.0):
        self._rows: dict[str, dict[str, Any]] = {
            n: {"state": "waiting", "since": time.monotonic(), "line": ""} for n in names
        }
        self._t0 = time.monotonic()
        self._console = Console(file=sys.stderr)
        use_live = self._console.is_terminal if live is None else live
        self._live = (
            Live(self._table(), console=self._console, refresh_per_second=4, transient=False)
            if use_live
            else None
        )
        self._every = every_s
        self._last_log = 0.0

    def __enter__(self) -> StartupProgress:
        if self._live:
            self._live.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._live:
            self._live.update(self._table())
            self._live.__exit__(None, None, None)

    def update(self, name: str, state: str, line: str = "") -> None:
        row = self._rows[name]
        if state != row["state"]:
            row["state"], row["since"] = state, time.monotonic()
            if not self._live:
                _log.info(
                    "server.state",
                    server=name,
                    state=state,
                    elapsed_s=round(time.monotonic() - self._t0, 1),
                )
        if line:
            row["line"] = line
        if self._live:
            self._live.update(self._table())
        elif time.monotonic() - self._last_log >= self._every:
            self._last_log = time.monotonic()
            _log.info(
                "servers.starting",
                states={n: r["state"] for n, r in self._rows.items()},
                elapsed_s=round(time.monotonic() - self._t0, 1),
            )

    def _table(self) -> Table:
        table = Table(title="watchdog_kv: starting vLLM servers", expand=False)
        table.add_column("server")
        table.add_column("state")
        table.add_column("elapsed", justify="right")
        table.add_column("last log line", overflow="ellipsis", no_wrap=True, max_width=90)
        now = time.monotonic()
        for name, row in self._rows.items():
            style = {"ready": "green", "failed": "red"}.get(row["state"], "yellow")
            end = row["since"] if row["state"] in ("ready", "failed") else now
            table.add_row(
                name, f"[{style}]{row['state']}[/]", f"{end - self._t0:5.0f}s", row["line"][-90:]
            )
        return table
