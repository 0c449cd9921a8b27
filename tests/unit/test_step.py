"""Step watchdog parts: beacon, learned deadlines, stall rules, and detection from
outside a real process that holds the GIL in C or is stopped.

The watched processes here are small Python programs, not vLLM: they write a
beacon exactly as the hooks do, which is all the monitor reads. The same path
on real vLLM engines is in tests/integration/test_step_watchdog.py.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import textwrap
import time

import pytest

from watchdog_kv import process as procrecords
from watchdog_kv.beacon import RING_SLOTS, Beacon, Phase, read_beacon
from watchdog_kv.monitor.evidence import process_state
from watchdog_kv.monitor.report import build_report, render
from watchdog_kv.monitor.watcher import Monitor
from watchdog_kv.stalls import find_stalls
from watchdog_kv.step.deadlines import Kind, Limits, StepDeadlines

LIMITS = {
    Kind.STARTUP: Limits(60, 900),
    Kind.STEP: Limits(5, 300),
    Kind.CONNECTOR: Limits(5, 120),
}


def test_beacon_phases_nest_and_read_back(tmp_path):
    b = Beacon(tmp_path, pid=4242)
    step = b.enter(Phase.STEP, 7.0, "EngineCore.step")
    inner = b.enter(Phase.CONNECTOR, 3.0, "start_load_kv")
    view, _ = read_beacon(b.path)
    assert (view.phase, view.what, view.deadline_s, view.seq) == (
        Phase.CONNECTOR,
        "start_load_kv",
        3.0,
        2,
    )
    b.exit(inner)
    view, _ = read_beacon(b.path)
    assert (view.phase, view.what, view.deadline_s, view.phase_started) == (
        Phase.STEP,
        "EngineCore.step",
        7.0,
        step,
    )
    b.exit(step, step_done=True)
    view, _ = read_beacon(b.path)
    assert view.phase is Phase.IDLE and view.steps == 1 and not view.torn


def test_flight_recorder_keeps_the_most_recent_events(tmp_path):
    b = Beacon(tmp_path, pid=4243)
    for i in range(RING_SLOTS + 10):
        b.record({"event": "e", "i": i, "blob": "x" * 1000})  # longer than a slot: cut
    _, events = read_beacon(b.path)
    assert len(events) == RING_SLOTS
    assert events[0]["event"] == "unreadable"  # cut JSON is kept as raw text
    b.record({"event": "last", "i": -1})
    _, events = read_beacon(b.path)
    assert events[-1]["event"] == "last" and len(events) == RING_SLOTS


def test_deadlines_learn_within_floor_and_cap(tmp_path):
    d = StepDeadlines(LIMITS, slack=4)
    assert d.deadline(Kind.STEP) == 5  # floor before anything was seen
    assert d.deadline(Kind.STARTUP) == 900  # cap: a first start is unknown
    d.observe(Kind.STEP, 0.05)
    assert d.deadline(Kind.STEP) == 5
    d.observe(Kind.STEP, 2.0)
    assert d.deadline(Kind.STEP) == 8.0
    d.observe(Kind.STEP, 500)
    assert d.deadline(Kind.STEP) == 300
    path = tmp_path / "learned.json"
    d.save_startup(path, "decode-0/engine_core", 40.0)
    fresh = StepDeadlines(LIMITS, slack=4)
    fresh.load_startup(path, "decode-0/engine_core")
    assert fresh.deadline(Kind.STARTUP) == 160.0


def _records(*recs):
    return [{"alive": True, "server": "s", **r} for r in recs]


def test_stall_rules(tmp_path):
    engine = Beacon(tmp_path, pid=100)
    front = Beacon(tmp_path, pid=200)
    recs = _records(
        {"pid": 100, "ppid": 200, "role": "engine_core", "rank": 0},
        {"pid": 200, "ppid": 1, "role": "api_server", "rank": None},
    )
    views = lambda: {p: read_beacon(b.path)[0] for p, b in ((100, engine), (200, front))}  # noqa: E731
    engine.set_idle_deadline(2.0)
    now = time.monotonic()
    assert find_stalls(recs, views(), now + 100) == []  # idle, nothing outstanding: not stuck

    # work outstanding since `now`, engine never stepped after it
    front.set_outstanding(0, 3, now)
    front.touch()
    assert find_stalls(recs, views(), now + 1.5) == []
    (stall,) = find_stalls(recs, views(), now + 3)
    assert (stall.pid, stall.reason, stall.outstanding) == (100, "no_progress", 3)
    # a front end that stopped updating is not believed
    assert find_stalls(recs, views(), now + 60) == []

    started = engine.enter(Phase.STEP, 2.0, "EngineCore.step")
    (stall,) = find_stalls(recs, views(), started + 2.5)
    assert (stall.reason, stall.phase, stall.what) == ("overdue", "step", "EngineCore.step")
    assert find_stalls(recs, views(), started + 1.5) == []
    dead = [dict(r, alive=r["pid"] != 100) for r in recs]
    assert find_stalls(dead, views(), started + 2.5) == []  # an exited process is not stalled


WATCHED = textwrap.dedent(
    """
    import os, sys, time
    from pathlib import Path
    from watchdog_kv import faults, process
    from watchdog_kv.beacon import Beacon, Phase

    state = Path(sys.argv[1])
    process.write_record(state, process.StatusRecord(
        pid=os.getpid(), ppid=os.getppid(), role="worker", rank=0,
        process_name="VllmWorker-0", server="rehearsal"))
    beacon = Beacon(state)
    beacon.record({"event": "step.startup_done", "seconds": 0.1})

    def execute_model():
        beacon.enter(Phase.STEP, 1.0, "Worker.execute_model")
        print("in step", flush=True)
        if sys.argv[2] == "gil":
            faults.hold_gil(60)
        else:
            while True:
                time.sleep(0.05)

    execute_model()
    """
)


@pytest.fixture
def watched(tmp_path):
    script = tmp_path / "fake_worker.py"
    script.write_text(WATCHED)
    procs = []

    def start(mode):
        proc = subprocess.Popen(
            [sys.executable, str(script), str(tmp_path / "state"), mode],
            stdout=subprocess.PIPE,
            text=True,
        )
        procs.append(proc)
        assert proc.stdout.readline().strip() == "in step"
        return proc, time.monotonic()

    yield start
    for proc in procs:
        os.kill(proc.pid, signal.SIGCONT)
        proc.kill()
        proc.wait()


def _detect(tmp_path, started, timeout=15.0):
    stalls = []
    mon = Monitor(
        tmp_path / "state",
        tmp_path / "dumps",
        interval_s=0.05,
        on_stall=lambda s: stalls.append((time.monotonic(), s)),
    )
    mon.start()
    try:
        deadline = time.monotonic() + timeout
        while not stalls and time.monotonic() < deadline:
            time.sleep(0.02)
        assert stalls, "the monitor did not see the stall"
        detected_at, stall = stalls[0]
        assert mon.evidence(stall, timeout=30) is not None
    finally:
        mon.stop()
    return detected_at - started, stall


def test_stall_with_the_gil_held_in_c_is_detected_and_named(tmp_path, watched):
    proc, started = watched("gil")
    latency, stall = _detect(tmp_path, started)
    assert stall.pid == proc.pid and stall.reason == "overdue"
    assert 1.0 <= latency < 3.0  # deadline 1 s, checked every 0.05 s
    print(f"\n[measured] GIL held in C, 1 s deadline: detected after {latency:.2f} s")
    (item,) = build_report(tmp_path / "dumps")
    culprit = item["culprit"]
    assert culprit["pid"] == proc.pid and culprit["role"] == "worker"
    assert culprit["owns_gil"], "py-spy should see the thread holding the GIL"
    assert culprit["frame"].startswith("execute_model (fake_worker.py:")
    assert any("hold_gil" in f for f in culprit["injected"])
    assert any("sleep" in f for f in culprit["native"]), culprit["native"]
    assert item["flight_recorder"][0]["event"] == "step.startup_done"
    text = render(build_report(tmp_path / "dumps"))
    assert "holding the GIL" in text and "execute_model" in text


def test_stopped_process_is_detected_and_stays_stopped(tmp_path, watched):
    proc, _ = watched("sleep")
    os.kill(proc.pid, signal.SIGSTOP)
    stopped_at = time.monotonic()
    latency, stall = _detect(tmp_path, stopped_at)
    assert stall.pid == proc.pid
    assert latency < 3.0
    print(f"\n[measured] stopped process, 1 s deadline: detected {latency:.2f} s after SIGSTOP")
    (item,) = build_report(tmp_path / "dumps")
    assert item["culprit"]["state"] == "T"
    assert item["culprit"]["frame"].startswith("execute_model (fake_worker.py:")
    assert process_state(proc.pid) == "T", "collecting evidence must not resume a stopped process"
    incident = json.loads(next((tmp_path / "dumps").glob("*/incident.json")).read_text())
    assert incident["stall"]["pid"] == proc.pid
    assert procrecords.read_records(tmp_path / "state")[0]["alive"]


def test_watch_learns_from_steps_but_not_from_a_stall(tmp_path):
    from watchdog_kv import config
    from watchdog_kv.step.watch import STARTUP_STEPS, StepWatch

    settings = config.load(
        {"WATCHDOG_KV_STATE_DIR": str(tmp_path), "WATCHDOG_KV_STEP_FLOOR": "0.2"}
    )
    watch = StepWatch(settings, "worker", pid=31337)
    view, _ = read_beacon(watch.beacon.path)
    assert view.phase is Phase.STARTUP and view.deadline_s == settings.startup_cap_s
    time.sleep(0.05)  # the model "loads"
    with watch.connector_call("get_finished"):  # first calls set themselves up: startup
        view, _ = read_beacon(watch.beacon.path)
        assert view.phase is Phase.CONNECTOR and view.deadline_s >= settings.startup_floor_s
    for _ in range(STARTUP_STEPS):  # the first steps are held to the startup deadline
        with watch.step("Worker.execute_model"):
            view, _ = read_beacon(watch.beacon.path)
            assert view.deadline_s >= settings.startup_floor_s
    with watch.step("Worker.execute_model"):
        time.sleep(0.1)
    learned = watch.deadlines.deadline(Kind.STEP)
    assert 0.4 <= learned < 1.0  # 4 x the longest step, above the 0.2 s floor
    with watch.step("Worker.execute_model"):
        view, _ = read_beacon(watch.beacon.path)
        assert view.phase is Phase.STEP and view.deadline_s == learned
        time.sleep(learned + 0.1)  # overruns: a stall
    assert watch.deadlines.deadline(Kind.STEP) == learned, "a stall must not stretch it"
    with watch.connector_call("start_load_kv"):
        view, _ = read_beacon(watch.beacon.path)
        assert (view.phase, view.what) == (Phase.CONNECTOR, "start_load_kv")
        assert view.deadline_s == settings.connector_floor_s
    view, _ = read_beacon(watch.beacon.path)
    assert view.phase is Phase.IDLE and view.deadline_s == learned  # the no-progress deadline
    # the start-up time is remembered for the next start of this server and role
    again = StepWatch(settings, "worker", pid=31338)
    assert again.deadlines.deadline(Kind.STARTUP) == settings.startup_floor_s


def test_connector_calls_of_a_step_are_timed_on_the_connector_instance(tmp_path, monkeypatch):
    """vLLM 0.32's model runner polls NIXL through ``get_transfer_results``: a step
    stuck there must show as that connector call, not as the step around it."""
    from watchdog_kv import config
    from watchdog_kv.instrument.connector import attach
    from watchdog_kv.step.watch import StepWatch

    settings = config.load({"WATCHDOG_KV_STATE_DIR": str(tmp_path)})
    watch = StepWatch(settings, "worker", pid=31339)
    seen = {}

    class Connector:  # the worker-side calls of one step, as vLLM makes them
        def get_transfer_results(self, finished):
            seen["during"] = read_beacon(watch.beacon.path)[0]
            return ("results", finished)

        def start_load_kv(self, forward_context):
            raise RuntimeError("vLLM's own error")

        def build_connector_worker_meta(self):  # bookkeeping: left to the step's deadline
            seen["meta"] = read_beacon(watch.beacon.path)[0]

    connector = Connector()
    got = attach(connector, "worker", settings, kv=False, step=watch)
    try:
        with watch.step("Worker.execute_model"):
            assert connector.get_transfer_results({"r"}) == ("results", {"r"})
            with pytest.raises(RuntimeError, match="vLLM's own error"):
                connector.start_load_kv(None)
            connector.build_connector_worker_meta()
        assert (seen["during"].phase, seen["during"].what) == (
            Phase.CONNECTOR,
            "get_transfer_results",
        )
        assert (seen["meta"].phase, seen["meta"].what) == (Phase.STEP, "Worker.execute_model")
    finally:
        got.detach()
    assert not {"get_transfer_results", "start_load_kv"} & set(vars(connector))


def test_every_connector_call_watched_exists_on_vllms_nixl_connector():
    nixl = pytest.importorskip(
        "vllm.distributed.kv_transfer.kv_connector.v1.nixl.connector",
        reason="vLLM not installed here (nox -s tests installs it)",
    )
    from watchdog_kv.instrument.connector import CONNECTOR_CALLS

    assert all(callable(getattr(nixl.NixlPullConnector, name, None)) for name in CONNECTOR_CALLS)
    # NIXL answers get_transfer_results itself, without get_finished: it must be timed.
    assert "get_transfer_results" in vars(nixl.NixlBaseConnector)


def test_watch_disables_itself_on_its_own_failure(tmp_path):
    from watchdog_kv import config
    from watchdog_kv.guard import clear_internal_errors, internal_errors
    from watchdog_kv.step.watch import StepWatch

    watch = StepWatch(config.load({"WATCHDOG_KV_STATE_DIR": str(tmp_path)}), "worker", pid=7)
    watch.beacon._mm.close()  # our own state breaks
    ran = []
    with watch.step("Worker.execute_model"):
        ran.append(True)  # vLLM's step still runs
    assert ran and not watch.enabled
    assert internal_errors()
    clear_internal_errors()
    # and vLLM's exceptions pass through untouched
    with pytest.raises(KeyError), watch.step("Worker.execute_model"):
        raise KeyError("vllm's own")


def test_cpu_starvation_is_not_counted_and_a_waiting_engine_is_not_blamed(tmp_path):
    engine, worker = Beacon(tmp_path, pid=300), Beacon(tmp_path, pid=301)
    recs = _records(
        {"pid": 300, "ppid": 1, "role": "engine_core", "rank": 0},
        {"pid": 301, "ppid": 300, "role": "worker", "rank": 0},
    )
    started = engine.enter(Phase.STEP, 2.0, "EngineCore.step")
    worker.enter(Phase.STEP, 2.0, "Worker.execute_model")
    views = {p: read_beacon(b.path)[0] for p, b in ((300, engine), (301, worker))}
    # the worker waited 1.5 s of its 3 s for a CPU: 1.5 s counted, within its deadline,
    # and the engine core, waiting on that worker, is not stuck either
    assert find_stalls(recs, views, started + 3.0, starved={301: 1.5}) == []
    stalls = {s.pid: s for s in find_stalls(recs, views, started + 3.0, starved={301: 0.5})}
    assert set(stalls) == {300, 301}  # the worker is late, so the engine waiting on it is too
    assert stalls[301].starved_s == 0.5 and stalls[301].elapsed_s == 2.5
    # the engine itself overdue, its worker idle: the engine is blamed
    worker.reset()
    views = {p: read_beacon(b.path)[0] for p, b in ((300, engine), (301, worker))}
    (stall,) = find_stalls(recs, views, started + 3.0)
    assert stall.pid == 300


STARVED = textwrap.dedent(
    """
    import os, sys
    from pathlib import Path
    from watchdog_kv import process
    from watchdog_kv.beacon import Beacon, Phase

    os.sched_setaffinity(0, {0})
    os.nice(19)
    state = Path(sys.argv[1])
    process.write_record(state, process.StatusRecord(
        pid=os.getpid(), ppid=os.getppid(), role="worker", rank=0,
        process_name="VllmWorker-0", server="starved"))
    beacon = Beacon(state)
    beacon.enter(Phase.STEP, 1.0, "Worker.execute_model")
    print("in step", flush=True)
    x = 0
    while True:  # a step that works, but only gets the CPU now and then
        x += 1
    """
)


def test_a_step_starved_of_cpu_is_slow_not_stuck(tmp_path):
    """Real kernel accounting: a niced step sharing one core with a busy process
    waits on the run queue, and that wait is not held against its deadline."""
    script = tmp_path / "starved.py"
    script.write_text(STARVED)
    hog = subprocess.Popen(
        [sys.executable, "-c", "import os; os.sched_setaffinity(0, {0})\nwhile True: pass"]
    )
    proc = subprocess.Popen(
        [sys.executable, str(script), str(tmp_path / "state")], stdout=subprocess.PIPE, text=True
    )
    try:
        assert proc.stdout.readline().strip() == "in step"
        from watchdog_kv.stalls import StallRules

        rules = StallRules()
        recs = procrecords.read_records(tmp_path / "state")
        path = tmp_path / "state" / "beacons" / f"{proc.pid}.beacon"
        rules.find(recs, {proc.pid: read_beacon(path)[0]})  # first sight: the baseline
        time.sleep(3.0)  # 3 x its 1 s deadline in wall time
        view = read_beacon(path)[0]
        assert view.elapsed() > 3.0
        assert rules.find(recs, {proc.pid: view}) == [], "a starved step was called stuck"
        plain = find_stalls(recs, {proc.pid: view})
        assert plain and plain[0].pid == proc.pid  # wall time alone would have flagged it
    finally:
        for p in (proc, hog):
            p.kill()
            p.wait()


def test_vllm_health_of_a_dead_engine_names_the_processes_gone(tmp_path):
    """vLLM answers /health with an empty 503 once its engine is dead; with the guard
    the 503 says which process of the server is gone (and keeps vLLM's words, which
    the router reads as "engine dead")."""
    from types import SimpleNamespace

    from watchdog_kv.step.front import FrontGuard

    exceptions = pytest.importorskip("vllm.v1.engine.exceptions", reason="vLLM is not here")
    gone = subprocess.Popen([sys.executable, "-c", "pass"])
    gone.wait()
    api_server = procrecords.StatusRecord(
        pid=os.getpid(),
        ppid=os.getppid(),
        role="api_server",
        rank=None,
        process_name="MainProcess",
        server="decode-0",
    )
    procrecords.write_record(tmp_path, api_server)
    procrecords.write_record(
        tmp_path,
        procrecords.StatusRecord(
            pid=gone.pid,
            ppid=os.getpid(),
            role="engine_core",
            rank=0,
            process_name="EngineCore",
            server="decode-0",
        ),
    )
    guard = SimpleNamespace(pid=os.getpid(), settings=SimpleNamespace(state_dir=tmp_path))
    detail = FrontGuard.dead_detail(guard, exceptions.EngineDeadError())
    assert "EngineCore encountered an issue" in detail
    assert f"gone: engine_core pid {gone.pid} (EngineCore)" in detail
    assert FrontGuard.dead_detail(guard, RuntimeError("not ours to explain")) is None
