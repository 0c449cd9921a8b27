"""Native crashes: the crash record a dying process writes, the diagnosis, the incident,
the supervisor's same-crash rule, and the router never asking a dead engine twice.

Crash records are made by real processes that really die of the signal; the
vLLM side (a worker killed in its model step) is in
tests/integration/test_resilience.py.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

from aiohttp import web
from aiohttp.test_utils import TestServer

from watchdog_kv import cli, process
from watchdog_kv.crash import record
from watchdog_kv.monitor import crashes as incident
from watchdog_kv.supervisor import deaths

ROOT = Path(__file__).resolve().parents[2]


def crash_a_process(tmp_path: Path, how: str = "signal.raise_signal(signal.SIGILL)") -> Path:
    """A real process that enables its crash record, starts a thread, and dies in ``forward``."""
    code = textwrap.dedent(
        f"""
        import signal, threading, time
        from pathlib import Path
        from watchdog_kv.crash import record
        print(record.enable(Path({str(tmp_path)!r})), flush=True)
        threading.Thread(target=lambda: time.sleep(60), name="helper", daemon=True).start()
        def forward():
            {how}
        forward()
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == -signal.SIGILL, done.stderr
    path = Path(done.stdout.strip())
    assert path == record.record_path(tmp_path, int(path.stem))
    return path


def test_a_process_that_dies_of_sigill_leaves_its_frames(tmp_path):
    path = crash_a_process(tmp_path)
    dump = record.parse(path.read_text())
    assert dump is not None
    assert (dump.signal, dump.fatal_error) == ("SIGILL", "Illegal instruction")
    assert dump.current[0].function == "forward" and dump.current[1].function == "<module>"
    assert dump.current_thread is not None and len(dump.threads) == 1  # the helper thread
    (helper,) = dump.threads.values()
    assert any(f.function == "<lambda>" for f in helper)


def test_parse_reads_a_server_log_with_vllm_prefixes_and_the_last_dump():
    log = textwrap.dedent(
        """\
        INFO starting
        Fatal Python error: Segmentation fault

        Current thread 0x0000000000000001 (most recent call first):
          File "/x/site-packages/old.py", line 1 in old

        (VllmWorker pid=42) INFO 12-01 loading
        Fatal Python error: Illegal instruction

        Thread 0x00007f0000000002 (most recent call first):
          File "/usr/lib/python3.11/threading.py", line 320 in wait

        Current thread 0x00007f0000000001 (most recent call first):
          File "/v/site-packages/torch/_ops.py", line 1267 in __call__
          File "/v/site-packages/vllm/_custom_ops.py", line 3061 in cpu_attention_with_kv_cache
          File "/v/site-packages/vllm/v1/attention/backends/cpu_attn.py", line 410 in forward
          File "/v/site-packages/torch/nn/modules/module.py", line 1786 in _call_impl
          File "/v/site-packages/vllm/model_executor/models/llama.py", line 250 in forward

        Extension modules: numpy (total: 1)
        INFO after
        """
    )
    dump = record.parse(log)
    assert dump is not None and dump.signal == "SIGILL"
    assert [f.label() for f in dump.current][:3] == [
        "torch/_ops.py:__call__",
        "vllm/_custom_ops.py:cpu_attention_with_kv_cache",
        "vllm/v1/attention/backends/cpu_attn.py:forward",
    ]
    assert record.parse("no crash here\n") is None
    # the culprit is the caller that named the native op, not torch's dispatch
    (crash,) = incident.diagnose(
        "decode-0", [worker_record(21)], lambda: log.splitlines(), wait_s=0
    )
    assert crash.summary() == "SIGILL in vllm/_custom_ops.py:cpu_attention_with_kv_cache"
    assert crash.frames[:2] == [
        "cpu_attention_with_kv_cache (vllm/_custom_ops.py:3061)",
        "forward (vllm/v1/attention/backends/cpu_attn.py:410)",
    ]
    assert "AMX" in (incident.hint_for(crash) or "")


