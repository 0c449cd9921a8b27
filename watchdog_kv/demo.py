"""``watchdog-kv demo``: the supervised prefill/decode service, proved on real requests.

For each request of :data:`DEMO_REQUESTS` (completions and chat, streamed and
not), the demo:

1. sends it through the router (prefill server, then decode server pulling the
   KV over NIXL) and collects the text, joining streamed deltas;
2. reads the decode server's own Prometheus counters of NIXL transfers
   (``vllm:nixl_xfer_time_seconds_count``, ``vllm:nixl_bytes_transferred_sum``)
   before and after, so "the KV came over NIXL" is vLLM's word, not ours;
3. sends the same request straight to the decode server, greedy, with a fresh
   ``cache_salt`` so no cached KV can be reused, which makes the decode compute
   everything itself: the local reference;
4. prints a table: disaggregated == local, NIXL transfers and bytes, latency.

It exits 0 only if every row matches and every request pulled KV over NIXL.
A request that fails does not end in a traceback: the demo prints the error and
what the supervisor found (a server's crash, with its signal and culprit frame,
or a stall), and where the incidents are for ``watchdog-kv report``.
"""

from __future__ import annotations

import asyncio
import json
import time
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import aiohttp
from prometheus_client.parser import text_string_to_metric_families
from rich.console import Console
from rich.table import Table

from watchdog_kv.router import RouterServer
from watchdog_kv.supervisor import Supervisor

__all__ = [
    "DEMO_REQUESTS",
    "DemoRequest",
    "DemoRow",
    "collect_text",
    "compare_with_local",
    "nixl_counters",
    "run_demo",
]

_LONG = (
    "The watchdog watches the prefill and the decode servers. A decode worker waits "
    "for KV blocks from a prefill worker on another node. The lease expires, the blocks "
    "are released, and the request must not hang. Every request gets an answer or a "
    "clear error within its deadline. "
) * 4


@dataclass(frozen=True)
class DemoRequest:
    endpoint: str  # "/v1/completions" | "/v1/chat/completions"
    stream: bool
    prompt: str
    max_tokens: int = 24

    def body(self, model: str) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": model,
            "max_tokens": self.max_tokens,
            "temperature": 0.0,
            "stream": self.stream,
        }
        if self.endpoint.endswith("chat/completions"):
            body["messages"] = [{"role": "user", "content": self.prompt}]
        else:
            body["prompt"] = self.prompt
        return body


DEMO_REQUESTS: tuple[DemoRequest, ...] = (
    DemoRequest("/v1/completions", False, "Hello, world! The quick brown fox jumps over"),
    DemoRequest("/v1/completions", True, "Once upon a time there was a tiny model that"),
    DemoRequest("/v1/chat/completions", False, "Why must a decode never wait forever?"),
    DemoRequest("/v1/chat/completions", True, "Tell me about leases and heartbeats."),
    DemoRequest("/v1/completions", True, _LONG, max_tokens=32),
)


async def collect_text(resp: aiohttp.ClientResponse, stream: bool) -> str:
    """The generated text of an OpenAI response, joining streamed deltas."""
    if resp.status != 200:
        raise RuntimeError(f"HTTP {resp.status}: {await resp.text()}")
    if not stream:
        data = await resp.json()
        choice = data["choices"][0]
        return str(choice["message"]["content"] if "message" in choice else choice["text"])
    parts: list[str] = []
    async for raw in resp.content:
        line = raw.decode().strip()
        if not line.startswith("data:"):
            continue
        payload = line[len("data:") :].strip()
        if payload == "[DONE]":
            break
        event = json.loads(payload)
        if "error" in event:
            raise RuntimeError(f"stream ended with error: {event['error']}")
        for choice in event.get("choices", []):
            delta = choice.get("delta")
            parts.append(
                (delta.get("content") or "") if delta is not None else (choice.get("text") or "")
            )
    return "".join(parts)


async def nixl_counters(http: aiohttp.ClientSession, server_url: str) -> tuple[float, float]:
    """(NIXL transfers completed, bytes transferred) from a vLLM server's /metrics."""
    async with http.get(f"{server_url}/metrics", timeout=aiohttp.ClientTimeout(total=10)) as r:
        text = await r.text()
    count = nbytes = 0.0
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            if sample.name == "vllm:nixl_xfer_time_seconds_count":
                count += sample.value
            elif sample.name == "vllm:nixl_bytes_transferred_sum":
                nbytes += sample.value
    return count, nbytes


@dataclass
class DemoRow:
    request: DemoRequest
    disagg: str
    local: str
    transfers: float
    nbytes: float
    seconds: float

    @property
    def ok(self) -> bool:
        return self.disagg == self.local and self.transfers >= 1 and self.nbytes > 0


