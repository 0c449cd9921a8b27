"""The router's HTTP application: OpenAI endpoints, health and control.

==========================  ========================================================
``POST /v1/completions``    prefill -> decode hand-off (streaming or not)
``POST /v1/chat/completions`` same, for chat
``GET /v1/models``          the decode server's model list
``GET /health``             200 when every server is ready, else 503 with states
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


def build_app(backends: Backends, settings: Settings) -> web.Application:
    app = web.Application(client_max_size=16 * 1024 * 1024)

    async def _session(app: web.Application) -> Any:
        app[_HTTP] = aiohttp.ClientSession()
        yield
        await app[_HTTP].close()

    app.cleanup_ctx.append(_session)

    def handler(path: str) -> Callable[[web.Request], Any]:
        async def handle(request: web.Request) -> web.StreamResponse:
            request_id = request.headers.get("X-Request-Id") or f"wkv-{uuid.uuid4().hex}"
            t0 = time.monotonic()
            log = _log.bind(request_id=request_id, endpoint=path)
            try:
                if not backends.ready():
                    raise HandoffError(503, "servers are not ready", "service_unavailable")
                body = validate_body(await request.read())
                prefill, decode = backends.backend("prefill"), backends.backend("decode")
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
        decode = backends.backend("decode")
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
        status = backends.status()
        states = {n: s["state"] for n, s in status.get("servers", {}).items()}
        ok = backends.ready()
        return web.json_response(
            {"status": "ok" if ok else "unavailable", "servers": states}, status=200 if ok else 503
        )

    async def watchdog_status(_: web.Request) -> web.Response:
        return web.json_response(backends.status())

    app.router.add_post("/v1/completions", handler("/v1/completions"))
    app.router.add_post("/v1/chat/completions", handler("/v1/chat/completions"))
    app.router.add_get("/v1/models", models)
    app.router.add_get("/health", health)
    app.router.add_get("/watchdog/status", watchdog_status)
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
