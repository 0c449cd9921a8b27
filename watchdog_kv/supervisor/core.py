"""The supervisor: starts stock vLLM prefill and decode servers, watches, stops them.

Start-up is bounded: each server must answer ``GET /health`` with 200 within
``startup_timeout_s``. A server whose process exits first, or that is not
healthy in time, is a :class:`StartupError` naming it with its last log lines,
and every process already started is stopped before the error is raised.

Once running, :meth:`Supervisor.wait_for_exit` returns the first decode server
that exits on its own (a prefill that exits only degrades the service).

The step watchdog's monitor (:mod:`watchdog_kv.step.monitor`) runs here, in the
supervisor, outside every vLLM process. Its verdicts make health honest
(:meth:`Supervisor.health`: live, ready and progressing per server) and, under
``WATCHDOG_KV_STALL_ACTION=restart``, a stalled server is restarted once its
incident is written: killed, started again and gated on readiness, with
exponential backoff between failed attempts (tenacity) and at most
``WATCHDOG_KV_RESTART_LIMIT`` restarts per server.
"""

from __future__ import annotations

import asyncio
import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
from tenacity import (
    AsyncRetrying,
    RetryCallState,
    retry_if_exception_type,
    stop_after_attempt,
    wait_exponential,
)

from watchdog_kv import process as procrecords
from watchdog_kv.config import Settings
from watchdog_kv.router.handoff import Backend
from watchdog_kv.step.monitor import Monitor, Stall
from watchdog_kv.supervisor import ports
from watchdog_kv.supervisor.process import ManagedProcess
from watchdog_kv.supervisor.progress import StartupProgress
from watchdog_kv.supervisor.servers import ServerSpec
from watchdog_kv.telemetry import get_logger

__all__ = [
    "ServeOptions",
    "ServerExitedError",
    "ServerStartTimeout",
    "StartupError",
    "Supervisor",
]

_log = get_logger("watchdog_kv.supervisor")


class StartupError(RuntimeError):
    """The service could not be brought up; the message says why."""


class ServerExitedError(StartupError):
    def __init__(self, name: str, code: int | None, tail: list[str], log_path: Path):
        lines = "\n".join(f"    {ln}" for ln in tail) or "    (no output)"
        super().__init__(
            f"vLLM server {name} exited with code {code}; last log lines ({log_path}):\n{lines}"
        )
        self.name, self.code, self.tail = name, code, tail


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


@dataclass
class _Server:
    spec: ServerSpec
    proc: ManagedProcess
    state: str = "waiting"
    started_at: float = 0.0
    ready_after_s: float | None = None
    exit_code: int | None = None
    restarts: list[dict[str, Any]] = field(default_factory=list)


