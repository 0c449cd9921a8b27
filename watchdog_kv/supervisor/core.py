"""The supervisor: starts stock vLLM servers, watches them, restarts them, stops them.

Topologies: N prefill and M decode servers (``prefill-0``.., ``decode-0``..),
or one plain data-parallel server (``dp-0``). Each server runs where its
launcher puts it (:mod:`watchdog_kv.supervisor.launch`): a local process tree,
or a Ray actor in its own placement group.

Start-up is bounded: each server must answer ``GET /health`` with 200 within
``startup_timeout_s``. A server whose process exits first, or that is not
healthy in time, is a :class:`StartupError` naming it with its last log lines,
and every process already started is stopped before the error is raised.

Once running, :meth:`Supervisor.watch` restarts a server that dies: its API
server exits, or an engine core or worker of it is gone (a crash: see
:mod:`watchdog_kv.supervisor.deaths`; the crash incident is written first, and
a server that crashes twice in a row with the same signal in the same frame is
marked failed with that diagnosis instead of being restarted again);
the step watchdog's monitor (:mod:`watchdog_kv.monitor.watcher`, run here, outside
every vLLM process) makes health honest (:meth:`Supervisor.health`: live, ready
and progressing per server) and, under ``WATCHDOG_KV_STALL_ACTION=restart``, a
stalled server is restarted once its incident is written. A restart kills what
is left of the server, starts it again and is done only when it is ready; a
failed attempt is retried after a capped exponential backoff (tenacity). After
``WATCHDOG_KV_RESTART_LIMIT`` restarts in a row (a server ready for
:data:`STABLE_S` starts a new row) the server is marked failed with a report.
The service ends only when no server able to answer (decode or plain) is left.
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
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception,
    stop_after_attempt,
)

from watchdog_kv import process as procrecords
from watchdog_kv.config import Settings
from watchdog_kv.monitor.crashes import Crash
from watchdog_kv.router.handoff import Backend
from watchdog_kv.monitor.watcher import Monitor
from watchdog_kv.stalls import Stall, engine_rank
from watchdog_kv.supervisor import deaths, ports
from watchdog_kv.supervisor.launch import LocalServer, ServerProcess
from watchdog_kv.supervisor.progress import StartupProgress
from watchdog_kv.supervisor.servers import ServerSpec
from watchdog_kv.telemetry import get_logger, tracing

__all__ = [
    "STABLE_S",
    "ServeOptions",
    "ServerExitedError",
    "ServerStartTimeout",
    "StartupError",
    "Supervisor",
]

_log = get_logger("watchdog_kv.supervisor")

STABLE_S = 600.0  # ready this long: the next failure starts a new row of restarts
SERVING_ROLES = ("decode", "plain")  # the roles that answer clients
_COMING_BACK = ("waiting", "starting", "exited", "restarting")


class StartupError(RuntimeError):
    """The service could not be brought up; the message says why."""


class ServerExitedError(StartupError):
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
    def __init__(self, name: str, timeout_s: float, tail: list[str], log_path: Path):
        lines = "\n".join(f"    {ln}" for ln in tail) or "    (no output)"
        super().__init__(
            f"vLLM server {name} was not healthy within {timeout_s:g} s; last log lines "
            f"({log_path}):\n{lines}"
        )
        self.name, self.tail = name, tail


@dataclass(frozen=True)
class ServeOptions:
    model: Path
    served_model_name: str
    host: str = "127.0.0.1"
    port: int = 8000
    prefill_port: int | None = None
    decode_port: int | None = None
    startup_timeout_s: float = 300.0
    stop_grace_s: float = 20.0
    max_model_len: int = 512
    vllm_args: tuple[str, ...] = ()
    kv_lease_s: float | None = None
    run_dir: Path | None = None
    data_parallel_size: int = 1  # > 1: one plain data-parallel server, no hand-off
    prefills: int = 1  # prefill servers (0: decodes compute every prompt themselves)
    decodes: int = 1
    backend: str = "local"  # "local" child processes, or "ray" actors on a cluster
    ray_address: str | None = None
    placement_timeout_s: float = 60.0


@dataclass
class _Server:
    spec: ServerSpec
    proc: ServerProcess
    state: str = "waiting"  # starting, ready, exited, restarting, failed, stopped
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
        opts = self.options
        taken = {opts.port}
        cores = sorted(os.sched_getaffinity(0))
        if opts.data_parallel_size > 1:
            return [self._plan_data_parallel(taken, cores)]
        wanted = [
            ("prefill", i, opts.prefill_port if i == 0 else None) for i in range(opts.prefills)
        ] + [("decode", i, opts.decode_port if i == 0 else None) for i in range(opts.decodes)]
        specs: list[ServerSpec] = []
        for index, (role, i, fixed) in enumerate(wanted):
            name = f"{role}-{i}"
            port = self._http_port(fixed, name, taken)
            side = ports.free_port(opts.host, taken)
            specs.append(
                ServerSpec(
                    name=name,
                    role=role,
                    model=opts.model,
                    served_model_name=opts.served_model_name,
                    host=opts.host,
                    port=port,
                    side_channel_port=side,
                    max_model_len=opts.max_model_len,
                    extra_args=opts.vllm_args,
                    cpu_bind=str(cores[index % len(cores)]),
                    kv_lease_s=opts.kv_lease_s,
                    otel=self.settings.otel,
                    vllm_traces=self.settings.vllm_traces,
                    plugin_enabled=self.settings.enabled,
                )
            )
        return specs

    def _http_port(self, fixed: int | None, name: str, taken: set[int]) -> int:
        """The operator's port for server ``name`` (checked free), else a free one."""
        host = self.options.host
        if fixed is None:
            return ports.free_port(host, taken)
        ports.check_free(host, fixed, f"{name} HTTP")
        taken.add(fixed)
        return fixed

    def _plan_data_parallel(self, taken: set[int], cores: list[int]) -> ServerSpec:
        """One vLLM server with --data-parallel-size N behind one API server."""
        opts = self.options
        size = opts.data_parallel_size
        port = self._http_port(opts.decode_port, "dp-0", taken)
        return ServerSpec(
            name="dp-0",
            role="plain",
            model=opts.model,
            served_model_name=opts.served_model_name,
            host=opts.host,
            port=port,
            side_channel_port=ports.free_port(opts.host, taken),
            max_model_len=opts.max_model_len,
            extra_args=(
                "--data-parallel-size",
                str(size),
                "--data-parallel-rpc-port",
                str(ports.free_port(opts.host, taken)),
                *opts.vllm_args,
            ),
            # one core per rank's OpenMP threads ("|" separates ranks)
            cpu_bind="|".join(str(cores[i % len(cores)]) for i in range(size)),
            kv_lease_s=None,
            otel=self.settings.otel,
            vllm_traces=self.settings.vllm_traces,
            plugin_enabled=self.settings.enabled,
        )

    def _launcher(self, spec: ServerSpec) -> ServerProcess:
        if self.options.backend == "ray":
            from watchdog_kv.supervisor.ray_backend import RayServer

            return RayServer(
                spec,
                self.run_dir,
                address=self.options.ray_address,
                placement_timeout_s=self.options.placement_timeout_s,
            )
        return LocalServer(spec, self.run_dir)

    # -- lifecycle ------------------------------------------------------------------
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

    async def _spawn(self, srv: _Server, **fields: Any) -> None:
        srv.state = "starting"
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
                srv.state, srv.exit_code = "exited", code
                progress.update(srv.spec.name, "failed", tail[-1] if tail else "")
                crash = await self._examine(srv, code, dead)
                raise ServerExitedError(
                    srv.spec.name, code, srv.proc.tail(25), srv.proc.log_path, crash
                )
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        srv.state = "ready"
                        srv.ready_since = time.monotonic()
                        srv.ready_after_s = srv.ready_since - srv.started_at
                        self._changed.set()
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
            if srv.state == "exited" and srv.death is not None:
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

        Every attempt counts against ``WATCHDOG_KV_RESTART_LIMIT``; the count starts
        again once the server has been ready for :data:`STABLE_S`. Attempts are
        spaced by a capped exponential backoff that keeps growing across a row of
        restarts (a server crashing right after each restart waits longer each time).
        """
        srv = self.servers[name]
        limit = self.settings.restart_limit
        if _stable(srv):
            srv.streak = 0
        if srv.streak >= limit:
            self._give_up(srv, cause)
            return False
        causes = [cause]

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

        # one doubling backoff over the whole row: the wait before a restart follows
        # the number of restarts already in the row, in this call or earlier ones
        def row_backoff(_: RetryCallState | None = None) -> float:
            return min(60.0, self.settings.restart_backoff_s * 2.0 ** (srv.streak - 1))

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

        repeated: list[Crash] = []

        retrying = AsyncRetrying(
            stop=stop_after_attempt(limit - srv.streak),
            wait=row_backoff,
            retry=retry_if_exception(worth_retrying),
            before_sleep=failed_attempt,
            reraise=True,
        )
        with _tracer().start_as_current_span(
            "server.restart", attributes={"watchdog.server": name, "watchdog.cause": cause}
        ) as span:
            done = await self._restart_row(srv, retrying, causes, row_backoff, repeated)
            span.set_attribute("watchdog.restarts_in_a_row", srv.streak)
            if not done:
                tracing.fail(span, causes[-1])
            return done

    async def _restart_row(
        self,
        srv: _Server,
        retrying: AsyncRetrying,
        causes: list[str],
        row_backoff: Callable[[], float],
        repeated: list[Crash],
    ) -> bool:
        name, limit = srv.spec.name, self.settings.restart_limit
        if srv.streak:  # restarted before and failed again soon after: back off first
            await asyncio.sleep(row_backoff())
        try:
            async for attempt in retrying:
                with attempt:
                    srv.streak += 1
                    srv.restarts.append({"cause": causes[-1], "at": time.time()})
                    _log.warning(
                        "server.restarting",
                        server=name,
                        cause=causes[-1],
                        restart=len(srv.restarts),
                        in_a_row=srv.streak,
                        limit=limit,
                    )
                    await self._respawn(srv)
        except StartupError as exc:
            causes.append(f"restart attempt failed: {str(exc).splitlines()[0]}")
            if repeated:
                self._give_up_crashing(srv, repeated[-1], causes[-1])
            else:
                self._give_up(srv, causes[-1])
            return False
        _log.info("server.restarted", server=name, after_s=round(srv.ready_after_s or 0, 1))
        return True

    def _give_up(self, srv: _Server, cause: str, reason: str | None = None) -> None:
        """Mark ``srv`` failed for good and stop what is left of it (an API server whose
        engine died keeps its port and memory until told otherwise)."""
        srv.state = "failed"
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
        self._changed.set()
        if reason is None:
            _log.error("server.restart_limit_reached", server=srv.spec.name, **srv.failure)

    def _give_up_crashing(self, srv: _Server, crash: Crash, cause: str) -> None:
        """The same crash twice in a row: failed, with the diagnosis, not restarted again."""
        self._give_up(
            srv,
            cause,
            reason=f"crashed twice in a row the same way: {crash.summary()} "
            f"({crash.who()}); not restarted again",
        )
        assert srv.failure is not None
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
        srv.state = "restarting"
        self._changed.set()
        await asyncio.to_thread(srv.proc.stop, 0.5)  # dead or wedged: nothing to wait for
        if self._stopping:
            return
        await self._spawn(srv, restart=True)
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
            if serving and all(s.state == "failed" for s in serving):
                return serving[-1]
            await asyncio.sleep(poll_s)

    def _check_deaths(self) -> None:
        ready = [s for s in self.servers.values() if s.state == "ready"]
        records = procrecords.read_records(self.run_dir) if ready else []
        for srv in ready:
            if self._stopping or srv.state != "ready":
                continue
            code = srv.proc.poll()
            dead = self._dead_engines(srv, records)
            if code is not None or dead:
                self._died(srv, code, dead)

    def _died(self, srv: _Server, code: int | None, dead: list[dict[str, Any]]) -> None:
        srv.state, srv.exit_code = "exited", code
        self._changed.set()
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
        if _stable(srv):
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
            srv.state = "stopped"
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
                "ready": srv.state == "ready",
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
            if srv.spec.role != role or srv.state != "ready" or srv.proc.poll() is not None:
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
                and (s.state in _COMING_BACK or (s.state == "ready" and s.proc.poll() is not None))
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
            s.state == "ready" for s in self.servers.values() if s.spec.role in SERVING_ROLES
        )


def _stable(srv: _Server) -> bool:
    """Ready for :data:`STABLE_S`: its next failure starts a new row (of restarts, and
    of crashes)."""
    return srv.ready_since is not None and time.monotonic() - srv.ready_since >= STABLE_S


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
