"""The supervisor: starts stock vLLM servers, watches them, restarts them, stops them.

The servers are planned by :mod:`~watchdog_kv.supervisor.plan`; each runs where
its launcher puts it (:mod:`~watchdog_kv.supervisor.launch`): a local process
tree, or a Ray actor in its own placement group
(:mod:`~watchdog_kv.supervisor.ray`). Each server's state moves only by the
events of :mod:`~watchdog_kv.supervisor.lifecycle`.

Start-up is bounded: each server must answer ``GET /health`` with 200 within
``startup_timeout_s``. A server whose process exits first, or that is not
healthy in time, is a :class:`~watchdog_kv.supervisor.errors.StartupError`
naming it with its last log lines, and every process already started is
stopped before the error is raised.

Once running, :meth:`Supervisor.watch` restarts a server that dies: its API
server exits, or an engine core or worker of it is gone (a crash: see
:mod:`~watchdog_kv.supervisor.deaths`; the crash incident is written first,
and a server that crashes twice in a row with the same signal in the same
frame is marked failed with that diagnosis instead of being restarted again).
The step watchdog's monitor (:mod:`watchdog_kv.monitor.watcher`, run here,
outside every vLLM process) makes health honest (:meth:`Supervisor.health`:
live, ready and progressing per server) and, under
``WATCHDOG_KV_STALL_ACTION=restart``, a stalled server is restarted once its
incident is written. A restart kills what is left of the server, starts it
again and is done only when it is ready; failed attempts are retried, and a
server is given up on, by the policy of
:mod:`~watchdog_kv.supervisor.restarts`. The service ends only when no server
able to answer (decode or plain) is left.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import RetryCallState

from watchdog_kv import process as procrecords
from watchdog_kv.config import Settings
from watchdog_kv.monitor.crashes import Crash
from watchdog_kv.monitor.watcher import Monitor
from watchdog_kv.router.handoff import Backend
from watchdog_kv.stalls import Stall, engine_rank
from watchdog_kv.supervisor import deaths, lifecycle
from watchdog_kv.supervisor.errors import ServerExitedError, ServerStartTimeout, StartupError
from watchdog_kv.supervisor.launch import LocalServer, ServerProcess
from watchdog_kv.supervisor.lifecycle import (
    COMING_BACK,
    IllegalTransition,
    ServerEvent,
    ServerState,
)
from watchdog_kv.supervisor.plan import ServeOptions, plan
from watchdog_kv.supervisor.progress import StartupProgress
from watchdog_kv.supervisor.ray.server import RayServer
from watchdog_kv.supervisor.restarts import RestartPolicy, stable
from watchdog_kv.supervisor.servers import ServerSpec
from watchdog_kv.telemetry import get_logger, tracing

__all__ = [
    "ServeOptions",
    "ServerExitedError",
    "ServerStartTimeout",
    "StartupError",
    "Supervisor",
]

_log = get_logger("watchdog_kv.supervisor")

SERVING_ROLES = ("decode", "plain")  # the roles that answer clients


class _Refused(Exception):
    """A restart attempt the server's lifecycle does not allow: it ends the restart."""


@dataclass
class _Server:
    spec: ServerSpec
    proc: ServerProcess
    state: ServerState = ServerState.WAITING  # moved by lifecycle events only
    started_at: float = 0.0
    ready_after_s: float | None = None
    ready_since: float | None = None
    exit_code: int | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)
    streak: int = 0  # restarts since the server was last stable
    starts: int = 0
    failure: dict[str, Any] | None = None
    started_wall: float = 0.0  # time.time() at the last start: its processes register after
    log_offset: int = 0  # the log's size at the last start: what came after is this run's
    last_crash: Crash | None = None  # the previous death, for the same-crash rule
    death: tuple[int | None, list[dict[str, Any]], str] | None = None  # the last, unhandled
    crashes: list[dict[str, Any]] = field(default_factory=list)


