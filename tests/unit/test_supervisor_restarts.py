"""The restart policy (tenacity's wait and stop over a row) and the supervisor driving a
server's lifecycle through it, over random orders of deaths, stalls and a stop."""

from __future__ import annotations

import asyncio
import itertools
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from watchdog_kv import config
from watchdog_kv.supervisor.core import Supervisor, _Server
from watchdog_kv.supervisor.lifecycle import LIFECYCLE, ServerEvent, ServerState
from watchdog_kv.supervisor.plan import ServeOptions
from watchdog_kv.supervisor.restarts import BACKOFF_CAP_S, RestartPolicy
from watchdog_kv.supervisor.servers import ServerSpec

S, E = ServerState, ServerEvent


@given(st.floats(0.01, 30.0), st.integers(0, 12), st.integers(0, 40))
def test_the_backoff_doubles_over_the_row_up_to_the_cap(backoff_s, limit, in_a_row):
    policy = RestartPolicy(backoff_s, limit)
    expected = 0.0 if in_a_row == 0 else min(BACKOFF_CAP_S, backoff_s * 2.0 ** (in_a_row - 1))
    assert abs(policy.backoff(in_a_row) - expected) < 1e-9
    assert policy.exhausted(in_a_row) is (in_a_row >= limit)


def test_the_policy_is_the_settings():
    settings = config.load({"WATCHDOG_KV_RESTART_LIMIT": "4", "WATCHDOG_KV_RESTART_BACKOFF": "3"})
    sup = Supervisor(ServeOptions(Path("m"), "m", run_dir=Path("/nonexistent")), settings)
    assert sup.restarts.limit == 4 and sup.restarts.backoff(1) == 3.0
    assert sup.restarts.backoff(3) == 12.0 and sup.restarts.backoff(10) == BACKOFF_CAP_S


class FakeServer:
    """Each start comes up healthy or exits at once, as ``outcomes`` say (then healthy)."""

    name = "decode-0"
    pid = 4242

    def __init__(self, spec: ServerSpec, log: Path, url: str, outcomes: list[bool]) -> None:
        self.spec, self.log_path, self.url = spec, log, url
        self.outcomes = list(outcomes)
        self.code: int | None = None
        self.started = 0

    def start(self) -> None:
        self.started += 1
        healthy = self.outcomes.pop(0) if self.outcomes else True
        self.code = None if healthy else 3

    def poll(self) -> int | None:
        return self.code

    def tail(self, lines: int = 20) -> list[str]:
        return []

    def stop(self, grace: float = 20.0) -> list[int]:
        return []

    def where(self) -> dict[str, str]:
        return {}