def test_disable_removes_an_empty_record(tmp_path):
    code = textwrap.dedent(
        f"""
        import faulthandler, os
        from pathlib import Path
        from watchdog_kv.crash import record
        faulthandler.disable()
        path = record.enable(Path({str(tmp_path)!r}))
        assert record.enable(Path({str(tmp_path)!r})) == path  # idempotent
        assert path.exists() and faulthandler.is_enabled()
        record.disable()
        assert not path.exists() and not faulthandler.is_enabled()
        faulthandler.enable()
        assert record.enable(Path({str(tmp_path)!r})) is None  # the operator's stays
        faulthandler.disable()
        parent = record.enable(Path({str(tmp_path)!r}))
        child = os.fork()
        if child == 0:  # a forked child keeps a record of its own
            mine = record.enable(Path({str(tmp_path)!r}))
            os._exit(0 if mine != parent and mine.name == f"{{os.getpid()}}.log" else 1)
        assert os.waitpid(child, 0)[1] == 0
        """
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=ROOT)
    assert done.returncode == 0, done.stderr


def worker_record(pid: int, crash_record: str | None = None, ppid: int = 99999999) -> dict:
    return {
        "pid": pid,
        "ppid": ppid,
        "role": "worker",
        "rank": 0,
        "process_name": "VllmWorker-0",
        "server": "decode-0",
        "crash_record": crash_record,
        "registered_at": time.time(),
    }


def test_diagnose_names_the_crashing_worker_and_its_frame(tmp_path):
    path = crash_a_process(tmp_path)
    engine = dict(worker_record(7), role="engine_core", process_name="EngineCore")
    crashes = incident.diagnose(
        "decode-0",
        [engine, worker_record(int(path.stem), str(path))],
        lambda: ["(APIServer pid=5) ERROR EngineCore encountered an issue."],
        api_pid=5,
        api_exit=None,
        wait_s=0,
    )
    culprit = crashes[0]
    assert (culprit.role, culprit.signal, culprit.source) == ("worker", "SIGILL", "crash record")
    assert culprit.frame == "<string>:forward"  # a -c script: its "file" is <string>
    assert culprit.summary() == "SIGILL in <string>:forward"
    assert (
        culprit.describe() == f"decode-0 worker rank 0 (pid {path.stem}) died: {culprit.summary()}"
    )
    assert culprit.signature == ("SIGILL", "<string>:forward") and not culprit.injected
    assert [c.role for c in crashes] == ["worker", "engine_core"]  # the API server is alive


def test_a_worker_without_a_record_is_known_from_vllms_log_line():
    log = [
        "(EngineCore pid=11) ERROR 12-01 [multiproc_executor.py:316] Worker proc VllmWorker-0 "
        "died unexpectedly (exit code: -4), shutting down executor.",
        "(EngineCore pid=12) ERROR Worker proc VllmWorker-0 died unexpectedly (exit code: -9)",
    ]
    crashes = incident.diagnose("decode-0", [worker_record(21, ppid=11)], lambda: log, wait_s=0)
    assert (crashes[0].signal, crashes[0].exit_code, crashes[0].source) == (
        "SIGILL",
        -4,
        "vLLM's log",
    )
    assert crashes[0].signature is None  # no frame: not comparable


def test_diagnose_waits_briefly_for_vllms_line_while_the_engine_core_lives():
    lines: list[str] = []
    clock = [0.0]

    def sleep(seconds: float) -> None:
        clock[0] += seconds
        if clock[0] >= 0.3:  # the engine core logs the death a moment later
            lines.append(
                f"(EngineCore pid={os.getpid()}) ERROR Worker proc VllmWorker-0 died "
                "unexpectedly (exit code: -11)"
            )

    crashes = incident.diagnose(
        "decode-0",
        [worker_record(21, ppid=os.getpid())],  # "the engine core": alive (this process)
        lambda: list(lines),
        wait_s=2.0,
        now=lambda: clock[0],
        sleep=sleep,
    )
    assert crashes[0].signal == "SIGSEGV" and clock[0] < 2.0


def test_an_api_server_killed_from_outside_is_named_by_its_exit_code():
    crashes = incident.diagnose("prefill-0", [], lambda: [], api_pid=3, api_exit=-9, wait_s=0)
    (api,) = crashes
    assert (api.role, api.signal, api.source, api.frame) == (
        "api_server",
        "SIGKILL",
        "exit code",
        None,
    )
    assert api.summary() == "SIGKILL" and api.signature is None


