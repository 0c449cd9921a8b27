"""``watchdog-kv serve``: supervisor and router together, until a signal or a failure.

The router binds first (so a taken port is an error before any vLLM process
starts, and clients get 503 while the servers warm up), then the servers start.
SIGINT or SIGTERM at any point, start-up included, stops every process that was
started. A decode server that exits on its own ends the service with a non-zero
code; a prefill server that exits leaves it running, degraded (health 503).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable

from watchdog_kv.config import Settings
from watchdog_kv.router import RouterServer
from watchdog_kv.supervisor import ports
from watchdog_kv.supervisor.core import ServeOptions, StartupError, Supervisor
from watchdog_kv.telemetry import get_logger

__all__ = ["EXIT_FAILED", "EXIT_INTERRUPTED", "EXIT_OK", "run_service"]

_log = get_logger("watchdog_kv.supervisor")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_INTERRUPTED = 130

OnReady = Callable[[Supervisor, RouterServer], Awaitable[int]]


async def run_service(
    options: ServeOptions,
    settings: Settings,
    *,
    on_ready: OnReady | None = None,
    live: bool | None = None,
) -> int:
    """Run until interrupted (or until ``on_ready`` returns); return an exit code."""
    ports.check_free(options.host, options.port, "router")
    supervisor = Supervisor(options, settings)
    specs = supervisor.plan()
    router = RouterServer(supervisor, settings, options.host, options.port)

    loop = asyncio.get_running_loop()
    stop = asyncio.Event()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, _on_signal, stop, sig)
    try:
        await router.start()
        code = await _race(supervisor.start(specs, live=live), stop)
        if code is not None:
            return code
        _log.info(
            "service.ready",
            router=router.url,
            run_dir=str(supervisor.run_dir),
            servers={n: s.proc.pid for n, s in supervisor.servers.items()},
        )
        work = on_ready(supervisor, router) if on_ready else _forever()
        exited = asyncio.ensure_future(supervisor.wait_for_exit())
        code = await _race(work, stop, exited)
        if code == EXIT_INTERRUPTED and on_ready is None:
            return EXIT_OK  # serving until told to stop, and stopped cleanly
        return EXIT_OK if code is None else code
    except StartupError as exc:
        _log.error("service.startup_failed", error=str(exc))
        return EXIT_FAILED
    finally:
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.remove_signal_handler(sig)
        await router.stop()
        await supervisor.stop()


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    _log.info("service.signal", signal=sig.name, action="stopping every process")
    stop.set()


async def _forever() -> int:
    await asyncio.Event().wait()
    return EXIT_OK


async def _race(
    work: Awaitable[int | None], stop: asyncio.Event, exited: asyncio.Future[object] | None = None
) -> int | None:
    """Await ``work`` unless a stop signal or a server exit comes first.

    Returns None when ``work`` finished with None (start-up done), its exit code
    when it returned one, 130 when a signal came first, 1 when a server exited.
    """
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[object]] = {task, stopper}
    if exited is not None:
        waiters.add(exited)
    try:
        done, _ = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
    finally:
        for fut in waiters:
            if not fut.done():
                fut.cancel()
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await fut
    if task in done:
        return task.result()  # re-raises StartupError from start-up
    if exited is not None and exited in done:
        return EXIT_FAILED
    return EXIT_INTERRUPTED
