"""WATCHDOG_KV_ENABLED=0 on a real vLLM server: the plugin loads, and installs nothing.

It also answers exactly like the supervised service with the plugin on. On a
host whose CPU has AMX tiles, stock vLLM with the plugin off dies of SIGILL in
bf16 (docs/host-problems.md, AMX): there the plain server runs in float32 (the
documented workaround), and the on/off comparison, which needs the same dtype on
both sides, is not made -- the test says so with a warning.
"""

from __future__ import annotations

import sys
import warnings

import pytest

from watchdog_kv import model
from watchdog_kv.host import amx
from watchdog_kv.supervisor.process import ManagedProcess

from .conftest import (
    base_env,
    events,
    free_port,
    http_json,
    left_in_groups,
    requires_vllm,
    wait_healthy,
)

pytestmark = [pytest.mark.vllm, requires_vllm]


PROMPTS = [
    "Hello",
    "The prefill computes the prompt and the decode continues from its KV cache.",
    "Numbers: 1 2 3 4 5 6 7 8 9 10 11 12 13 14 15 16 17 18 19 20 21 22 23 24 25 26 27 28 "
    "29 30 31 32 33 34 35 36 37 38 39 40",
]


def _texts(base: str, model: str) -> list[str]:
    out = []
    for prompt in PROMPTS:
        code, body = http_json(
            f"{base}/v1/completions",
            {"model": model, "prompt": prompt, "max_tokens": 12, "temperature": 0},
            timeout=180,
        )
        assert code == 200, body
        out.append(body["choices"][0]["text"])
    return out


def test_disabled_plugin_installs_nothing_in_any_process(tmp_path, service):
    from watchdog_kv import config

    cache = config.load(base_env()).cache_dir
    path = model.build(cache)
    port = free_port()
    state = tmp_path / "state"
    log = tmp_path / "server.log"
    env = base_env(
        WATCHDOG_KV_ENABLED="0", WATCHDOG_KV_STATE_DIR=str(state), VLLM_CPU_KVCACHE_SPACE="1"
    )
    server = ManagedProcess(
        "plain",
        [
            sys.executable,
            "-m",
            "vllm.entrypoints.openai.api_server",
            "--model",
            str(path),
            "--served-model-name",
            "tiny",
            "--host",
            "127.0.0.1",
            "--port",
            str(port),
            "--enforce-eager",
            "--max-model-len",
            "512",
            *(["--dtype", "float32"] if amx.amx_flags() else []),
        ],
        env,
        log,
    )
    server.start()
    try:
        wait_healthy(f"http://127.0.0.1:{port}/health", lambda: server.poll() is not None, 300, log)
        code, body = http_json(
            f"http://127.0.0.1:{port}/v1/completions",
            {"model": "tiny", "prompt": "Hello", "max_tokens": 4, "temperature": 0},
            timeout=120,
        )
        assert code == 200 and body["choices"][0]["text"]
        # e. Same prompts, plugin off (this plain server) and on (the supervised
        # prefill/decode service, every hook installed): identical outputs.
        off = _texts(f"http://127.0.0.1:{port}", "tiny")
        assert all(off)
        if amx.amx_flags():
            warnings.warn(
                pytest.PytestWarning(
                    "AMX host: the plugin-off server ran in float32 (stock vLLM dies of "
                    "SIGILL in bf16 here), so its answers were not compared with the "
                    "plugin-on service's"
                ),
                stacklevel=1,
            )
        else:
            assert _texts(service.url, "watchdog-kv-tiny") == off
    finally:
        server.stop(grace=30)
    assert left_in_groups([server.pid]) == []
    said = [e for e in events(log.read_text()) if e.get("logger", "").startswith("watchdog_kv")]
    # The plugin was loaded in all three processes, and each chose to do nothing...
    assert sorted(e["role"] for e in said if e["event"] == "watchdog_kv.disabled") == [
        "api_server",
        "engine_core",
        "worker",
    ]
    # ...so nothing was registered, no status record written, no hook installed.
    assert [e for e in said if e["event"] != "watchdog_kv.disabled"] == []
    assert not state.exists()
