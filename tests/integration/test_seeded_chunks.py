"""A seeded request whose prompt is computed in chunks, on stock vLLM servers on CPU.

vLLM computes a long prompt in chunks when it exceeds the step's token budget
(``--max-num-batched-tokens``, or other prompts in the same step); the sample of
every chunk but the last is thrown away and its draws undone with
``generator.set_offset(...)``, which a CPU generator does not have. Stock vLLM
on CPU therefore kills its engine on such a seeded request (the control). With
the plugin it answers, and its answer is the one a server that computes the
prompt in one step gives (watchdog_kv/instrument/model_runner.py restores the generator instead).
"""

from __future__ import annotations

import pytest

from .conftest import base_env, http_json, requires_vllm, vllm_server

pytestmark = [pytest.mark.vllm, requires_vllm]

BUDGET = "64"  # tokens per step: the prompt below needs several steps
PROMPT = " ".join(f"Chunk {i} of a long prompt about a watchdog and its lease." for i in range(12))
SEEDED = {
    "model": "watchdog-kv-tiny",
    "prompt": PROMPT,
    "max_tokens": 24,
    "temperature": 0.9,
    "seed": 4242,
    "ignore_eos": True,
}


def ask(url: str) -> tuple[int, dict]:
    return http_json(f"{url}/v1/completions", SEEDED, timeout=120)


def test_stock_vllm_on_cpu_dies_of_a_seeded_chunked_prompt(tmp_path):
    env = base_env(WATCHDOG_KV_ENABLED="0", VLLM_CPU_KVCACHE_SPACE="1")
    log = tmp_path / "stock.log"
    with vllm_server(log, env, "--max-num-batched-tokens", BUDGET) as (url, _):
        prompt_tokens = http_json(f"{url}/tokenize", {"model": SEEDED["model"], "prompt": PROMPT})
        assert prompt_tokens[1]["count"] > 2 * int(BUDGET), "the prompt must need chunks"
        code, body = ask(url)
        assert code >= 500, f"stock vLLM answered ({code}: {body}); the control did not reproduce"
    assert "CPU Generator does not use offset" in log.read_text(errors="replace")


def test_with_the_plugin_it_is_answered_as_if_computed_in_one_step(tmp_path):
    env = base_env(VLLM_CPU_KVCACHE_SPACE="1")
    with vllm_server(tmp_path / "whole.log", env) as (url, _):
        code, whole = ask(url)
        assert code == 200, whole
    with vllm_server(tmp_path / "chunked.log", env, "--max-num-batched-tokens", BUDGET) as (
        url,
        _,
    ):
        code, chunked = ask(url)
        assert code == 200, chunked
    assert chunked["choices"][0]["text"] == whole["choices"][0]["text"]
    assert chunked["usage"]["completion_tokens"] == 24