def test_a_faulthandler_the_operator_enabled_is_read_from_the_server_log(tmp_path):
    path = crash_a_process(tmp_path)
    crashes = incident.diagnose(
        "decode-0", [worker_record(21)], lambda: path.read_text().splitlines(), wait_s=0
    )
    assert crashes[0].source == "server log (faulthandler)" and crashes[0].signal == "SIGILL"


def test_a_crash_raised_by_our_fault_injection_is_marked_and_named_past_our_frames(tmp_path):
    path = crash_a_process(
        tmp_path,
        how="from watchdog_kv import faults; faults.arm(Path("
        f"{str(tmp_path)!r}), 's', 'crash_step'); "
        f"faults.rehearse_step(faults.parse_faults('crash_step'), Path({str(tmp_path)!r}), 's')",
    )
    (crash,) = incident.diagnose("s", [worker_record(1, str(path))], lambda: [], wait_s=0)
    assert crash.injected and crash.frame == "<string>:forward"
    assert all("watchdog_kv" not in f for f in crash.frames)
    assert incident.hint_for(crash).startswith("a rehearsal")


def test_incident_is_written_read_back_and_reported(tmp_path, capsys):
    path = crash_a_process(tmp_path)
    crashes = incident.diagnose(
        "decode-0", [worker_record(int(path.stem), str(path))], lambda: [], wait_s=0
    )
    crashes[0].frame = "vllm/_custom_ops.py:cpu_attention_with_kv_cache"  # as parsed above
    log = ["loading", "Fatal Python error: Illegal instruction", "nanobind: leaked"]
    folder = incident.write_incident(
        tmp_path / "dumps", crashes, incident.around_death(log), "/x/decode-0.log"
    )
    data = json.loads((folder / "incident.json").read_text())
    assert data["kind"] == "crash" and data["log_tail"] == log[:2]  # not the shutdown noise
    assert "AMX" in data["hint"]
    (item,) = incident.load_crash_incidents(tmp_path / "dumps")
    text = incident.render(item)
    assert "crash:   decode-0 worker rank 0" in text
    assert "SIGILL in vllm/_custom_ops.py:cpu_attention_with_kv_cache" in text
    assert "signal:  SIGILL (from its crash record)" in text
    assert "note:    vLLM's AMX attention kernel" in text
    # the command line merges it with stall incidents (none here)
    assert cli.main(["report", str(tmp_path / "dumps")]) == 0
    assert "SIGILL in vllm/_custom_ops.py:cpu_attention_with_kv_cache" in capsys.readouterr().out
    assert cli.main(["report", "--json", str(tmp_path / "dumps")]) == 0
    (entry,) = json.loads(capsys.readouterr().out)
    assert entry["kind"] == "crash" and entry["crash"]["signal"] == "SIGILL"


def test_dead_engines_are_those_of_this_incarnation_that_are_gone():
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)"])
    try:
        now = time.time()
        live = dict(worker_record(sleeper.pid), registered_at=now)
        gone = dict(worker_record(2**22 + 12345), registered_at=now, alive=False)
        older = dict(gone, registered_at=now - 100)
        other = dict(gone, server="decode-1")
        api = dict(gone, role="api_server")
        ticks = process.start_ticks(os.getpid())
        assert ticks is not None and process.start_ticks(sleeper.pid) is not None
        live["start_ticks"] = process.start_ticks(sleeper.pid)
        # this pid, but the record's process started earlier: the pid was reused
        reused = dict(worker_record(os.getpid()), registered_at=now, start_ticks=ticks - 100)
        # a record of another host: its pid means nothing here, it is not judged
        elsewhere = dict(gone, boot_id="another-host")
        found = deaths.dead_engines(
            [live, gone, older, other, api, reused, elsewhere], "decode-0", now - 10
        )
        assert found == [gone, reused]
    finally:
        sleeper.kill()
        sleeper.wait()
    zombie = subprocess.Popen([sys.executable, "-c", "pass"])
    os.waitid(os.P_PID, zombie.pid, os.WEXITED | os.WNOWAIT)  # exited, not reaped: a zombie
    rec = dict(worker_record(zombie.pid), registered_at=time.time() - 5)
    assert deaths.dead_engines([rec], "decode-0", 0) == [rec]
    zombie.wait()


