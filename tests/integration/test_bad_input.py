"""Bad input to `watchdog-kv serve`: a clear error, bounded time, nothing left running."""

from __future__ import annotations

import socket
import subprocess
import time

import pytest

from .conftest import base_env, cli, events, left_in_groups, requires_vllm


def run_cli(
    *args: str, timeout: float = 240, **env: str
) -> tuple[subprocess.CompletedProcess, float]:
    t0 = time.monotonic()
    proc = subprocess.run(
        cli(*args), env=base_env(**env), capture_output=True, text=True, timeout=timeout
    )
    return proc, time.monotonic() - t0


def spawned_pids(stderr: str) -> list[int]:
    return [e["pid"] for e in events(stderr) if e.get("event") == "server.spawned"]


def test_missing_model_path(tmp_path):
    proc, _took = run_cli("serve", "--model", str(tmp_path / "nope"), timeout=60)
    assert proc.returncode == 2
    assert f"model path {tmp_path / 'nope'} does not exist" in proc.stderr
    assert spawned_pids(proc.stderr) == []


def test_model_path_that_is_not_a_model(tmp_path):
    proc, _ = run_cli("serve", "--model", str(tmp_path), timeout=60)
    assert proc.returncode == 2
    assert "has no config.json" in proc.stderr


def test_router_port_in_use():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc, _ = run_cli("serve", "--port", str(port), timeout=120)
    assert proc.returncode == 1
    assert f"port {port} on 127.0.0.1 (router) is already in use" in proc.stderr
    assert spawned_pids(proc.stderr) == []


def test_bad_configuration_stops_before_anything_starts():
    proc, _ = run_cli("serve", WATCHDOG_KV_PREFILL_TIMEOUT="soon", timeout=60)
    assert proc.returncode == 2
    assert "WATCHDOG_KV_PREFILL_TIMEOUT='soon' is not valid" in proc.stderr
    assert spawned_pids(proc.stderr) == []


@pytest.mark.vllm
@requires_vllm
def test_vllm_server_that_exits_is_named_with_its_last_log_lines():
    proc, _took = run_cli("serve", "--port", "0", "--vllm-arg=--no-such-vllm-flag")
    assert proc.returncode == 1
    failed = [e for e in events(proc.stderr) if e.get("event") == "service.startup_failed"]
    assert len(failed) == 1
    message = failed[0]["error"]
    assert "vLLM server" in message and "exited with code" in message
    assert "no-such-vllm-flag" in message  # vLLM's own complaint, quoted from its log
    pids = spawned_pids(proc.stderr)
    assert len(pids) == 2
    assert left_in_groups(pids) == []


@pytest.mark.vllm
@requires_vllm
def test_vllm_server_never_healthy_is_a_bounded_error():
    proc, took = run_cli("serve", "--port", "0", "--startup-timeout", "4")
    assert proc.returncode == 1
    failed = [e for e in events(proc.stderr) if e.get("event") == "service.startup_failed"]
    assert len(failed) == 1
    assert "was not healthy within 4 s; last log lines" in failed[0]["error"]
    assert took < 4 + 60  # the bound plus the time to stop what was started
    pids = spawned_pids(proc.stderr)
    assert len(pids) == 2
    assert left_in_groups(pids) == []
