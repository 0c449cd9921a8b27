"""Closed-loop load: a fixed number of clients, each sending its next request when answered."""

from __future__ import annotations

import asyncio
import random
import time
from dataclasses import dataclass, field
from typing import Any

import aiohttp

from integration.stack import MODEL

__all__ = ["LoadResult", "prompts", "run_load"]

_WORDS = [
    *("prefill", "decode", "cache", "block", "lease", "engine", "worker", "router"),
    *("request", "token", "stream", "deadline", "transfer", "network", "kernel"),
    *("memory", "socket", "thread", "process", "signal", "restart", "model", "layer"),
    *("batch", "queue", "answer", "clock", "timer", "health", "status", "watchdog"),
]


def prompts(rng: random.Random, n: int, words: int = 24) -> list[str]:
    """``n`` distinct prompts drawn from ``rng`` (the same seed, the same prompts)."""
    return [f"Request {i}: " + " ".join(rng.choice(_WORDS) for _ in range(words)) for i in range(n)]


@dataclass
class LoadResult:
    latencies: list[float] = field(default_factory=list)
    tokens: int = 0
    errors: list[str] = field(default_factory=list)
    wall_s: float = 0.0
    answers: dict[str, str] = field(default_factory=dict)  # prompt -> text

    @property
    def tokens_per_s(self) -> float:
        return self.tokens / self.wall_s if self.wall_s else 0.0

    def as_dict(self) -> dict[str, Any]:
        return {
            "requests": len(self.latencies),
            "tokens": self.tokens,
            "errors": self.errors,
            "wall_s": self.wall_s,
            "tokens_per_s": self.tokens_per_s,
            "latencies_s": self.latencies,
        }


async def _client(
    http: aiohttp.ClientSession,
    url: str,
    queue: list[str],
    stop_at: float,
    max_tokens: int,
    out: LoadResult,
) -> None:
    while queue and time.monotonic() < stop_at:
        prompt = queue.pop()
        body = {
            "model": MODEL,
            "prompt": prompt,
            "max_tokens": max_tokens,
            "temperature": 0,
            "ignore_eos": True,
        }
        t0 = time.monotonic()
        try:
            async with http.post(f"{url}/v1/completions", json=body) as resp:
                answer = await resp.json()
                if resp.status != 200:
                    out.errors.append(f"{resp.status}: {answer}")
                    continue
        except (aiohttp.ClientError, TimeoutError) as exc:
            out.errors.append(f"{type(exc).__name__}: {exc}")
            continue
        out.latencies.append(time.monotonic() - t0)
        out.tokens += answer["usage"]["completion_tokens"]
        out.answers[prompt] = answer["choices"][0]["text"]


async def _run(
    url: str, work: list[str], concurrency: int, duration_s: float, max_tokens: int
) -> LoadResult:
    out = LoadResult()
    queue = list(reversed(work))  # pop() takes them in order
    timeout = aiohttp.ClientTimeout(total=300)
    async with aiohttp.ClientSession(timeout=timeout) as http:
        t0 = time.monotonic()
        await asyncio.gather(
            *(
                _client(http, url, queue, t0 + duration_s, max_tokens, out)
                for _ in range(concurrency)
            )
        )
        out.wall_s = time.monotonic() - t0
    return out


def run_load(
    url: str, work: list[str], *, concurrency: int, duration_s: float, max_tokens: int
) -> LoadResult:
    """Send ``work`` (in order) from ``concurrency`` clients until ``duration_s`` has passed
    (requests in flight then finish) or the work runs out."""
    return asyncio.run(_run(url, work, concurrency, duration_s, max_tokens))
