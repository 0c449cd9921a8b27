"""``nox -s soak``: many requests through the router while faults of every kind land at random.

One supervised service (one prefill, two decodes) runs with the rehearsal faults
configured (``WATCHDOG_KV_FAULT``: slow, dropped and corrupted KV transfers on
every hand-off at the given rates, and the armable step and heartbeat stalls).
Clients send ``--requests`` requests (streamed and not) through the router, of
the kinds users send (:data:`KINDS`: greedy completions, chat without
``max_tokens``, stop strings, seeded sampling, long non-streamed answers),
while a seeded schedule injects, one at a time, every fault kind once per round:

* from inside: a worker step holding the GIL (``stall_step``), the NIXL
  heartbeat send holding it (``stall_notif``), on a random server;
* from outside: SIGSTOP of a server's engine processes for a few seconds, then
  SIGCONT; SIGKILL of a whole server (the supervisor restarts it).

Then it checks, and exits 1 if any check fails:

* **no request hangs**: every request ends within the request budget (plus the
  client's slack);
* **every answer is right or a clear error**: each 200 answer equals the decode
  computing the same request itself (prefix cache bypassed), reported per
  request kind; every other answer is an HTTP error or a stream error event
  with a message;
* **no KV blocks leak**: once the load is over and the leases have run out, every
  server's KV cache usage (vLLM's own ``vllm:kv_cache_usage_perc``) is back to 0,
  and the watch has no load or lease left open;
* **no watchdog error reaches vLLM**: no ``watchdog_kv.internal_error`` in any
  server log, and no traceback frame in watchdog_kv's code.

The same seed gives the same prompts and the same fault schedule (what the
machine does with them still varies: timings are real).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import random
import signal
import sys
import threading
import time
import uuid
from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import aiohttp
import psutil
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from integration.load import prompts
from integration.stack import MODEL, Service, complete, metric_samples
from watchdog_kv import faults

__all__ = ["main"]

BUDGET_S = 90  # WATCHDOG_KV_REQUEST_BUDGET of the soaked service
CLIENT_SLACK_S = 30  # beyond the budget, a request counts as hung
LEASE_S = 10  # the NIXL lease of the soaked service: blocks of unread hand-offs come back
SERVERS = ("prefill-0", "decode-0", "decode-1")
FAULT_ENV = "delay:0.3,drop:0.05,corrupt:0.05,stall_step:15,stall_notif:15"


# The request kinds of the mix: endpoint, the request's own fields, weight in the mix.
KINDS: dict[str, tuple[str, dict[str, Any], int]] = {
    "greedy": ("/v1/completions", {"max_tokens": 24, "temperature": 0}, 6),
    # chat without max_tokens: its budget is what the context leaves
    "chat-no-max-tokens": ("/v1/chat/completions", {"temperature": 0}, 1),
    "stop-strings": (
        "/v1/completions",
        {"max_tokens": 64, "temperature": 0, "stop": ["e ", "ing"]},
        2,
    ),
    "seeded": (
        "/v1/completions",
        {"max_tokens": 48, "temperature": 0.8, "top_k": 40, "seed": 7},
        2,
    ),
    # long and never streamed to the client: the router streams it from the decode
    "long-whole": ("/v1/completions", {"max_tokens": 160, "temperature": 0, "ignore_eos": True}, 1),
}


def request_body(kind: str, prompt: str) -> tuple[str, dict[str, Any]]:
    path, fields, _ = KINDS[kind]
    if path.endswith("/chat/completions"):
        return path, {"model": MODEL, "messages": [{"role": "user", "content": prompt}], **fields}
    return path, {"model": MODEL, "prompt": prompt, **fields}


def answer_text(body: dict[str, Any]) -> str | None:
    choices = body.get("choices") or []
    if not choices:
        return None
    if "message" in choices[0]:
        return (choices[0]["message"] or {}).get("content")
    return choices[0].get("text")


@dataclass
class Outcome:
    prompt: str
    stream: bool
    status: int  # 0: the client gave up (a hang)
    text: str | None = None
    error: str | None = None
    seconds: float = 0.0
    recovery: str | None = None
    kind: str = "greedy"


@dataclass
class Soak:
    outcomes: list[Outcome] = field(default_factory=list)
    injected: Counter[str] = field(default_factory=Counter)
    schedule: list[dict[str, Any]] = field(default_factory=list)
    checks: dict[str, Any] = field(default_factory=dict)
    failures: list[str] = field(default_factory=list)


# --- clients ---------------------------------------------------------------------------------


async def _one(
    http: aiohttp.ClientSession, url: str, prompt: str, stream: bool, kind: str
) -> Outcome:
    path, body = request_body(kind, prompt)
    if stream:
        body["stream"] = True
    t0 = time.monotonic()
    out = Outcome(prompt, stream, 0, kind=kind)
    try:
        async with http.post(f"{url}{path}", json=body) as resp:
            out.status = resp.status
            out.recovery = resp.headers.get("X-Watchdog-Recovery")
            if resp.status != 200:
                raw = await resp.text()
                out.error = _message(raw) or f"HTTP {resp.status} with no message: {raw[:200]}"
            elif not stream:
                out.text = answer_text(await resp.json())
            else:
                parts, done = [], False
                async for line in resp.content:
                    data = line.strip()
                    if not data.startswith(b"data:"):
                        continue
                    data = data[5:].strip()
                    if data == b"[DONE]":
                        done = True
                        break
                    event = json.loads(data)
                    if "error" in event:
                        out.error = _message(json.dumps(event)) or "stream error event"
                        break
                    for c in event.get("choices") or []:
                        delta = c.get("delta")
                        parts.append(
                            (delta or {}).get("content") or "" if delta else c.get("text") or ""
                        )
                if out.error is None:
                    out.text = "".join(parts)
                    if not done:
                        out.error = "stream ended without [DONE] or an error event"
                        out.text = None
    except TimeoutError:
        out.status, out.error = 0, f"no answer within {BUDGET_S + CLIENT_SLACK_S} s"
    except aiohttp.ClientError as exc:
        out.status, out.error = -1, f"connection: {type(exc).__name__}: {exc}"
    out.seconds = time.monotonic() - t0
    return out


def _message(raw: str) -> str | None:
    try:
        err = json.loads(raw).get("error")
    except (ValueError, AttributeError):
        return None
    if isinstance(err, dict):
        return err.get("message") or None
    return str(err) if err else None


async def _clients(
    url: str, work: list[tuple[str, bool, str]], concurrency: int, soak: Soak, tick
) -> None:
    queue = list(reversed(work))
    timeout = aiohttp.ClientTimeout(total=BUDGET_S + CLIENT_SLACK_S)
    async with aiohttp.ClientSession(timeout=timeout) as http:

        async def client() -> None:
            while queue:
                prompt, stream, kind = queue.pop()
                soak.outcomes.append(await _one(http, url, prompt, stream, kind))
                tick()

        await asyncio.gather(*(client() for _ in range(concurrency)))


# --- faults ----------------------------------------------------------------------------------


class Injector(threading.Thread):
    """Injects the seeded schedule of faults, one at a time, until stopped."""

    def __init__(self, svc: Service, rng: random.Random, every_s: float, soak: Soak) -> None:
        super().__init__(daemon=True, name="soak-faults")
        self.svc, self.rng, self.every_s, self.soak = svc, rng, every_s, soak
        self.done = threading.Event()

    def run(self) -> None:
        kinds: list[str] = []
        while not self.done.wait(self.rng.uniform(0.5, 1.5) * self.every_s):
            if not kinds:  # every kind once per round, in a seeded order
                kinds = ["stall_step", "stall_notif", "sigstop", "sigkill"]
                self.rng.shuffle(kinds)
            kind = kinds.pop()
            # the heartbeat is sent by the side that reads KV: a decode
            server = self.rng.choice(SERVERS[1:] if kind == "stall_notif" else SERVERS)
            pause = round(self.rng.uniform(3.0, 15.0), 1)  # detected past the 10 s floor
            try:
                self.inject(kind, server, pause)
            except (OSError, KeyError, ValueError, psutil.Error) as exc:
                self.soak.schedule.append({"kind": kind, "server": server, "skipped": str(exc)})

    def disarm_all(self) -> None:
        """Stalls armed but never reached (no step came) must not fire after the soak."""
        for server in SERVERS:
            for kind in ("stall_step", "stall_notif"):
                faults.disarm(self.svc.run_dir, server, kind)

    def inject(self, kind: str, server: str, pause: float) -> None:
        entry = {"at": time.time(), "kind": kind, "server": server}
        if kind in ("stall_step", "stall_notif"):
            faults.arm(self.svc.run_dir, server, kind)
        elif kind == "sigstop":
            if self.svc.server(server)["state"] != "ready":
                raise ValueError(f"{server} is not ready")
            entry["seconds"] = pause
            stopped = []
            try:
                for pid in self.svc.pids(server):
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGSTOP)
                        stopped.append(pid)
                self.done.wait(pause)
            finally:
                for pid in stopped:
                    with contextlib.suppress(ProcessLookupError):
                        os.kill(pid, signal.SIGCONT)
        elif kind == "sigkill":
            info = self.svc.server(server)
            if info["state"] != "ready":
                raise ValueError(f"{server} is not ready")
            os.killpg(os.getpgid(info["pid"]), signal.SIGKILL)
        self.soak.injected[kind] += 1
        self.soak.schedule.append(entry)


# --- checks ----------------------------------------------------------------------------------


def kv_usage(url: str) -> float:
    for sample in metric_samples(url):
        if sample.name == "vllm:kv_cache_usage_perc":
            return sample.value
    raise KeyError("vllm:kv_cache_usage_perc not in the server's /metrics")


def open_kv_work(svc: Service) -> dict[str, int]:
    """KV loads and leases the watch still has open, per live worker (its status record;
    a killed server's records stay behind with what it had open when it died)."""
    out = {}
    for r in svc.status()["processes"]:
        if not r.get("alive"):
            continue
        kv = r.get("kv") or {}
        n = len(kv.get("loading") or {}) + int(kv.get("leases_kept") or 0)
        if n:
            out[f"{r['server']}/{r['role']}/{r['pid']}"] = n
    return out


def wait_quiet(svc: Service, timeout_s: float) -> dict[str, float]:
    """Every server ready, progressing and with no KV blocks in use; the last readings."""
    deadline = time.monotonic() + timeout_s
    usage: dict[str, float] = {}
    while True:
        if svc.settled():
            servers = svc.status()["servers"]
            usage = {name: kv_usage(s["url"]) for name, s in servers.items()}
            if not any(usage.values()):
                return usage
        if time.monotonic() > deadline:
            return usage or {name: float("nan") for name in svc.status()["servers"]}
        time.sleep(1)


def watchdog_errors(svc: Service) -> list[str]:
    """Our own errors in the server logs: a contained internal error, or any traceback
    frame in watchdog_kv's code. (A request our guard failed is logged by vLLM with a
    traceback of vLLM's frames only, its message naming watchdog_kv: that is the
    designed fail-fast path, not an error of ours.)"""
    found = []
    logs = [Path(s["log"]) for s in svc.status()["servers"].values()]
    logs += sorted((svc.run_dir / "logs").glob("*.log"))  # restarted servers' earlier logs
    for log in dict.fromkeys(logs):
        text = log.read_text(errors="replace") if log.exists() else ""
        for i, line in enumerate(text.splitlines()):
            internal = "watchdog_kv.internal_error" in line
            frame = 'File "' in line and "/watchdog_kv/" in line
            if internal or frame:
                found.append(f"{log.name}:{i + 1}: {line[:300]}")
    return found


def check(svc: Service, soak: Soak, console: Console) -> None:
    hung = [o for o in soak.outcomes if o.status == 0]
    unclear = [o for o in soak.outcomes if o.status != 200 and not o.error]
    answered = [o for o in soak.outcomes if o.status == 200 and o.text is not None]
    errors = [o for o in soak.outcomes if o.error]
    console.print("[dim]waiting for every server to be ready and progressing...[/]")
    deadline = time.monotonic() + 300
    while not svc.settled():
        if time.monotonic() > deadline:
            soak.failures.append("the service did not come back ready within 300 s")
            return
        time.sleep(1)
    console.print("[dim]computing the local references...[/]")
    wrong = []
    references: dict[tuple[str, str], str] = {}
    exact: dict[str, Counter[str]] = {kind: Counter() for kind in KINDS}
    for o in answered:
        key = (o.kind, o.prompt)
        if key not in references:
            references[key] = reference(svc, o.kind, o.prompt)
        right = o.text == references[key]
        exact[o.kind]["right" if right else "wrong"] += 1
        if not right:
            wrong.append(o)
    for o in errors:
        exact[o.kind]["error"] += 1
    console.print(f"[dim]waiting for the KV leases ({LEASE_S} s) and restarts to settle...[/]")
    usage = wait_quiet(svc, timeout_s=LEASE_S * 3 + 240)
    leaked = {name: u for name, u in usage.items() if u != 0}
    still_open = open_kv_work(svc)
    internal = watchdog_errors(svc)
    soak.checks = {
        "requests": len(soak.outcomes),
        "answered_right": len(answered) - len(wrong),
        "answered_wrong": [
            (o.kind, o.prompt, o.text, references.get((o.kind, o.prompt))) for o in wrong
        ],
        "exact_by_kind": {kind: dict(c) for kind, c in exact.items()},
        "clear_errors": Counter(_kind(o.error) for o in errors),
        "unclear_errors": [(o.status, o.prompt) for o in unclear],
        "hung": [o.prompt for o in hung],
        "kv_cache_usage_after": usage,
        "kv_work_still_open": still_open,
        "watchdog_errors": internal,
        "recoveries": Counter(o.recovery for o in soak.outcomes if o.recovery),
    }
    if hung:
        soak.failures.append(f"{len(hung)} request(s) hung")
    if wrong:
        soak.failures.append(f"{len(wrong)} answer(s) differ from the local reference")
    if unclear:
        soak.failures.append(f"{len(unclear)} error(s) without a message")
    if leaked:
        soak.failures.append(f"KV blocks still in use after the soak: {leaked}")
    if still_open:
        soak.failures.append(f"the watch still has KV work open: {still_open}")
    if internal:
        soak.failures.append(f"{len(internal)} watchdog error(s) in vLLM's logs")


def reference(svc: Service, kind: str, prompt: str) -> str:
    """decode-0 computing the same request itself, its prefix cache bypassed."""
    path, body = request_body(kind, prompt)
    body["cache_salt"] = uuid.uuid4().hex
    code, answer, _ = complete(svc.server("decode-0")["url"], body, timeout=300, path=path)
    if code != 200:
        raise RuntimeError(f"reference request ({kind}) failed: {code} {answer}")
    return answer_text(answer) or ""


def _kind(error: str | None) -> str:
    text = (error or "").lower()
    for key in ("stalled", "budget", "did not answer", "unreachable", "restart", "connection"):
        if key in text:
            return key
    return text[:40]


def table(soak: Soak) -> Table:
    c = soak.checks
    t = Table(title="watchdog_kv soak")
    t.add_column("check")
    t.add_column("result", justify="right")
    t.add_column("detail")
    t.add_row("requests", str(c["requests"]), "")
    t.add_row("answers equal to the local reference", str(c["answered_right"]), "")
    t.add_row("wrong answers", str(len(c["answered_wrong"])), "")
    for kind, counts in c["exact_by_kind"].items():
        t.add_row(
            f"  {kind}",
            f"{counts.get('right', 0)}/{counts.get('right', 0) + counts.get('wrong', 0)} exact",
            f"{counts.get('error', 0)} clear errors",
        )
    t.add_row(
        "clear errors",
        str(sum(c["clear_errors"].values())),
        ", ".join(f"{k}: {n}" for k, n in c["clear_errors"].items()),
    )
    t.add_row("errors without a message", str(len(c["unclear_errors"])), "")
    t.add_row("hung requests", str(len(c["hung"])), f"> {BUDGET_S + CLIENT_SLACK_S} s")
    t.add_row(
        "recovered by the router",
        str(sum(n for k, n in c["recoveries"].items() if k != "none")),
        ", ".join(f"{k}: {n}" for k, n in c["recoveries"].items() if k != "none"),
    )
    t.add_row(
        "faults injected",
        str(sum(soak.injected.values())),
        ", ".join(f"{k}: {n}" for k, n in soak.injected.items()) + f"; always on: {FAULT_ENV}",
    )
    t.add_row(
        "KV cache in use after",
        f"{max(c['kv_cache_usage_after'].values(), default=0):g}",
        ", ".join(f"{k}: {v:g}" for k, v in c["kv_cache_usage_after"].items()),
    )
    t.add_row("KV loads/leases still open", str(sum(c["kv_work_still_open"].values())), "")
    t.add_row("watchdog errors in vLLM logs", str(len(c["watchdog_errors"])), "")
    return t


def run(args: argparse.Namespace, console: Console) -> Soak:
    rng = random.Random(args.seed)
    soak = Soak()
    kinds = rng.choices(list(KINDS), weights=[w for _, _, w in KINDS.values()], k=args.requests)
    work = [
        (p, kind != "long-whole" and rng.random() < 0.5, kind)
        for p, kind in zip(prompts(rng, args.requests), kinds, strict=True)
    ]
    svc = Service(
        "soak",
        args.out / "run",
        env={
            "WATCHDOG_KV_FAULT": FAULT_ENV,
            "WATCHDOG_KV_FAULT_SEED": str(args.seed),
            "WATCHDOG_KV_REQUEST_BUDGET": str(BUDGET_S),
        },
        args=("--decode", "2", "--kv-lease", str(LEASE_S)),
    )
    columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn())
    try:
        with Progress(*columns, TimeElapsedColumn(), console=console) as progress:
            task = progress.add_task("starting the service (1 prefill, 2 decodes)", total=None)
            svc.start()
            svc.wait_ready()
            progress.update(task, description="requests", total=len(work), completed=0)
            injector = Injector(svc, random.Random(rng.random()), args.fault_every, soak)
            injector.start()
            try:
                asyncio.run(
                    _clients(svc.url, work, args.concurrency, soak, lambda: progress.advance(task))
                )
            finally:
                injector.done.set()
                injector.join()
                injector.disarm_all()
        check(svc, soak, console)
    finally:
        svc.stop()
    return soak


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="nox -s soak --", description=__doc__.split("\n\n")[0])
    p.add_argument("--requests", type=int, default=150)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--fault-every", type=float, default=8.0, help="mean seconds between faults")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=Path("bench-results") / "soak")
    args = p.parse_args(sys.argv[1:] if argv is None else argv)
    # SIGTERM unwinds like Ctrl-C, so the service is stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console()
    soak = run(args, console)
    args.out.mkdir(parents=True, exist_ok=True)
    record = {
        "seed": args.seed,
        "requests": args.requests,
        "fault_env": FAULT_ENV,
        "injected": soak.injected,
        "schedule": soak.schedule,
        "checks": soak.checks,
        "failures": soak.failures,
        "outcomes": [vars(o) for o in soak.outcomes],
    }
    (args.out / "soak.json").write_text(json.dumps(record, indent=1, default=str))
    if soak.checks:
        console.print(table(soak))
    for failure in soak.failures:
        console.print(f"[red]check failed:[/] {failure}")
    return 1 if soak.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