async def compare_with_local(
    http: aiohttp.ClientSession,
    router_url: str,
    decode_url: str,
    model: str,
    req: DemoRequest,
    timeout_s: float,
) -> DemoRow:
    """Send ``req`` through the router and straight to the decode server; compare."""
    before = await nixl_counters(http, decode_url)
    t0 = time.monotonic()
    async with http.post(
        f"{router_url}{req.endpoint}",
        json=req.body(model),
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        disagg = await collect_text(resp, req.stream)
    seconds = time.monotonic() - t0
    # vLLM publishes connector stats with its step stats: give them a moment to land.
    after = before
    for _ in range(40):
        after = await nixl_counters(http, decode_url)
        if after[0] > before[0]:
            break
        await asyncio.sleep(0.25)
    local_body = {**req.body(model), "stream": False, "cache_salt": uuid.uuid4().hex}
    async with http.post(
        f"{decode_url}{req.endpoint}",
        json=local_body,
        timeout=aiohttp.ClientTimeout(total=timeout_s),
    ) as resp:
        local = await collect_text(resp, False)
    return DemoRow(req, disagg, local, after[0] - before[0], after[1] - before[1], seconds)


def render(rows: list[DemoRow]) -> Table:
    table = Table(title="disaggregated answers vs the decode server's own (greedy)")
    for col in ("#", "API", "stream", "same answer", "NIXL pulls", "KV bytes", "seconds", "text"):
        table.add_column(col, no_wrap=True)
    for i, row in enumerate(rows, 1):
        same = "[green]yes[/]" if row.disagg == row.local else "[red]NO[/]"
        pulls = f"{row.transfers:g}" if row.transfers >= 1 else "[red]0[/]"
        api = "chat" if "chat" in row.request.endpoint else "completions"
        table.add_row(
            str(i),
            api,
            "yes" if row.request.stream else "no",
            same,
            pulls,
            f"{row.nbytes:,.0f}",
            f"{row.seconds:.1f}",
            repr(row.disagg[:12]),
        )
    return table


async def run_demo(
    supervisor: Supervisor,
    router: RouterServer,
    *,
    timeout_s: float = 300.0,
    console: Console | None = None,
) -> int:
    console = console or Console(width=100)
    decode_url = supervisor.available("decode")[0].url
    model = supervisor.options.served_model_name
    rows: list[DemoRow] = []
    async with aiohttp.ClientSession() as http:
        for i, req in enumerate(DEMO_REQUESTS, 1):
            console.print(
                f"[dim]request {i}/{len(DEMO_REQUESTS)}: {req.endpoint} stream={req.stream}[/]"
            )
            try:
                row = await compare_with_local(http, router.url, decode_url, model, req, timeout_s)
            except (RuntimeError, aiohttp.ClientError, TimeoutError, ValueError) as exc:
                console.print(f"[red]request {i} failed: {exc or type(exc).__name__}[/]")
                _explain(supervisor, console)
                return 1
            rows.append(row)
    console.print(render(rows))
    _explain(supervisor, console)
    ok = all(r.ok for r in rows)
    console.print(
        "[green]every disaggregated answer equals the local one, and every "
        "request pulled its KV over NIXL[/]"
        if ok
        else "[red]some rows failed: see the table[/]"
    )
    return 0 if ok else 1


def diagnoses(supervisor: Supervisor) -> list[str]:
    """What went wrong with the servers during the run: each crash (signal and culprit
    frame, with the known cause when there is one) and each stall."""
    out: list[str] = []
    for srv in supervisor.servers.values():
        for crash in srv.crashes:
            line = crash["message"]
            hint = _hint(crash.get("incident"))
            out.append(f"{line}\n    {hint}" if hint else line)
        if srv.failure is not None:
            out.append(f"{srv.spec.name} failed: {srv.failure['reason']}")
    out.extend(stall.describe() for stall in supervisor.stalls())
    return out


def _hint(incident: str | None) -> str | None:
    if not incident:
        return None
    try:
        data = json.loads((Path(incident) / "incident.json").read_text())
    except (OSError, ValueError):
        return None
    hint = data.get("hint")
    return str(hint) if hint else None


def _explain(supervisor: Supervisor, console: Console) -> None:
    found = diagnoses(supervisor)
    if not found:
        return
    console.print("[yellow]what the supervisor saw during the run:[/]")
    for line in found:
        console.print(f"  {line}", markup=False)
    dumps = supervisor.settings.dump_dir or supervisor.run_dir / "dumps"
    console.print(f"details: watchdog-kv report {dumps}", markup=False)
