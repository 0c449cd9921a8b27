"""The router's HTTP application: OpenAI endpoints, health and control.

==========================  ========================================================
``POST /v1/completions``    the recovery ladder (:mod:`watchdog_kv.router.ladder`):
                            prefill -> decode hand-off, streaming or not
``POST /v1/chat/completions`` same, for chat
``GET /v1/models``          a decode server's model list
``GET /health``             200 while the service can answer (a decode, or the plain
                            server, is ready and progressing); the body names the
                            servers that are not ("degraded"); else 503
``GET /watchdog/health``    the service's verdicts told apart -- ``live``, ``ready``
                            (the default: some route can answer), ``healthy`` (every
                            server live, ready and progressing) -- with per-server
                            detail and the stalls seen; ``?probe=live|ready|healthy``
                            answers 200/503 on that one
``GET /metrics``            Prometheus: deadline misses, recoveries by kind, KV transfer
                            and engine step durations (``docs/tracing.md``)
``GET /watchdog/status``    servers (pid, state, url, log, restarts and their causes),
                            the router's recoveries by rung, and the status records
                            of every vLLM process that registered watchdog_kv
==========================  ========================================================

Draining (:meth:`RouterServer.drain`, on SIGTERM): new requests get 503 at once,
requests in flight run to their end, up to ``WATCHDOG_KV_DRAIN_TIMEOUT``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from collections.abc import Callable
from typing import Any

import aiohttp
from aiohttp import web
from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, generate_latest

from watchdog_kv.config import Settings
from watchdog_kv.router.handoff import HandoffError, error_response, validate_body
from watchdog_kv.router.ladder import Backends, Ladder, Recoveries
from watchdog_kv.router.spans import InFlight, RequestTrace, cause_of
from watchdog_kv.telemetry import get_logger, tracing
from watchdog_kv.telemetry.metrics import ServiceCollector

__all__ = ["INFLIGHT", "Backends", "RouterServer", "build_app"]

_log = get_logger("watchdog_kv.router")
_HTTP = web.AppKey("http", aiohttp.ClientSession)


_PROBES = ("live", "ready", "healthy")
_ALIASES = {"progress": "healthy"}  # another accepted name of the check
_GONE = ("failed", "stopped")  # server states that do not come back by themselves


def _unhealthy(health: dict[str, Any], checks: tuple[str, ...]) -> dict[str, list[str]]:
    """Server -> the checks it fails."""
    out = {}
    for name, h in health.items():
        failed = [c for c in checks if not h.get(c)]
        if failed:
            out[name] = failed
    return out


class _Traffic:
    """Requests in flight, and whether new ones are still taken."""

    def __init__(self) -> None:
        self.in_flight = 0
        self.draining = False
        self.idle = asyncio.Event()
        self.idle.set()

    def enter(self) -> None:
        self.in_flight += 1
        self.idle.clear()

    def leave(self) -> None:
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()


_TRAFFIC = web.AppKey("traffic", _Traffic)
_RECOVERIES = web.AppKey("recoveries", Recoveries)
INFLIGHT = web.AppKey("inflight", InFlight)


def _text_of(response: web.StreamResponse) -> str | None:
    """The generated text of a whole (non-streamed) OpenAI answer, for the trace."""
    body = getattr(response, "body", None)
    if not isinstance(body, bytes):
        return None
    try:
        choice = json.loads(body)["choices"][0]
    except (ValueError, KeyError, IndexError, TypeError):
        return None
    text = choice.get("text")
    if text is None:
        text = (choice.get("message") or {}).get("content")
    return text if isinstance(text, str) else None


def _verdicts(
    backends: Backends, traffic: _Traffic
) -> tuple[dict[str, bool], dict[str, Any], dict[str, list[str]]]:
    """The service's three answers, per-server detail, and the checks each server fails.

    * live -- the service is up and can serve again without an operator: some
      server of the serving role is running, starting or restarting;
    * ready -- a request sent now can be answered: start-up is done, some
      serving server is available (ready, not stalled), and it is not draining;
    * healthy -- ready, and every server is live, ready and progressing.
    """
    detail = backends.health()
    role = backends.serving_role()
    serving = {b.name for b in backends.available(role)}
    for name, h in detail.items():
        h["serving"] = name in serving
    failing = _unhealthy(detail, ("live", "ready", "progressing"))
    live = any(h.get("state") not in _GONE for h in detail.values() if h.get("role") == role)
    ready = backends.ready() and bool(serving) and not traffic.draining
    return {"live": live, "ready": ready, "healthy": ready and not failing}, detail, failing


def build_app(backends: Backends, settings: Settings) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)
    traffic = app[_TRAFFIC] = _Traffic()
    recoveries = app[_RECOVERIES] = Recoveries()
    inflight = app[INFLIGHT] = InFlight()

    async def _session(app: web.Application) -> Any:
        app[_HTTP] = aiohttp.ClientSession()
        yield
        await app[_HTTP].close()

    app.cleanup_ctx.append(_session)

    def handler(path: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            request_id = request.headers.get("X-Request-Id") or f"wkv-{uuid.uuid4().hex}"
            trace = RequestTrace(request, path, request_id, inflight, settings.trace_text)
            with tracing.current(trace.span):
                return await serve(request, path, request_id, trace)

        return handle

    async def serve(
        request: web.Request, path: str, request_id: str, trace: RequestTrace
    ) -> web.StreamResponse:
        t0 = time.monotonic()
        log = _log.bind(request_id=request_id, endpoint=path)
        ladder = None
        try:
            if traffic.draining:
                raise HandoffError(
                    503, "the service is shutting down; retry elsewhere", "service_draining"
                )
            traffic.enter()
            try:
                if not backends.ready():
                    raise HandoffError(503, "servers are not ready", "service_unavailable")
                body = validate_body(await request.read())
                trace.body(body)
                ladder = Ladder(
                    request,
                    request.app[_HTTP],
                    backends,
                    settings,
                    recoveries,
                    path,
                    body,
                    request_id,
                    log,
                    trace,
                )
                response = await ladder.run()
            finally:
                traffic.leave()
        except HandoffError as err:
            rungs, servers = (ladder.rungs, ladder.servers) if ladder else ([], [])
            log.warning(
                "request.failed",
                status=err.status,
                kind=err.kind,
                error=err.message,
                rungs=rungs,
                **err.fields,
            )
            trace.label(
                "watchdog.request_failed",
                cause_of(err),
                f"answered {err.status}",
                error=err.message,
            )
            trace.finish(err.status, rungs, servers, err.message)
            return err.response()
        except BaseException as exc:
            rungs, servers = (ladder.rungs, ladder.servers) if ladder else ([], [])
            trace.finish(500, rungs, servers, type(exc).__name__)
            raise
        log.info(
            "request.done",
            servers=ladder.servers,
            rungs=ladder.rungs,
            stream=bool(body.get("stream")),
            seconds=round(time.monotonic() - t0, 3),
        )
        trace.output(ladder.output() if body.get("stream") else _text_of(response))
        trace.finish(response.status, ladder.rungs, ladder.servers, None)
        return response

    async def models(request: web.Request) -> web.Response:
        if not backends.ready():
            return error_response(503, "servers are not ready", "service_unavailable")
        found = backends.available(backends.serving_role())
        if not found:
            return error_response(503, "no decode server is available", "service_unavailable")
        decode = found[0]
        try:
            async with request.app[_HTTP].get(
                f"{decode.url}/v1/models", timeout=aiohttp.ClientTimeout(total=10)
            ) as resp:
                return web.Response(
                    body=await resp.read(), status=resp.status, content_type="application/json"
                )
        except (aiohttp.ClientError, TimeoutError) as exc:
            return error_response(
                502, f"decode server {decode.name} is unreachable: {exc}", "decode_unreachable"
            )

    async def health(_: web.Request) -> web.Response:
        verdicts, detail, failing = _verdicts(backends, traffic)
        states = {n: h["state"] for n, h in detail.items()}
        ok = verdicts["ready"]
        status = "draining" if traffic.draining else "unavailable"
        if ok:
            status = "degraded" if failing else "ok"
        body: dict[str, Any] = {"status": status, "servers": states}
        if failing:
            body["failing"] = failing
        return web.json_response(body, status=200 if ok else 503)

    async def watchdog_health(request: web.Request) -> web.Response:
        probe = request.query.get("probe", "ready")
        probe = _ALIASES.get(probe, probe)
        if probe not in _PROBES:
            return error_response(
                400,
                f"unknown probe {probe!r}; expected one of {', '.join(_PROBES)}",
                "bad_request",
            )
        verdicts, detail, failing = _verdicts(backends, traffic)
        return web.json_response(
            {
                "ok": verdicts[probe],
                "probe": probe,
                **verdicts,
                "failing": failing,
                "servers": detail,
            },
            status=200 if verdicts[probe] else 503,
        )

    async def watchdog_status(_: web.Request) -> web.Response:
        return web.json_response(
            {
                **backends.status(),
                "router": {
                    "in_flight": traffic.in_flight,
                    "draining": traffic.draining,
                    "recoveries": dict(recoveries.counts),
                },
            }
        )

    app.router.add_post("/v1/completions", handler("/v1/completions"))
    app.router.add_post("/v1/chat/completions", handler("/v1/chat/completions"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)

    def own_counts() -> dict[str, Any]:
        counted = backends.counts()
        rungs = {(kind, ""): n for kind, n in recoveries.counts.items()}
        return {**counted, "recoveries": {**counted.get("recoveries", {}), **rungs}}

    registry = CollectorRegistry(auto_describe=False)
    registry.register(ServiceCollector(lambda: backends.run_dir, own_counts))

    async def metrics(_: web.Request) -> web.Response:
        payload = await asyncio.to_thread(generate_latest, registry)  # reads files
        return web.Response(body=payload, headers={"Content-Type": CONTENT_TYPE_LATEST})

    app.router.add_get("/metrics", metrics)
    app.router.add_get("/watchdog/status", watchdog_status)
    app.router.add_get("/watchdog/health", watchdog_health)
    return app


class RouterServer:
    """Runs the router application on ``host:port`` inside the current event loop."""

    def __init__(self, backends: Backends, settings: Settings, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.app = build_app(backends, settings)
        self._runner = web.AppRunner(self.app, access_log=None, handle_signals=False)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        _log.info("router.listening", url=self.url)

    async def drain(self, timeout_s: float) -> int:
        """Refuse new requests, wait for those in flight; return how many were cut off."""
        traffic = self.app[_TRAFFIC]
        traffic.draining = True
        _log.info("router.draining", in_flight=traffic.in_flight, timeout_s=timeout_s)
        try:
            await asyncio.wait_for(traffic.idle.wait(), timeout_s)
        except TimeoutError:
            _log.warning("router.drain_timeout", cut_off=traffic.in_flight, timeout_s=timeout_s)
            return traffic.in_flight
        _log.info("router.drained")
        return 0

    async def stop(self) -> None:
        await self._runner.cleanup()