class Recording(Supervisor):
    """The real supervisor, keeping every transition it applied and every one refused."""

    def __init__(self, *args: object, **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.moves: list[tuple[str, str, str]] = []
        self.refused: list[tuple[str, str]] = []

    def _move(self, srv: _Server, event: ServerEvent) -> bool:
        before = srv.state
        moved = super()._move(srv, event)
        if moved:
            self.moves.append((before, event, srv.state))
        else:
            self.refused.append((before, event))
        return moved


ops = st.lists(st.sampled_from(["die", "stall", "stop", "die_then_stop"]), max_size=8)


@settings(
    max_examples=40,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)
@given(ops, st.lists(st.booleans(), max_size=12), st.integers(1, 4))
def test_any_order_of_deaths_stalls_and_a_stop_follows_the_table(tmp_path, todo, outcomes, limit):
    async def health(_: web.Request) -> web.Response:
        return web.Response(text="ok")

    async def scenario() -> Recording:
        app = web.Application()
        app.router.add_get("/health", health)
        server = TestServer(app)
        await server.start_server()
        settings = config.load(
            {
                "WATCHDOG_KV_STATE_DIR": str(tmp_path),
                "WATCHDOG_KV_RESTART_LIMIT": str(limit),
                "WATCHDOG_KV_RESTART_BACKOFF": "0.01",
            }
        )
        sup = Recording(ServeOptions(Path("m"), "m", run_dir=tmp_path), settings)
        spec = ServerSpec("decode-0", "decode", Path("m"), "m", "127.0.0.1", 1, 2)
        log = tmp_path / "decode-0.log"
        log.write_text("")
        url = str(server.make_url("")).rstrip("/")
        srv = _Server(spec, FakeServer(spec, log, url, outcomes))
        sup.servers["decode-0"] = srv
        srv.state = S.READY  # as start-up leaves it
        srv.ready_since = time.monotonic()
        try:
            for op in todo:
                if op in ("die", "die_then_stop") and srv.state == S.READY:
                    srv.proc.code = -9
                    sup._died(srv, -9, [])
                elif op == "stall":
                    sup._schedule("decode-0", sup.restart("decode-0", "stall: overdue"))
                if op in ("stop", "die_then_stop"):
                    await sup.stop()  # the restart may be backing off, or starting
                    stopped_at = srv.proc.started
                for _ in range(2000):  # the restart under way runs to its end
                    if not sup._restarting:
                        break
                    await asyncio.sleep(0.005)
                assert not sup._restarting
                if sup._stopping:
                    assert srv.state == S.STOPPED and srv.proc.started == stopped_at
                assert srv.streak <= limit  # never past the restart limit
        finally:
            await server.close()
        return sup

    sup = asyncio.run(scenario())
    states = set(S)
    for before, event, after in sup.moves:
        assert LIFECYCLE[(before, event)] == after and after in states
    for i, (_, _, after) in enumerate(sup.moves):
        if after == S.STOPPED:
            assert sup.moves[i + 1 :] == []  # a stopped server never restarts
        if after == S.FAILED:
            assert all(m[2] == S.STOPPED for m in sup.moves[i + 1 :])  # stays failed
    srv = sup.servers["decode-0"]
    if srv.state == S.FAILED:
        assert srv.failure is not None and srv.failure["reason"].startswith(
            f"restart limit reached: {limit} restarts in a row"
        )


def test_a_server_that_never_comes_up_is_given_up_after_the_limit_with_the_row_backoff(
    tmp_path,
):
    """Every attempt exits at once: exactly `limit` restarts, each after the row's wait
    (tenacity's), then failed; a later death or stall does not restart it."""
    settings = config.load(
        {
            "WATCHDOG_KV_STATE_DIR": str(tmp_path),
            "WATCHDOG_KV_RESTART_LIMIT": "3",
            "WATCHDOG_KV_RESTART_BACKOFF": "0.05",
        }
    )
    sup = Recording(ServeOptions(Path("m"), "m", run_dir=tmp_path), settings)
    spec = ServerSpec("decode-0", "decode", Path("m"), "m", "127.0.0.1", 1, 2)
    (tmp_path / "decode-0.log").write_text("")
    srv = _Server(spec, FakeServer(spec, tmp_path / "decode-0.log", "http://x", [False] * 9))
    srv.state = S.EXITED
    sup.servers["decode-0"] = srv
    starts: list[float] = []
    original = srv.proc.start

    def start() -> None:
        starts.append(time.monotonic())
        original()

    srv.proc.start = start  # type: ignore[method-assign]

    async def run() -> tuple[bool, bool]:
        first = await sup.restart("decode-0", "exited with code 3")
        again = await sup.restart("decode-0", "stall: overdue")
        await asyncio.sleep(0.05)  # the stop scheduled by giving up
        return first, again

    assert asyncio.run(run()) == (False, False)
    assert len(starts) == 3 and srv.streak == 3 and srv.state == S.FAILED
    gaps = [b - a for a, b in itertools.pairwise(starts)]
    assert gaps[0] >= 0.05 and gaps[1] >= 0.1  # 0.05 s, then doubled
    assert srv.failure is not None and srv.failure["last_cause"].startswith(
        "restart attempt failed: vLLM server decode-0 exited with code 3"
    )
    assert (S.FAILED, E.GIVE_UP) not in [(b, e) for b, e, _ in sup.moves]


def test_a_row_under_way_waits_before_its_next_restart(tmp_path):
    """A server that died again soon after a restart: the next restart waits the row's
    backoff first (tenacity's wait, not a sleep of the supervisor's)."""
    settings = config.load(
        {"WATCHDOG_KV_STATE_DIR": str(tmp_path), "WATCHDOG_KV_RESTART_BACKOFF": "0.2"}
    )
    sup = Recording(ServeOptions(Path("m"), "m", run_dir=tmp_path), settings)
    spec = ServerSpec("decode-0", "decode", Path("m"), "m", "127.0.0.1", 1, 2)
    (tmp_path / "decode-0.log").write_text("")
    srv = _Server(spec, FakeServer(spec, tmp_path / "decode-0.log", "http://x", [False]))
    srv.state, srv.streak = S.EXITED, 2  # two restarts in this row already
    sup.servers["decode-0"] = srv

    async def run() -> float:
        began = time.monotonic()
        await sup.restart("decode-0", "exited with code 3")  # exits, then given up at 3
        return time.monotonic() - began

    took = asyncio.run(run())
    assert took >= 0.4  # 0.2 * 2 ** (2 - 1) before the third restart
    assert srv.streak == 3 and srv.state == S.FAILED and srv.proc.started == 1
