"""``watchdog-kv serve``: supervisor and router together, until a signal or a failure.

The router binds first (so a taken port is an error before any vLLM process
starts, and clients get 503 while the servers warm up), then the servers start.
A server that exits is restarted (:meth:`Supervisor.watch`); the service ends
with a non-zero code only when every decode (or plain) server has failed for
good. SIGINT or SIGTERM drains first -- new requests get 503, those in flight
finish, up to ``WATCHDOG_KV_DRAIN_TIMEOUT`` -- then stops every process that
was started; during start-up it stops at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
from collections.abc import Awaitable, Callable
from typing import Any

from watchdog_kv.config import Settings
from watchdog_kv.router import RouterServer
from watchdog_kv.router.app import INFLIGHT
from watchdog_kv.supervisor import ports
from watchdog_kv.supervisor.core import Supervisor
from watchdog_kv.supervisor.errors import StartupError
from watchdog_kv.supervisor.plan import ServeOptions
from watchdog_kv.telemetry import get_logger, tracing

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
    tracing.setup(settings.otel, "router")
    router = RouterServer(supervisor, settings, options.host, options.port)
    supervisor.on_detection = router.app[INFLIGHT].label

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
        failed = asyncio.ensure_future(supervisor.watch())
        code = await _race(work, stop, failed)
        if code == EXIT_INTERRUPTED:
            supervisor.draining = True
            await router.drain(settings.drain_timeout_s)
        elif failed.done() and not failed.cancelled():  # not the demo's own failure
            _log.error(
                "service.failed",
                reason="no server able to answer is left",
                servers={n: s.failure or {"state": s.state} for n, s in supervisor.servers.items()},
            )
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
        await asyncio.to_thread(tracing.shutdown)


def _on_signal(stop: asyncio.Event, sig: signal.Signals) -> None:
    _log.info("service.signal", signal=sig.name, action="stopping every process")
    stop.set()


async def _forever() -> int:
    await asyncio.Event().wait()
    return EXIT_OK


async def _race(
    work: Awaitable[int | None], stop: asyncio.Event, exited: asyncio.Future[Any] | None = None
) -> int | None:
    """Await ``work`` unless a stop signal or a server exit comes first.

    Returns None when ``work`` finished with None (start-up done), its exit code
    when it returned one, 130 when a signal came first, 1 when the service failed.
    """
    task = asyncio.ensure_future(work)
    stopper = asyncio.ensure_future(stop.wait())
    waiters: set[asyncio.Future[Any]] = {task, stopper}
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
