"""Two stock vLLM servers started by hand on one host keep their OpenMP threads apart.

Both are plain ``python -m vllm.entrypoints.openai.api_server`` processes with
the plugin loaded and ``VLLM_CPU_OMP_THREADS_BIND`` left on ``auto``, where
vLLM gives every server the same cores. The first keeps vLLM's choice; the
second's engine core sees the first's claim and moves its worker to the cores
nobody holds -- checked in the worker's own CPU affinity, as the kernel has it.
The claims directory is made private to the test (``XDG_RUNTIME_DIR``), so
servers of other tests running meanwhile do not count.
"""

from __future__ import annotations

import contextlib
import os
from pathlib import Path

import pytest

from watchdog_kv import process

from .conftest import base_env, http_json, requires_vllm, vllm_server, wait_until

pytestmark = [pytest.mark.vllm, requires_vllm]
MODEL = "watchdog-kv-tiny"


def affinity(pid: int) -> set[int]:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("Cpus_allowed_list:"):
            out: set[int] = set()
            for part in line.split(":", 1)[1].strip().split(","):
                lo, _, hi = part.partition("-")
                out.update(range(int(lo), int(hi or lo) + 1))
            return out
    raise AssertionError(f"no affinity for {pid}")


def test_a_second_server_left_on_auto_moves_off_the_first_ones_cores(tmp_path):
    if len(os.sched_getaffinity(0)) < 2:
        pytest.skip("one core: there is no other core to move to")
    state = tmp_path / "state"
    env = base_env(
        XDG_RUNTIME_DIR=str(tmp_path / "runtime"),  # the host-wide claims, for this test only
        WATCHDOG_KV_STATE_DIR=str(state),
        VLLM_CPU_KVCACHE_SPACE="1",
    )
    env.pop("VLLM_CPU_OMP_THREADS_BIND", None)

    def record(server: str, role: str) -> dict:
        found = [
            r
            for r in process.read_records(state)
            if r["server"] == server and r["role"] == role and r["alive"]
        ]
        assert len(found) == 1, found
        return found[0]

    with contextlib.ExitStack() as servers:
        urls = [  # one after the other: the second sees the first's claim
            servers.enter_context(
                vllm_server(tmp_path / f"{name}.log", {**env, "WATCHDOG_KV_SERVER": name})
            )[0]
            for name in ("hand-0", "hand-1")
        ]
        one, two = record("hand-0", "engine_core")["cpus"], record("hand-1", "engine_core")["cpus"]
        assert one["source"] == "vllm_auto" and one["overlaps"] == {}, one
        assert two["source"] == "watchdog_kv" and two["overlaps"] == {}, two
        cores_one = {c for rank in one["cores"] for c in rank}
        cores_two = {c for rank in two["cores"] for c in rank}
        assert cores_one and cores_two and not cores_one & cores_two
        # the kernel agrees: each worker's main thread runs on its own server's cores
        wait_until(
            lambda: affinity(record("hand-1", "worker")["pid"]) <= cores_two,
            10,
            "the second worker on its cores",
        )
        assert affinity(record("hand-0", "worker")["pid"]) <= cores_one
        assert "cpus.rebound" in (tmp_path / "hand-1.log").read_text()
        for url in urls:  # and both serve
            code, body = http_json(
                f"{url}/v1/completions", {"model": MODEL, "prompt": "Hi", "max_tokens": 4}
            )
            assert code == 200, body