def test_same_crash_again_needs_a_signal_and_a_frame():
    def crash(sig, frame):
        return incident.Crash("s", 1, "worker", 0, "w", signal=sig, frame=frame)

    first = crash("SIGILL", "vllm/_custom_ops.py:cpu_attention_with_kv_cache")
    assert not deaths.same_crash_again(None, first)
    assert deaths.same_crash_again(first, crash("SIGILL", first.frame))
    assert not deaths.same_crash_again(first, crash("SIGSEGV", first.frame))
    assert not deaths.same_crash_again(crash("SIGKILL", None), crash("SIGKILL", None))


# -- the supervisor: a crash is restarted once, the same crash again is failed -------------


class FakeServer:
    name = "decode-0"

    def __init__(self, spec, log: Path):
        self.spec, self.log_path, self.pid, self.started = spec, log, 4242, 0

    url = "http://127.0.0.1:1"

    def start(self):
        self.started += 1

    def poll(self):
        return None

    def tail(self, lines=20):
        return []

    def stop(self, grace=20.0):
        return []

    def where(self):
        return {}


def test_supervisor_restarts_a_crash_once_and_fails_the_same_crash_again(tmp_path):
    from watchdog_kv import config
    from watchdog_kv.supervisor.core import ServeOptions, Supervisor, _Server
    from watchdog_kv.supervisor.servers import ServerSpec

    settings = config.load({"WATCHDOG_KV_STATE_DIR": str(tmp_path)})
    sup = Supervisor(ServeOptions(Path("m"), "m", run_dir=tmp_path), settings)
    spec = ServerSpec("decode-0", "decode", Path("m"), "m", "127.0.0.1", 1, 2)
    log = tmp_path / "decode-0.log"
    log.write_text("")
    srv = _Server(spec, FakeServer(spec, log))
    srv.state = "ready"
    sup.servers["decode-0"] = srv
    restarts: list[str] = []

    async def restart(name: str, cause: str) -> bool:
        restarts.append(cause)
        srv.state = "ready"
        return True

    sup.restart = restart  # type: ignore[method-assign]
    path = crash_a_process(tmp_path)
    dead = [worker_record(int(path.stem), str(path))]

    async def die() -> None:
        srv.state = "exited"
        await sup._after_death(srv, None, dead, "its engine died")

    asyncio.run(die())
    assert srv.state == "ready" and len(restarts) == 1
    assert (
        restarts[0] == f"engine died: decode-0 worker rank 0 (pid {path.stem}) died: "
        "SIGILL in <string>:forward"
    )
    assert srv.crashes[0]["summary"] == "SIGILL in <string>:forward"
    assert Path(srv.crashes[0]["incident"], "incident.json").is_file()
    asyncio.run(die())
    assert srv.state == "failed" and len(restarts) == 1
    assert srv.failure is not None
    assert srv.failure["reason"].startswith(
        "crashed twice in a row the same way: SIGILL in <string>:forward"
    )
    assert srv.failure["diagnosis"]["signal"] == "SIGILL"
    assert srv.failure["incident"] == srv.crashes[-1]["incident"]
    assert sup.status()["servers"]["decode-0"]["crashes"] == srv.crashes


# -- the router: a dead engine is never asked again within a request ------------------------