class Supervisor:
    def __init__(self, options: ServeOptions, settings: Settings) -> None:
        self.options = options
        self.settings = settings
        self.run_dir = options.run_dir or _new_run_dir(settings.state_dir)
        self.servers: dict[str, _Server] = {}
        self._stopping = False
        self.monitor: Monitor | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._restarting: set[str] = set()

    # -- planning -----------------------------------------------------------------
    def plan(self) -> list[ServerSpec]:
        """Check ports and build the server specs; raises before anything starts."""
        opts = self.options
        taken = {opts.port}
        specs: list[ServerSpec] = []
        cores = sorted(os.sched_getaffinity(0))
        if opts.data_parallel_size > 1:
            return [self._plan_data_parallel(taken, cores)]
        for index, (role, fixed) in enumerate(
            (("prefill", opts.prefill_port), ("decode", opts.decode_port))
        ):
            name = f"{role}-0"
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
        )

    # -- lifecycle ------------------------------------------------------------------
    async def start(self, specs: list[ServerSpec], *, live: bool | None = None) -> None:
        """Start every server and wait until all are healthy (or raise StartupError)."""
        (self.run_dir / "logs").mkdir(parents=True, exist_ok=True)
        for spec in specs:
            proc = ManagedProcess(
                spec.name,
                spec.argv(),
                spec.env(os.environ, self.run_dir),
                self.run_dir / "logs" / f"{spec.name}.log",
            )
            self.servers[spec.name] = _Server(spec, proc)
        _log.info(
            "supervisor.starting",
            run_dir=str(self.run_dir),
            servers={s.name: s.url for s in specs},
            model=str(self.options.model),
        )
        self._start_monitor()
        with StartupProgress(list(self.servers), live=live) as progress:
            for srv in self.servers.values():
                srv.proc.start()
                srv.started_at = time.monotonic()
                srv.state = "starting"
                progress.update(srv.spec.name, "starting")
                _log.info(
                    "server.spawned",
                    server=srv.spec.name,
                    pid=srv.proc.pid,
                    url=srv.spec.url,
                    log=str(srv.proc.log_path),
                )
            async with aiohttp.ClientSession() as http:
                await asyncio.gather(
                    *(self._wait_ready(http, s, progress) for s in self.servers.values())
                )

    async def _wait_ready(
        self, http: aiohttp.ClientSession, srv: _Server, progress: StartupProgress
    ) -> None:
        deadline = srv.started_at + self.options.startup_timeout_s
        url = f"{srv.spec.url}/health"
        while True:
            code = srv.proc.poll()
            tail = srv.proc.tail(1)
            if code is not None:
                srv.state, srv.exit_code = "failed", code
                progress.update(srv.spec.name, "failed", tail[-1] if tail else "")
                raise ServerExitedError(srv.spec.name, code, srv.proc.tail(25), srv.proc.log_path)
            try:
                async with http.get(url, timeout=aiohttp.ClientTimeout(total=2)) as resp:
                    if resp.status == 200:
                        srv.state = "ready"
                        srv.ready_after_s = time.monotonic() - srv.started_at
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
                srv.state = "failed"
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
        if self._loop is not None and self.settings.stall_action == "restart":
            self._loop.call_soon_threadsafe(self._schedule_restart, stall)

    def _schedule_restart(self, stall: Stall) -> None:
        name = stall.server
        if name is None or name not in self.servers or self._stopping:
            return
        if name in self._restarting:
            return
        self._restarting.add(name)
        task = asyncio.ensure_future(self._restart_after(stall))
        task.add_done_callback(lambda _: self._restarting.discard(name))

    async def _restart_after(self, stall: Stall) -> None:
        if self.monitor is not None:  # the evidence first: a restart destroys it
            await asyncio.to_thread(self.monitor.evidence, stall, 60.0)
            if stall.key not in {s.key for s in self.monitor.current(stall.server)}:
                # it moved again while the evidence was taken: a slow step, not a wedge
                _log.warning(
                    "server.restart_skipped",
                    server=stall.server,
                    reason="the stall ended before the restart",
                    stall=stall.describe(),
                )
                return
        await self.restart(str(stall.server), f"stall: {stall.describe()}")

    async def restart(self, name: str, cause: str) -> bool:
        """Kill server ``name`` and start it again until ready; False once it gives up."""
        srv = self.servers[name]
        if len(srv.restarts) >= self.settings.restart_limit:
            srv.state = "failed"
            _log.error(
                "server.restart_limit_reached",
                server=name,
                restarts=len(srv.restarts),
                limit=self.settings.restart_limit,
                cause=cause,
                causes=[r["cause"] for r in srv.restarts],
            )
            return False
        srv.restarts.append({"cause": cause, "at": time.time()})
        _log.warning("server.restarting", server=name, cause=cause, restart=len(srv.restarts))

        def waiting(state: RetryCallState) -> None:
            _log.warning(
                "server.restart_attempt_failed",
                server=name,
                attempt=state.attempt_number,
                error=str(state.outcome.exception()) if state.outcome else None,
                next_in_s=round(state.upcoming_sleep, 1),
            )

        retrying = AsyncRetrying(
            stop=stop_after_attempt(max(1, self.settings.restart_limit)),
            wait=wait_exponential(multiplier=self.settings.restart_backoff_s, max=60),
            retry=retry_if_exception_type(StartupError),
            before_sleep=waiting,
            reraise=True,
        )
        try:
            async for attempt in retrying:
                with attempt:
                    await self._respawn(srv)
        except StartupError as exc:
            srv.state = "failed"
            _log.error("server.restart_failed", server=name, error=str(exc))
            return False
        _log.info("server.restarted", server=name, after_s=srv.ready_after_s)
        return True

    async def _respawn(self, srv: _Server) -> None:
        srv.state = "restarting"
        await asyncio.to_thread(srv.proc.stop, 0.5)  # wedged: no graceful stop to wait for
        if self._stopping:
            return
        srv.proc.start()
        srv.started_at = time.monotonic()
        srv.exit_code = None
        _log.info("server.spawned", server=srv.spec.name, pid=srv.proc.pid, restart=True)
        with StartupProgress([srv.spec.name], live=False) as progress:
            async with aiohttp.ClientSession() as http:
                await self._wait_ready(http, srv, progress)

    def stalls(self, name: str | None = None) -> list[Stall]:
        return self.monitor.current(name) if self.monitor is not None else []

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

    async def wait_for_exit(self, poll_s: float = 0.5) -> _Server:
        """Return the first *decode* server whose process exits while we are not stopping.

        A prefill server that exits is logged and marked ``exited`` (the router's
        health turns 503) but the service goes on: requests already handed to a
        decode finish there -- their KV loads recover by recomputing.
        Restarting servers is not done yet.
        """
        while True:
            for srv in self.servers.values():
                code = srv.proc.poll()
                if code is None or self._stopping or srv.state in ("exited", "restarting"):
                    continue
                srv.state, srv.exit_code = "exited", code
                _log.error(
                    "server.exited",
                    server=srv.spec.name,
                    exit_code=code,
                    last_lines=srv.proc.tail(10),
                    service="degraded" if srv.spec.role == "prefill" else "stopping",
                )
                if srv.spec.role in ("decode", "plain"):
                    return srv
            await asyncio.sleep(poll_s)

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

    # -- status ---------------------------------------------------------------------
    def status(self) -> dict[str, Any]:
        return {
            "run_dir": str(self.run_dir),
            "servers": {
                name: {
                    "role": s.spec.role,
                    "url": s.spec.url,
                    "pid": s.proc.pid,
                    "state": s.state,
                    "exit_code": s.exit_code,
                    "ready_after_s": s.ready_after_s,
                    "log": str(s.proc.log_path),
                    "restarts": s.restarts,
                }
                for name, s in self.servers.items()
            },
            "processes": procrecords.read_records(self.run_dir),
            "health": self.health(),
            "stalls": [s.as_dict() for s in (self.monitor.history() if self.monitor else [])],
        }

    def backend(self, role: str) -> Backend:
        for srv in self.servers.values():
            if srv.spec.role == role:
                return Backend(srv.spec.name, srv.spec.url)
        raise KeyError(role)

    def plain(self) -> bool:
        """A data-parallel deployment without prefill/decode hand-off."""
        return any(s.spec.role == "plain" for s in self.servers.values())

    def ready(self) -> bool:
        return bool(self.servers) and all(s.state == "ready" for s in self.servers.values())


def _new_run_dir(state_dir: Path) -> Path:
    stamp = time.strftime("%Y%m%d-%H%M%S")
    path = state_dir / f"run-{stamp}-{os.getpid()}"
    path.mkdir(parents=True, exist_ok=True)
    return path
