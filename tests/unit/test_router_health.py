"""The router's health verdicts (/health, /watchdog/health), from the supervisor's view.

The supervisor is stood in for by the view the router reads of it (``Backends``):
these check the router's rules; the views themselves come from real servers in
tests/integration (test_engine_stalls.py, test_resilience.py).
"""

from __future__ import annotations

import asyncio
from pathlib import Path

import aiohttp
import pytest
from aiohttp.test_utils import TestServer

from watchdog_kv import config
from watchdog_kv.router.app import build_app
from watchdog_kv.router.handoff import Backend


class View:
    """What the supervisor says of its servers: name -> (state, stalls)."""

    run_dir = Path(".")

    def __init__(self, servers: dict[str, tuple[str, list[str]]], role: str = "decode"):
        self.servers, self.role = servers, role

    def ready(self) -> bool:
        return any(state == "ready" for state, _ in self.servers.values())

    def roles(self) -> set[str]:
        return {self.role}

    def available(self, role: str) -> list[Backend]:
        return [
            Backend(name, f"http://{name}")
            for name, (state, stalls) in self.servers.items()
            if state == "ready" and not stalls
        ]

    async def wait_available(self, role: str, timeout_s: float) -> list[Backend]:
        return self.available(role)

    def status(self) -> dict:
        return {}

    def health(self) -> dict:
        return {
            name: {
                "role": self.role,
                "live": state in ("ready", "starting"),
                "ready": state == "ready",
                "progressing": not stalls,
                "state": state,
                "stalls": stalls,
                "restarts": 0,
            }
            for name, (state, stalls) in self.servers.items()
        }

    def serving_role(self) -> str:
        return self.role

    def counts(self) -> dict:
        return {}


def ask(view: View, *paths: str) -> list[tuple[int, dict]]:
    async def run() -> list[tuple[int, dict]]:
        server = TestServer(build_app(view, config.load({})))
        await server.start_server()
        out = []
        try:
            async with aiohttp.ClientSession() as http:
                for path in paths:
                    async with http.get(server.make_url(path)) as resp:
                        out.append((resp.status, await resp.json()))
        finally:
            await server.close()
        return out

    return asyncio.run(run())


PROBES = (
    "/watchdog/health",
    "/watchdog/health?probe=live",
    "/watchdog/health?probe=ready",
    "/watchdog/health?probe=healthy",
    "/health",
)


def test_one_decode_restarting_the_service_is_ready_not_healthy():
    """A load balancer asks "ready": the other decode answers, so the service stays in."""
    view = View({"decode-0": ("restarting", []), "decode-1": ("ready", [])})
    default, live, ready, healthy, lb = ask(view, *PROBES)
    assert default[0] == ready[0] == live[0] == lb[0] == 200
    assert healthy[0] == 503 and healthy[1]["failing"] == {"decode-0": ["live", "ready"]}
    assert default[1]["live"] and default[1]["ready"] and not default[1]["healthy"]
    assert default[1]["servers"]["decode-1"]["serving"]
    assert not default[1]["servers"]["decode-0"]["serving"]
    assert lb[1]["status"] == "degraded"


def test_every_decode_stalled_the_service_is_live_but_not_ready():
    stall = "stuck in its step for 12.0 s (deadline 10.0 s)"
    view = View({"decode-0": ("ready", [stall]), "decode-1": ("ready", [stall])})
    default, live, ready, healthy, lb = ask(view, *PROBES)
    assert live[0] == 200
    assert default[0] == ready[0] == healthy[0] == lb[0] == 503
    assert default[1]["servers"]["decode-0"]["stalls"] == [stall]


def test_every_decode_given_up_the_service_is_not_even_live():
    view = View({"decode-0": ("failed", []), "decode-1": ("failed", [])})
    (live,) = ask(view, "/watchdog/health?probe=live")
    assert live[0] == 503 and not live[1]["live"]


def test_all_well_every_verdict_is_200():
    view = View({"decode-0": ("ready", []), "decode-1": ("ready", [])})
    assert [status for status, _ in ask(view, *PROBES)] == [200] * 5
    (old,) = ask(view, "/watchdog/health?probe=progress")  # an earlier name of "healthy"
    assert old[0] == 200 and old[1]["probe"] == "healthy"


@pytest.mark.parametrize("probe", ["bogus", "LIVE"])
def test_an_unknown_probe_is_a_400_naming_the_known_ones(probe):
    view = View({"decode-0": ("ready", [])})
    ((status, body),) = ask(view, f"/watchdog/health?probe={probe}")
    assert status == 400 and "live, ready, healthy" in body["error"]["message"]