class Supervisor:
    def __init__(self, options: ServeOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.run_dir = options.run_dir or _new_run_dir(settings.state_dir)
        self.servers: dict[str, _Server] = {}
        self._stopping = False
        self.draining = False
        self.monitor: Monitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restarting: set[str] = set()
        self._background: set[asyncio.Future[Any]] = set()
        self._changed = asyncio.Event()
        self._up = False  # start-up done: every server was ready once
        self.restarts = RestartPolicy(settings.restart_backoff_s, settings.restart_limit)
        # the router's requests on a server, told of what happens to it (set by the service)
        self.on_detection: Callable[..., int] | None = None

    def _detected(self, server: str, name: str, cause: str, action: str, **attrs: Any) -> None:
        """A detection about ``server``: a span of its own, and an event on the trace of
        every request that is on that server now (event loop only)."""
        told = 0
        if self.on_detection is not None:
            told = self.on_detection(server, name, cause, action, **attrs)
        with _tracer().start_as_current_span(name) as span:
            tracing.label(span, name, cause, action, server=server, requests_told=told, **attrs)

    # -- planning -----------------------------------------------------------------
    def plan(self) -> list[ServerSpec]:
        """Check ports and build the server specs; raises before anything starts."""
        return plan(self.options, self.settings)

    def _launcher(self, spec: ServerSpec) -> ServerProcess:
        if self.options.backend == "ray":
            return RayServer(
                spec,
                self.run_dir,
                address=self.options.ray_address,
                placement_timeout_s=self.options.placement_timeout_s,
            )
        return LocalServer(spec, self.run_dir)

    # -- lifecycle ------------------------------------------------------------------
    def _move(self, srv: _Server, event: ServerEvent) -> bool:
        """Apply ``event`` to ``srv``'s lifecycle; False (logged, nothing changed) if the
        table does not allow it in the server's state."""
        try:
            srv.state = lifecycle.apply(srv.spec.name, srv.state, event)
        except IllegalTransition as exc:
            # a stopped server's late events are expected while the service stops
            late = exc.state == ServerState.STOPPED
            (_log.debug if late else _log.warning)(
                "server.transition_refused",
                server=srv.spec.name,
                state=exc.state,
                lifecycle_event=exc.event,
            )
            return False
        self._changed.set()
        return True

    async def start(self, specs: list[ServerSpec], *, live: bool | None = None) -> None:
        """Start every server and wait until all are healthy (or raise StartupError)."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        for spec in specs:
            self.servers[spec.name] = _Server(spec, self._launcher(spec))
        _log.info(
            "supervisor.starting",
            run_dir=str(self.run_dir),
            backend=self.options.backend,
            servers={s.name: s.url for s in specs},
            model=str(self.options.model),
        )
        self._start_monitor()
        with StartupProgress(list(self.servers), live=live) as progress:
            for srv in self.servers.values():
                progress.update(srv.spec.name, "starting")
                await self._spawn(srv)
            async with aiohttp.ClientSession() as http:
                await asyncio.gather(
                    *(self._wait_ready(http, s, progress) for s in self.servers.values())
                )
        self._up = True

    async def _spawn(self, srv: _Server, **fields: Any) -> bool:
        """Start ``srv``'s processes; False if its lifecycle does not allow it."""
        if not self._move(srv, ServerEvent.SPAWN):
            return False
        srv.exit_code = None
        srv.starts += 1
        srv.started_at = time.monotonic()
        srv.started_wall = time.time()
        srv.log_offset = deaths.log_size(srv.proc.log_path)
        await asyncio.to_thread(srv.proc.start)  # a Ray placement may take a while
        srv.started_at = time.monotonic()
        self._changed.set()
        _log.info(
            "server.spawned",
            server=srv.spec.name,
            pid=srv.proc.pid,
            url=srv.proc.url,
            log=str(srv.proc.log_path),
            **srv.proc.where(),
            **fields,
        )
        return True

    async def _wait_ready(
        self, http: aiohttp.ClientSession, srv: _Server, progress: StartupProgress
    ) -> None:
        deadline = srv.started_at + self.options.startup_timeout_s
        url = f"{srv.proc.url}/health"
        while True:
            code = srv.proc.poll()
            tail = srv.proc.tail(1)
            dead = self._dead_engines(srv)
            if code is not None or dead:  # "failed" is the verdict of start() or restart()
                self._move(srv, ServerEvent.EXIT)
                srv.exit_code = code
                progress.update(srv.spec.name, "failed", tail[-1] if tail else "")
                crash = await self._examine(srv, code, dead)
                raise ServerExitedError(
                    srv.spec.name, code, srv.proc.tail(25), srv.proc.log_path, crash
                )
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        if not self._move(srv, ServerEvent.HEALTHY):
                            return  # no longer starting: stopped, or being restarted
                        srv.ready_since = time.monotonic()
                        srv.ready_after_s = srv.ready_since - srv.started_at
                        progress.update(srv.spec.name, "ready", tail[-1] if tail else "")
                        _log.info(
                            "server.ready",
                            server=srv.spec.name,
                            after_s=round(srv.ready_after_s, 1),
                        )
                        return
            except (TimeoutError, aiohttp.ClientError):
                pass
            if time.monotonic() >= deadline:
                progress.update(srv.spec.name, "failed", tail[-1] if tail else "")
                raise ServerStartTimeout(
                    srv.spec.name,
                    self.options.startup_timeout_s,
                    srv.proc.tail(25),
                    srv.proc.log_path,
                )
            progress.update(srv.spec.name, "starting", tail[-1] if tail else "")
            await asyncio.sleep(0.5)

    # -- the monitor and what its verdicts do ---------------------------------------------
    def _start_monitor(self) -> None:
        self._loop = asyncio.get_running_loop()
        self.monitor = Monitor(
            self.run_dir,
            self.settings.dump_dir or self.run_dir / "dumps",
            interval_s=self.settings.monitor_interval_s,
            on_stall=self._stall_seen,
        )
        self.monitor.start()

    def _stall_seen(self, stall: Stall) -> None:  # monitor thread
        if self._loop is None:
            return
        self._loop.call_soon_threadsafe(self._stall_traced, stall)
        if self.settings.stall_action == "restart":
            self._loop.call_soon_threadsafe(self._schedule_restart_after_stall, stall)

    def _stall_traced(self, stall: Stall) -> None:
        if stall.server is not None:
            self._detected(
                str(stall.server),
                "watchdog.stall_detected",
                "stall",
                self.settings.stall_action,
                stall=stall.describe(),
                pid=stall.pid,
            )

    def _schedule_restart_after_stall(self, stall: Stall) -> None:
        if stall.server is not None:
            self._schedule(str(stall.server), self._restart_after(stall))

    def _schedule(self, name: str, work: Any) -> None:
        """Run one restart of ``name`` at a time; a second cause while it runs is dropped."""
        if name not in self.servers or self._stopping or self.draining or name in self._restarting:
            work.close()
            return
        self._restarting.add(name)
        task = asyncio.ensure_future(work)
        task.add_done_callback(lambda _: self._restarting.discard(name))

    async def _restart_after(self, stall: Stall) -> None:
        srv = self.servers[str(stall.server)]
        if self.monitor is not None:  # the evidence first: a restart destroys it
            await asyncio.to_thread(self.monitor.evidence, stall, 60.0)
            if srv.state == ServerState.EXITED and srv.death is not None:
                # it died while the evidence was taken (its death's own handling was not
                # scheduled, this restart being under way): handle it as a death
                await self._after_death(srv, *srv.death)
                return
            if stall.key not in {s.key for s in self.monitor.current(stall.server)}:
                # it moved again while the evidence was taken: a slow step, not a wedge
                _log.warning(
                    "server.restart_skipped",
                    server=stall.server,
                    reason="the stall ended before the restart",
                    stall=stall.describe(),
                )
                return
        srv.last_crash = None  # a stall between two crashes: they are not in a row
        await self.restart(str(stall.server), f"stall: {stall.describe()}")

    async def restart(self, name: str, cause: str) -> bool:
        """Kill server ``name`` and start it again until ready; False once it gives up.

        Attempts count against the server's row of restarts and are spaced by the
        row's backoff (:mod:`~watchdog_kv.supervisor.restarts`); an attempt that
        crashes the same way as the one before ends the row (the same-crash rule).
        """
        srv = self.servers[name]
        if stable(srv.ready_since):
            srv.streak = 0
        if self.restarts.exhausted(srv.streak):
            self._give_up(srv, cause)
            return False
        causes = [cause]
        repeated: list[Crash] = []

        def failed_attempt(state: RetryCallState) -> None:
            error = state.outcome.exception() if state.outcome else None
            first_line = str(error).splitlines()[0] if error else "unknown"
            causes.append(f"restart attempt failed: {first_line}")
            _log.warning(
                "server.restart_attempt_failed",
                server=name,
                attempt=srv.streak,
                error=first_line,
                next_in_s=round(state.upcoming_sleep, 1),
            )

        def worth_retrying(exc: BaseException) -> bool:
            if not isinstance(exc, StartupError):
                return False
            crash = getattr(exc, "crash", None)
            if crash is None:
                srv.last_crash = None  # another kind of failure: the row of crashes ends
                return True
            if self._same_crash_again(srv, crash):
                repeated.append(crash)
                return False
            return True

        attempts = self.restarts.attempts(
            lambda: srv.streak, retry=worth_retrying, before_sleep=failed_attempt
        )
        with _tracer().start_as_current_span(
            "server.restart", attributes={"watchdog.server": name, "watchdog.cause": cause}
        ) as span:
            try:
                async for attempt in attempts:
                    with attempt:
                        await self._restart_once(srv, causes[-1])
            except _Refused:
                return False  # stopped or given up on meanwhile (logged by the lifecycle)
            except StartupError as exc:
                causes.append(f"restart attempt failed: {str(exc).splitlines()[0]}")
                if repeated:
                    self._give_up_crashing(srv, repeated[-1], causes[-1])
                else:
                    self._give_up(srv, causes[-1])
                done = False
            else:
                _log.info("server.restarted", server=name, after_s=round(srv.ready_after_s or 0, 1))
                done = True
            span.set_attribute("watchdog.restarts_in_a_row", srv.streak)
            if not done:
                tracing.fail(span, causes[-1])
            return done

    async def _restart_once(self, srv: _Server, cause: str) -> None:
        """One restart attempt of the row; raises StartupError if it fails."""
        if not self._move(srv, ServerEvent.RESTART):
            raise _Refused(srv.spec.name)
        srv.streak += 1
        srv.restarts.append({"cause": cause, "at": time.time()})
        _log.warning(
            "server.restarting",
            server=srv.spec.name,
            cause=cause,
            restart=len(srv.restarts),
            in_a_row=srv.streak,
            limit=self.restarts.limit,
        )
        await self._respawn(srv)

    def _give_up(self, srv: _Server, cause: str, reason: str | None = None) -> bool:
        """Mark ``srv`` failed for good and stop what is left of it (an API server whose
        engine died keeps its port and memory until told otherwise); False if its
        lifecycle does not allow it (already failed, or stopped)."""
        if not self._move(srv, ServerEvent.GIVE_UP):
            return False
        with contextlib.suppress(RuntimeError):  # no running loop: nothing to stop from
            asyncio.get_running_loop()
            task = asyncio.ensure_future(asyncio.to_thread(srv.proc.stop, 0.5))
            self._background.add(task)
            task.add_done_callback(self._background.discard)
        srv.failure = {
            "reason": reason
            or f"restart limit reached: {srv.streak} restarts in a row "
            f"(WATCHDOG_KV_RESTART_LIMIT={self.settings.restart_limit})",
            "last_cause": cause,
            "causes": [r["cause"] for r in srv.restarts],
            "log": str(srv.proc.log_path),
            "last_log_lines": srv.proc.tail(15),
        }
        if reason is None:
            _log.error("server.restart_limit_reached", server=srv.spec.name, **srv.failure)
        return True

    def _give_up_crashing(self, srv: _Server, crash: Crash, cause: str) -> None:
        """The same crash twice in a row: failed, with the diagnosis, not restarted again."""
        reason = (
            f"crashed twice in a row the same way: {crash.summary()} ({crash.who()}); "
            "not restarted again"
        )
        if not self._give_up(srv, cause, reason=reason) or srv.failure is None:
            return
        srv.failure["diagnosis"] = crash.as_dict() | {"dump": None}
        srv.failure["incident"] = srv.crashes[-1].get("incident") if srv.crashes else None
        _log.error("server.crash_loop", server=srv.spec.name, **srv.failure)

    def _same_crash_again(self, srv: _Server, crash: Crash) -> bool:
        """Remember ``crash`` as the server's last; True if it repeats the one before."""
        again = deaths.same_crash_again(srv.last_crash, crash)
        srv.last_crash = crash
        return again

    def _dead_engines(
        self, srv: _Server, records: list[dict[str, Any]] | None = None
    ) -> list[dict[str, Any]]:
        if records is None:
            records = procrecords.read_records(self.run_dir)
        return deaths.dead_engines(records, srv.spec.name, srv.started_wall)

    async def _examine(
        self, srv: _Server, code: int | None, dead: list[dict[str, Any]]
    ) -> Crash | None:
        """Diagnose the death of ``srv`` (crash incident, status); return the culprit."""
        if code is None and dead:
            # a whole process group killed at once: its engine processes can be seen gone
            # a moment before its API server; that moment decides who the culprit is
            for _ in range(10):
                code = srv.proc.poll()
                if code is not None:
                    srv.exit_code = code
                    break
                await asyncio.sleep(0.1)
        try:
            crashes, folder = await deaths.examine(
                srv.spec.name,
                dead,
                lambda: deaths.log_since(srv.proc.log_path, srv.log_offset),
                srv.proc.pid,
                code,
                self.settings.dump_dir or self.run_dir / "dumps",
                srv.proc.log_path,
            )
        except Exception:
            _log.exception("watchdog_kv.internal_error", what="crash diagnosis")
            return None
        if not crashes:
            return None
        culprit = crashes[0]
        srv.crashes.append(
            {
                "at": culprit.detected_wall,
                "message": culprit.describe(),
                "summary": culprit.summary(),
                "incident": str(folder) if folder else None,
            }
        )
        return culprit

    async def _respawn(self, srv: _Server) -> None:
        """Stop what is left of ``srv`` (state restarting) and start it again until ready."""
        await asyncio.to_thread(srv.proc.stop, 0.5)  # dead or wedged: nothing to wait for
        if self._stopping:
            return
        if not await self._spawn(srv, restart=True):
            raise _Refused(srv.spec.name)
        with StartupProgress([srv.spec.name], live=False) as progress:
            async with aiohttp.ClientSession() as http:
                await self._wait_ready(http, srv, progress)

    # -- watching ---------------------------------------------------------------------------
    async def watch(self, poll_s: float = 0.5) -> _Server:
        """Restart servers that die; return once no server able to answer is left.

        A server whose API server exits, or whose engine core or worker is gone,
        is diagnosed and restarted (:meth:`restart`). The service goes on while
        any decode (or plain) server is ready or restarting -- the router's
        recovery ladder routes around the missing one -- and this returns the
        last serving server when every one of them has failed for good.
        """
        while True:
            try:
                self._check_deaths()
            except Exception:  # a fault of ours must not end the watch (and the service)
                _log.exception("watchdog_kv.internal_error", what="watch")
            serving = [s for s in self.servers.values() if s.spec.role in SERVING_ROLES]
            if serving and all(s.state == ServerState.FAILED for s in serving):
                return serving[-1]
            await asyncio.sleep(poll_s)

    def _check_deaths(self) -> None:
        ready = [s for s in self.servers.values() if s.state == ServerState.READY]
        records = procrecords.read_records(self.run_dir) if ready else []
        for srv in ready:
            if self._stopping or srv.state != ServerState.READY:
                continue
            code = srv.proc.poll()
            dead = self._dead_engines(srv, records)
            if code is not None or dead:
                self._died(srv, code, dead)

    def _died(self, srv: _Server, code: int | None, dead: list[dict[str, Any]]) -> None:
        if not self._move(srv, ServerEvent.EXIT):
            return
        srv.exit_code = code
        action = "restart" if not self.draining else "none (draining)"
        if code is not None:
            what = f"exited with {_exit_cause(code)}"
        else:
            what = "its engine died (" + ", ".join(f"{r['role']} {r['pid']}" for r in dead) + ")"
        _log.error(
            "server.exited",
            server=srv.spec.name,
            exit_code=code,
            dead=[int(r["pid"]) for r in dead],
            cause=what,
            last_lines=srv.proc.tail(10),
            action=action,
        )
        self._detected(
            srv.spec.name,
            "watchdog.server_exited",
            "crash" if dead else "exit",
            action,
            exit_code=code,
        )
        srv.death = (code, dead, what)
        self._schedule(srv.spec.name, self._after_death(srv, code, dead, what))

    async def _after_death(
        self, srv: _Server, code: int | None, dead: list[dict[str, Any]], what: str
    ) -> None:
        """The crash incident first (a restart kills what is left), then a restart --
        unless the server crashed the same way as the last time."""
        srv.death = None
        if stable(srv.ready_since):
            srv.last_crash = None  # stable since the last one: not a crash loop
        crash = await self._examine(srv, code, dead)
        cause = what
        if crash is not None and crash.role != "api_server":
            cause = f"engine died: {crash.describe()}"
        elif crash is not None and crash.exit_code is not None:
            cause = f"exited with {_exit_cause(crash.exit_code)}"
        if crash is None:
            srv.last_crash = None
        elif self._same_crash_again(srv, crash):
            self._give_up_crashing(srv, crash, cause)
            return
        await self.restart(srv.spec.name, cause)

    async def stop(self) -> None:
        """Stop every server tree in parallel; SIGKILL what outlives the grace period."""
        self._stopping = True
        if self.monitor is not None:
            self.monitor.stop()
        started = [s for s in self.servers.values() if s.proc.pid is not None]
        if not started:
            return
        _log.info("supervisor.stopping", servers=[s.spec.name for s in started])
        results = await asyncio.gather(
            *(asyncio.to_thread(s.proc.stop, self.options.stop_grace_s) for s in started)
        )
        for srv, killed in zip(started, results, strict=True):
            self._move(srv, ServerEvent.STOP)
            if killed:
                _log.warning(
                    "server.killed",
                    server=srv.spec.name,
                    pids=killed,
                    reason=f"still running {self.options.stop_grace_s:g} s after SIGTERM",
                )
        _log.info("supervisor.stopped")

    # -- what the router asks -----------------------------------------------------------
    def stalls(self, name: str | None = None) -> list[Stall]:
        return self.monitor.current(name) if self.monitor is not None else []

    def counts(self) -> dict[str, Any]:
        """What the supervisor counted, for the router's /metrics: stalls detected
        (deadline misses of kind ``step``) and restarts, by server."""
        misses: Counter[tuple[str, str]] = Counter()
        for stall in self.monitor.history() if self.monitor else []:
            misses[("step", str(stall.server or ""))] += 1
        restarts: Counter[tuple[str, str]] = Counter()
        for name, srv in self.servers.items():
            if srv.restarts:
                restarts[("server_restart", name)] = len(srv.restarts)
        return {"deadline_misses": misses, "recoveries": restarts}

    def health(self) -> dict[str, Any]:
        """Live, ready and progressing for each server, told apart."""
        out: dict[str, Any] = {}
        for name, srv in self.servers.items():
            stalls = self.stalls(name)
            out[name] = {
                "role": srv.spec.role,
                "live": srv.proc.pid is not None and srv.proc.poll() is None,
                "ready": srv.state == ServerState.READY,
                "progressing": not stalls,
                "state": srv.state,
                "stalls": [s.describe() for s in stalls],
                "restarts": len(srv.restarts),
            }
        return out

    def status(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "backend": self.options.backend,
            "servers": {
                name: {
                    "role": s.spec.role,
                    "url": s.proc.url,
                    "pid": s.proc.pid,
                    "state": s.state,
                    "exit_code": s.exit_code,
                    "ready_after_s": s.ready_after_s,
                    "log": str(s.proc.log_path),
                    "where": s.proc.where(),
                    "restarts": s.restarts,
                    "restarts_in_a_row": s.streak,
                    "failure": s.failure,
                    "crashes": s.crashes,
                }
                for name, s in self.servers.items()
            },
            "processes": procrecords.read_records(self.run_dir),
            "health": self.health(),
            "stalls": [s.as_dict() for s in (self.monitor.history() if self.monitor else [])],
        }

    def roles(self) -> set[str]:
        return {s.spec.role for s in self.servers.values()}

    def available(self, role: str) -> list[Backend]:
        """Servers of ``role`` that can take a request now: ready and, unless the stall
        action is observe, not stalled. A data-parallel (plain) server with a stalled
        rank stays available while another rank is not: its API server's guard sends
        new requests to the other ranks."""
        out = []
        for srv in self.servers.values():
            if (
                srv.spec.role != role
                or srv.state != ServerState.READY
                or srv.proc.poll() is not None
            ):
                continue
            stalls = self.stalls(srv.spec.name) if self.settings.stall_action != "observe" else []
            if stalls and (role != "plain" or self._every_rank_stalled(stalls)):
                continue
            out.append(Backend(srv.spec.name, srv.proc.url, srv.starts))
        return out

    def _every_rank_stalled(self, stalls: list[Stall]) -> bool:
        records = procrecords.read_records(self.settings.state_dir)
        ranks = {engine_rank(stall, records) for stall in stalls}
        return len(ranks) >= max(1, self.options.data_parallel_size)

    async def wait_available(self, role: str, timeout_s: float) -> list[Backend]:
        """Servers of ``role`` available within ``timeout_s`` (e.g. one restarting);
        empty when none of them can come back (all failed) or the time is up."""
        deadline = time.monotonic() + timeout_s
        while True:
            found = self.available(role)
            if found:
                return found
            left = deadline - time.monotonic()
            pending = [  # servers on their way back; a stalled one is not
                s
                for s in self.servers.values()
                if s.spec.role == role
                and (
                    s.state in COMING_BACK
                    or (s.state == ServerState.READY and s.proc.poll() is not None)
                )
            ]
            if left <= 0 or not pending or self._stopping:
                return []
            self._changed.clear()
            # state changes wake us; stalls clearing are seen by polling
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._changed.wait(), min(left, 0.5))

    def serving_role(self) -> str:
        """The role that answers clients: "plain" (a data-parallel deployment without
        hand-off) or "decode"."""
        return "plain" if "plain" in self.roles() else "decode"

    def ready(self) -> bool:
        """Start-up is done and at least one server able to answer clients is ready."""
        return self._up and any(
            s.state == ServerState.READY
            for s in self.servers.values()
            if s.spec.role in SERVING_ROLES
        )


def _exit_cause(code: int) -> str:
    if code < 0:
        try:
            return f"signal {signal.Signals(-code).name}"
        except ValueError:
            return f"signal {-code}"
    return f"code {code}"


def _new_run_dir(state_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = state_dir / f"run-{stamp}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path


def _tracer() -> Any:
    return tracing.tracer("watchdog_kv.supervisor")
