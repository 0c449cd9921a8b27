"""The router's HTTP application: OpenAI endpoints, health and control.

==========================  ========================================================
``POST /v1/completions``    prefill -> decode hand-off (streaming or not)
``POST /v1/chat/completions`` same, for chat
``GET /v1/models``          the decode server's model list
``GET /health``             200 when every server is live, ready and making progress,
                            else 503 saying which is not
``GET /watchdog/health``    live / ready / progressing per server, told apart, with
                            the stalls seen; ``?probe=live|ready|progress`` checks one
``GET /watchdog/status``    servers (pid, state, url, log) and the status records
                            of every vLLM process that registered watchdog_kv
==========================  ========================================================
"""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any, Protocol

import aiohttp
from aiohttp import web

from watchdog_kv.config import Settings
from watchdog_kv.router.handoff import (
    Backend,
    HandoffError,
    error_response,
    run_decode,
    run_prefill,
    validate_body,
)
from watchdog_kv.telemetry import get_logger

__all__ = ["Backends", "RouterServer", "build_app"]

_log = get_logger("watchdog_kv.router")
_HTTP = web.AppKey("http", aiohttp.ClientSession)


class Backends(Protocol):
    def ready(self) -> bool: ...
    def backend(self, role: str) -> Backend: ...
    def status(self) -> dict[str, Any]: ...
    def health(self) -> dict[str, Any]: ...
    def plain(self) -> bool: ...


_PROBES = {"live": ("live",), "ready": ("live", "ready"), "progress": ("progressing",)}


def _unhealthy(health: dict[str, Any], checks: tuple[str, ...]) -> dict[str, list[str]]:
    """Server -> the checks it fails."""
    out = {}
    for name, h in health.items():
        failed = [c for c in checks if not h.get(c)]
        if failed:
            out[name] = failed
    return out


def _stalled_error(health: dict[str, Any], *names: str) -> HandoffError | None:
    for name in names:
        h = health.get(name, {})
        if h.get("stalls"):
            return HandoffError(
                503,
                f"{name} is stalled: {h['stalls'][0]}; not sending the request into it",
                "server_stalled",
            )
    return None


def build_app(backends: Backends, settings: Settings) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def _session(app: web.Application) -> Any:
        app[_HTTP] = aiohttp.ClientSession()
        yield
        await app[_HTTP].close()

    app.cleanup_ctx.append(_session)

    async def _plain(
        request: web.Request, body: dict[str, Any], request_id: str, log: Any, t0: float
    ) -> web.StreamResponse:
        """A data-parallel deployment: no hand-off, the server balances its own ranks."""
        server = backends.backend("plain")
        response = await run_decode(
            request,
            request.app[_HTTP],
            server,
            request.path,
            body,
            request_id,
            settings.decode_idle_timeout_s,
        )
        log.info("request.done", server=server.name, seconds=round(time.monotonic() - t0, 3))
        return response

    def handler(path: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            request_id = request.headers.get("X-Request-Id") or f"wkv-{uuid.uuid4().hex}"
            t0 = time.monotonic()
            log = _log.bind(request_id=request_id, endpoint=path)
            try:
                if not backends.ready():
                    raise HandoffError(503, "servers are not ready", "service_unavailable")
                body = validate_body(await request.read())
                if backends.plain():
                    return await _plain(request, body, request_id, log, t0)
                prefill, decode = backends.backend("prefill"), backends.backend("decode")
                if settings.stall_action != "observe":
                    stalled = _stalled_error(backends.health(), prefill.name, decode.name)
                    if stalled is not None:
                        raise stalled
                params = await run_prefill(
                    request.app[_HTTP], prefill, path, body, request_id, settings.prefill_timeout_s
                )
                log.debug(
                    "request.prefilled",
                    prefill=prefill.name,
                    remote_engine_id=params.get("remote_engine_id"),
                )
                response = await run_decode(
                    request,
                    request.app[_HTTP],
                    decode,
                    path,
                    {**body, "kv_transfer_params": params},
                    request_id,
                    settings.decode_idle_timeout_s,
                )
            except HandoffError as err:
                log.warning(
                    "request.failed",
                    status=err.status,
                    kind=err.kind,
                    error=err.message,
                    **err.fields,
                )
                return err.response()
            log.info(
                "request.done",
                prefill=prefill.name,
                decode=decode.name,
                stream=bool(body.get("stream")),
                seconds=round(time.monotonic() - t0, 3),
            )
            return response

        return handle

    async def models(request: web.Request) -> web.Response:
        if not backends.ready():
            return error_response(503, "servers are not ready", "service_unavailable")
        decode = backends.backend("plain" if backends.plain() else "decode")
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
        detail = backends.health()
        states = {n: h["state"] for n, h in detail.items()}
        failing = _unhealthy(detail, ("live", "ready", "progressing"))
        ok = backends.ready() and not failing
        body: dict[str, Any] = {"status": "ok" if ok else "unavailable", "servers": states}
        if failing:
            body["failing"] = failing
        return web.json_response(body, status=200 if ok else 503)

    async def watchdog_health(request: web.Request) -> web.Response:
        probe = request.query.get("probe")
        if probe is not None and probe not in _PROBES:
            return error_response(
                400,
                f"unknown probe {probe!r}; expected one of {', '.join(_PROBES)}",
                "bad_request",
            )
        detail = backends.health()
        checks = _PROBES[probe] if probe else ("live", "ready", "progressing")
        failing = _unhealthy(detail, checks)
        return web.json_response(
            {"ok": not failing, "checks": list(checks), "failing": failing, "servers": detail},
            status=503 if failing or not detail else 200,
        )

    async def watchdog_status(_: web.Request) -> web.Response:
        return web.json_response(backends.status())

    app.router.add_post("/v1/completions", handler("/v1/completions"))
    app.router.add_post("/v1/chat/completions", handler("/v1/chat/completions"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/watchdog/status", watchdog_status)
    app.router.add_get("/watchdog/health", watchdog_health)
    return app


class RouterServer:
    """Runs the router application on ``host:port`` inside the current event loop."""

    def __init__(self, backends: Backends, settings: Settings, host: str, port: int) -> None:
        self.host, self.port = host, port
        self._runner = web.AppRunner(
            build_app(backends, settings), access_log=None, handle_signals=False
        )

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    async def start(self) -> None:
        await self._runner.setup()
        site = web.TCPSite(self._runner, self.host, self.port, reuse_address=True)
        await site.start()
        _log.info("router.listening", url=self.url)

    async def stop(self) -> None:
        await self._runner.cleanup()