def test_the_ladder_never_retries_a_dead_engine_and_waits_for_its_restart():
    from watchdog_kv import config
    from watchdog_kv.router.app import build_app
    from watchdog_kv.router.handoff import Backend

    calls: list[str] = []
    dead_body = {
        "error": {
            "message": "EngineCore encountered an issue. See stack trace "
            "(above) for the root cause.",
            "type": "InternalServerError",
            "code": 500,
        }
    }

    def decode(name: str, healthy):
        async def handle(request: web.Request) -> web.Response:
            calls.append(name)
            if not healthy():
                return web.json_response(dead_body, status=500)
            # the router streams from the decode even for a whole answer, as vLLM would
            chunk = {
                "id": "cmpl-1",
                "created": 1,
                "model": "m",
                "choices": [
                    {
                        "index": 0,
                        "text": f"from {name}",
                        "finish_reason": "length",
                        "token_ids": [7],
                        "prompt_token_ids": [1],
                    }
                ],
            }
            stream = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            await stream.prepare(request)
            await stream.write(f"data: {json.dumps(chunk)}\n\ndata: [DONE]\n\n".encode())
            await stream.write_eof()
            return stream

        app = web.Application()
        app.router.add_post("/v1/completions", handle)
        return app

    class Backends:
        run_dir = Path(".")

        def __init__(self, a_url: str, b_url: str):
            self.epoch = 0
            self.a, self.b = a_url, b_url
            self.b_listed = True

        def ready(self):
            return True

        def roles(self):
            return {"decode"}

        def available(self, role):
            out = [Backend("decode-a", self.a, self.epoch)]
            if self.b_listed:
                out.append(Backend("decode-b", self.b, 0))
            return out

        async def wait_available(self, role, timeout_s):
            return self.available(role)

        def status(self):
            return {}

        def health(self):
            return {}

        def serving_role(self):
            return "decode"

        def counts(self):
            return {}

    async def scenario() -> None:
        a = TestServer(decode("decode-a", lambda: backends.epoch > 0))
        b = TestServer(decode("decode-b", lambda: False))
        await a.start_server()
        await b.start_server()
        backends = Backends(str(a.make_url("")).rstrip("/"), str(b.make_url("")).rstrip("/"))
        settings = config.load({})
        router = TestServer(build_app(backends, settings))
        await router.start_server()
        try:
            import aiohttp

            async def restart_a_later() -> None:
                await asyncio.sleep(1.2)  # both engines seen dead; decode-a comes back
                backends.epoch, backends.b_listed = 1, False

            restarting = asyncio.ensure_future(restart_a_later())
            async with (
                aiohttp.ClientSession() as http,
                http.post(
                    router.make_url("/v1/completions"),
                    json={"model": "m", "prompt": "p", "max_tokens": 2},
                ) as resp,
            ):
                body = await resp.json()
                assert resp.status == 200, body
                assert body["choices"][0]["text"] == "from decode-a"
                assert resp.headers["X-Watchdog-Recovery"] == "decode_retry,decode_retry"
            await restarting
        finally:
            await router.close()
            await a.close()
            await b.close()

    asyncio.run(scenario())
    # each dead engine asked once; then decode-a's restarted self
    assert calls == ["decode-a", "decode-b", "decode-a"]


def test_servers_without_the_plugin_log_their_crashes_through_faulthandler(tmp_path):
    from watchdog_kv.supervisor.servers import ServerSpec

    def env(enabled: bool, base: dict[str, str]) -> dict[str, str]:
        spec = ServerSpec("d", "decode", Path("m"), "m", "h", 1, 2, plugin_enabled=enabled)
        return spec.env(base, tmp_path)

    assert env(False, {})["PYTHONFAULTHANDLER"] == "1"
    assert "PYTHONFAULTHANDLER" not in env(True, {})  # the plugin keeps the record, after AMX
    assert env(False, {"PYTHONFAULTHANDLER": "0"})["PYTHONFAULTHANDLER"] == "0"  # the operator's


def test_a_restart_row_whose_attempts_crash_the_same_way_ends_failed(tmp_path):
    """The real restart path: each start's worker dies at once with the same dump; the
    second identical crash ends the row (not the restart limit)."""
    from watchdog_kv import config
    from watchdog_kv.supervisor.core import ServeOptions, Supervisor, _Server
    from watchdog_kv.supervisor.servers import ServerSpec

    dump = crash_a_process(tmp_path)
    procs = tmp_path / "procs"
    procs.mkdir()

    class CrashingServer(FakeServer):
        def start(self):  # the new incarnation registers, and its worker is already dead
            super().start()
            rec = worker_record(int(dump.stem), str(dump))
            process.write_json(procs / f"{dump.stem}.json", rec)

    settings = config.load(
        {
            "WATCHDOG_KV_STATE_DIR": str(tmp_path),
            "WATCHDOG_KV_RESTART_LIMIT": "5",
            "WATCHDOG_KV_RESTART_BACKOFF": "0.01",
        }
    )
    sup = Supervisor(ServeOptions(Path("m"), "m", run_dir=tmp_path), settings)
    spec = ServerSpec("decode-0", "decode", Path("m"), "m", "127.0.0.1", 1, 2)
    (tmp_path / "decode-0.log").write_text("")
    srv = _Server(spec, CrashingServer(spec, tmp_path / "decode-0.log"))
    srv.state = "exited"  # the death the restart answers
    sup.servers["decode-0"] = srv

    async def run() -> bool:
        done = await sup.restart("decode-0", "exited with signal SIGKILL")
        await asyncio.sleep(0.1)  # the stop scheduled by giving up
        return done

    assert asyncio.run(run()) is False
    assert srv.proc.started == 2 and len(srv.restarts) == 2  # not the limit of 5
    assert srv.state == "failed" and srv.failure is not None
    assert srv.failure["reason"].startswith("crashed twice in a row the same way: SIGILL in")
    assert [c["summary"] for c in srv.crashes] == ["SIGILL in <string>:forward"] * 2


