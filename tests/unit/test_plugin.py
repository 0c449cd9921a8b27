"""The plugin's registration: idempotent, switchable off, never breaking its host."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

import watchdog_kv
from watchdog_kv import config, guard, plugin


@pytest.fixture
def env(monkeypatch, tmp_path):
    for key in list(os.environ):
        if key.startswith("WATCHDOG_KV_"):
            monkeypatch.delenv(key)
    monkeypatch.setenv("WATCHDOG_KV_STATE_DIR", str(tmp_path / "state"))
    monkeypatch.setenv("WATCHDOG_KV_LOG_FORMAT", "json")
    plugin.unregister()
    yield monkeypatch
    plugin.unregister()


def _events(captured: str) -> list[dict]:
    return [json.loads(line) for line in captured.splitlines() if line.startswith("{")]


def test_register_is_idempotent_and_publishes_one_record(env, tmp_path, capsys):
    env.setenv("WATCHDOG_KV_SERVER", "decode-0")
    first = plugin.register()
    again = plugin.register()
    assert again is first
    assert first.enabled
    records = list((tmp_path / "state" / "procs").glob("*.json"))
    assert [r.name for r in records] == [f"{os.getpid()}.json"]
    record = json.loads(records[0].read_text())
    assert record["pid"] == os.getpid()
    assert record["server"] == "decode-0"
    assert record["role"] == first.identity.role
    registered = [
        e for e in _events(capsys.readouterr().err) if e["event"] == "watchdog_kv.registered"
    ]
    assert len(registered) == 1
    assert registered[0]["pid"] == os.getpid()
    assert registered[0]["role"] == first.identity.role
    assert registered[0]["server"] == "decode-0"


def test_disabled_installs_nothing_and_writes_nothing(env, tmp_path, capsys):
    env.setenv("WATCHDOG_KV_ENABLED", "0")
    reg = plugin.register()
    assert reg.enabled is False
    assert reg.hooks == []
    assert reg.record_path is None
    assert not (tmp_path / "state").exists()
    events = _events(capsys.readouterr().err)
    assert [e["event"] for e in events] == ["watchdog_kv.disabled"]


def test_bad_configuration_stops_registration_with_the_variable_named(env):
    env.setenv("WATCHDOG_KV_LOG_LEVEL", "chatty")
    with pytest.raises(watchdog_kv.ConfigError, match="WATCHDOG_KV_LOG_LEVEL='chatty'"):
        plugin.register()
    assert plugin.current() is None


def test_own_failure_disables_and_does_not_raise(env, tmp_path, capsys):
    blocker = tmp_path / "state"
    blocker.write_text("a file where the state directory should be")
    reg = plugin.register()  # must not raise into vLLM
    assert reg.enabled is False
    assert reg.record_path is None
    errors = guard.internal_errors()
    assert len(errors) == 1 and errors[0].startswith("registration:")
    guard.clear_internal_errors()  # provoked on purpose
    events = _events(capsys.readouterr().err)
    assert any(
        e["event"] == "watchdog_kv.internal_error" and e["action"] == "disabled" for e in events
    )


def test_forked_child_registers_with_its_own_pid(env, tmp_path):
    parent = plugin.register()
    read, write = os.pipe()
    pid = os.fork()
    if pid == 0:  # child
        try:
            child = plugin.register()
            os.write(write, json.dumps([child.pid, child is parent]).encode())
        finally:
            os._exit(0)
    os.close(write)
    child_pid, same = json.loads(os.read(read, 1000))
    os.waitpid(pid, 0)
    assert child_pid == pid and not same
    names = sorted(p.name for p in (tmp_path / "state" / "procs").glob("*.json"))
    assert names == sorted([f"{os.getpid()}.json", f"{pid}.json"])


@pytest.mark.needs_vllm  # torch / vLLM
def test_import_arms_registration_until_vllm_is_imported(tmp_path):
    """`import watchdog_kv` registers explicitly, but only in a process that uses vLLM."""
    code = (
        "import sys, watchdog_kv\n"
        "assert watchdog_kv.current() is None, 'registered without vllm'\n"
        "import vllm\n"
        "reg = watchdog_kv.current()\n"
        "print(reg.identity.role, reg.enabled, reg.record_path is not None)\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("WATCHDOG_KV_")}
    env["WATCHDOG_KV_STATE_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert out.stdout.split() == ["frontend", "True", "True"]


def test_a_kv_status_change_held_back_by_the_throttle_is_published_later(monkeypatch):
    """The worker writes its KV status at most once a second from the engine step; the
    last change must still reach the status record (the plugin's thread flushes it)."""
    from watchdog_kv.instrument.connector import Attached, ConnectorInstrumentor

    published: list[dict] = []

    class Watch:
        loading = 0

        def status(self) -> dict:
            return {"loading": self.loading}

    watch = Watch()
    inst = ConnectorInstrumentor(0, published.append)
    got = Attached(object(), "worker", watch)
    inst.attached.append(got)
    changed = inst._throttled(got)
    watch.loading = 1
    changed()
    watch.loading = 0  # within the second: held back
    changed()
    assert [p["loading"] for p in published] == [1]
    inst.flush()
    assert [p["loading"] for p in published] == [1, 0]
    inst.flush()  # nothing new
    assert len(published) == 2


def test_registration_asks_for_amx_first_and_keeps_a_crash_record(tmp_path):
    """In a fresh process (pytest's own faulthandler would otherwise be kept): the record
    names the crash record and the AMX state; unregistering removes an empty record."""
    code = (
        "import json, os\n"
        "from watchdog_kv import plugin\n"
        "from watchdog_kv.host import amx\n"
        "reg = plugin.register()\n"
        "rec = json.loads(open(reg.record_path).read())\n"
        "path = rec['crash_record']\n"
        "print(json.dumps({'hooks': rec['hooks'], 'amx': rec['amx'], 'crash': path,\n"
        "  'exists': os.path.exists(path), 'flags': list(amx.amx_flags())}))\n"
        "plugin.unregister()\n"
        "print(os.path.exists(path))\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith(("WATCHDOG_KV_", "PYTHONFAULT"))}
    env["WATCHDOG_KV_STATE_DIR"] = str(tmp_path)
    out = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr[-2000:]
    first, after = out.stdout.strip().splitlines()
    got = json.loads(first)
    assert got["crash"].startswith(str(tmp_path / "crashes")) and got["exists"]
    assert "crash.faulthandler" in got["hooks"]
    assert got["amx"]["cpu_flags"] == got["flags"]
    if "amx_tile" in got["flags"]:  # an AMX host: asked for, granted, named
        assert got["hooks"][0] == "host.amx_permission" and got["amx"]["permitted"]
    else:  # nothing asked, no hook
        assert "host.amx_permission" not in got["hooks"] and got["amx"]["action"] == "none"
    assert after == "False"  # the empty crash record went with the registration


def test_a_step_watch_whose_instrumentor_is_off_turns_off(tmp_path):
    """A worker whose vLLM lacks a method the worker instrumentor needs: no hook is
    claimed and the step watch shows idle, never a start-up that does not end."""
    from types import SimpleNamespace

    from watchdog_kv import plugin
    from watchdog_kv.beacon import Phase, read_beacon
    from watchdog_kv.step.watch import StepWatch

    settings = config.load({"WATCHDOG_KV_STATE_DIR": str(tmp_path)})
    step = StepWatch(settings, "worker", pid=31340)
    assert read_beacon(step.beacon.path)[0].phase is Phase.STARTUP
    off = SimpleNamespace(name="step.worker", active=False)
    reg = SimpleNamespace(step=step, instrumentors=[off])
    plugin._step_watch_needs_its_instrumentor(reg)
    assert not step.enabled
    assert read_beacon(step.beacon.path)[0].phase is Phase.IDLE