def test_a_death_during_a_stall_restart_is_still_handled_as_a_death(tmp_path):
    """A stall restart is taking its evidence when the server's engine dies: the death's
    own work is not scheduled (one restart at a time), so the stall restart hands over."""
    from watchdog_kv import config
    from watchdog_kv.stalls import Stall
    from watchdog_kv.supervisor.core import ServeOptions, Supervisor, _Server
    from watchdog_kv.supervisor.servers import ServerSpec

    settings = config.load({"WATCHDOG_KV_STATE_DIR": str(tmp_path)})
    sup = Supervisor(ServeOptions(Path("m"), "m", run_dir=tmp_path), settings)
    spec = ServerSpec("decode-0", "decode", Path("m"), "m", "127.0.0.1", 1, 2)
    (tmp_path / "decode-0.log").write_text("")
    srv = _Server(spec, FakeServer(spec, tmp_path / "decode-0.log"))
    srv.state = "ready"
    sup.servers["decode-0"] = srv
    stall = Stall(1, "worker", 0, "decode-0", "VllmWorker-0", "overdue", "step", "", 11, 10, 1, 1)
    path = crash_a_process(tmp_path)
    causes: list[str] = []

    class Monitor:
        def evidence(self, stall, timeout):
            # meanwhile, the engine dies and the watch sees it
            sup._died(srv, None, [worker_record(int(path.stem), str(path))])
            return None

        def current(self, server=None):
            return []  # the dead process's stall is gone

    async def restart(name: str, cause: str) -> bool:
        causes.append(cause)
        return True

    sup.monitor = Monitor()  # type: ignore[assignment]
    sup.restart = restart  # type: ignore[method-assign]

    async def run() -> None:
        sup._restarting.add("decode-0")  # the stall restart under way
        await sup._restart_after(stall)

    asyncio.run(run())
    assert causes == [
        f"engine died: decode-0 worker rank 0 (pid {path.stem}) died: SIGILL in <string>:forward"
    ]
    assert srv.crashes and srv.death is None


def test_a_group_killed_at_once_is_named_by_its_api_servers_signal(tmp_path):
    """kill -9 of a whole server: its engine processes can be seen gone a moment before
    its API server; the cause is the API server's SIGKILL, not an unknown engine death."""
    from watchdog_kv import config
    from watchdog_kv.supervisor.core import ServeOptions, Supervisor, _Server
    from watchdog_kv.supervisor.servers import ServerSpec

    class DyingServer(FakeServer):
        polls = 0

        def poll(self):
            self.polls += 1
            return None if self.polls < 3 else -9

    settings = config.load({"WATCHDOG_KV_STATE_DIR": str(tmp_path)})
    sup = Supervisor(ServeOptions(Path("m"), "m", run_dir=tmp_path), settings)
    spec = ServerSpec("prefill-0", "prefill", Path("m"), "m", "127.0.0.1", 1, 2)
    (tmp_path / "prefill-0.log").write_text("")
    srv = _Server(spec, DyingServer(spec, tmp_path / "prefill-0.log"))
    sup.servers["prefill-0"] = srv
    causes: list[str] = []

    async def restart(name: str, cause: str) -> bool:
        causes.append(cause)
        return True

    sup.restart = restart  # type: ignore[method-assign]
    gone = [worker_record(2**22 + 777), dict(worker_record(2**22 + 778), role="engine_core")]
    asyncio.run(sup._after_death(srv, None, gone, "its engine died"))
    assert causes == ["exited with signal SIGKILL"]
    assert srv.crashes[-1]["message"] == "prefill-0 api_server (pid 4242) died: SIGKILL"
