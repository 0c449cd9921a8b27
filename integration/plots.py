"""PNG plots of a bench run (matplotlib, no display needed)."""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # after the backend is chosen

if TYPE_CHECKING:
    from integration.bench import Results

__all__ = ["plot_all"]

OFF, ON, STOCK = "#888888", "#1f77b4", "#d62728"


def plot_all(res: Results, out: Path) -> list[Path]:
    made = []
    for name, draw in (
        ("overhead.png", _overhead),
        ("kv_hang.png", _kv_hang),
        ("stall_detection.png", _stalls),
        ("restart.png", _restarts),
    ):
        fig = draw(res)
        if fig is None:
            continue
        path = out / name
        fig.tight_layout()
        fig.savefig(path, dpi=110)
        plt.close(fig)
        made.append(path)
    return made


def _overhead(res: Results):
    o = res.overhead
    if not o:
        return None
    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 4))
    for name, color in (("off", OFF), ("on", ON)):
        tps = o[name]["tokens_per_s"]
        left.plot(range(1, len(tps) + 1), tps, "o-", color=color, label=f"plugin {name}")
        lat = sorted(x for r in o[name]["rounds"] for x in r["latencies_s"])
        if lat:
            right.plot(
                lat,
                [(i + 1) / len(lat) for i in range(len(lat))],
                color=color,
                label=f"plugin {name}",
            )
    left.set(
        xlabel="round (alternating ABBA)",
        ylabel="tokens/s",
        title=f"throughput, on/off = {o['ratio_on_off']:.3f}",
    )
    left.set_ylim(bottom=0)
    left.legend()
    right.set(xlabel="request latency (s)", ylabel="fraction of requests", title="latency CDF")
    right.legend()
    return fig


def _kv_hang(res: Results):
    kv = res.kv_hang
    if not kv:
        return None
    fig, ax = plt.subplots(figsize=(6, 4))
    labels, values, colors, notes = [], [], [], []
    for i, r in enumerate(kv["plugin"], 1):
        labels.append(f"plugin #{i}")
        values.append(r.get("seconds") or 0.0)
        colors.append(ON)
        notes.append("correct" if r.get("correct") else r.get("outcome", ""))
    stock = kv["stock"]
    labels.append("stock vLLM")
    values.append(stock.get("seconds") or 0.0)
    colors.append(STOCK)
    notes.append("client gave up" if stock.get("status") == 0 else stock.get("outcome", ""))
    bars = ax.bar(labels, values, color=colors)
    for bar, note in zip(bars, notes, strict=True):
        ax.annotate(
            note,
            (bar.get_x() + bar.get_width() / 2, bar.get_height()),
            ha="center",
            va="bottom",
            fontsize=8,
        )
    ax.set(ylabel="seconds from the prefill engine stopping", title="KV hang to an answer")
    return fig


def _stalls(res: Results):
    found = [s for s in res.stalls if s.get("detected")]
    if not found:
        return None
    fig, ax = plt.subplots(figsize=(7, 4))
    for kind, marker in (("GIL held in a worker step", "o"), ("engine core stopped", "s")):
        xs = [i for i, s in enumerate(found, 1) if s["kind"] == kind]
        ax.plot(
            xs,
            [found[i - 1]["detected_after_s"] for i in xs],
            marker,
            color=ON,
            label=f"detected: {kind}",
        )
        ax.plot(
            xs,
            [found[i - 1]["deadline_s"] for i in xs],
            marker,
            mfc="none",
            color=OFF,
            label=f"learned deadline ({kind})",
        )
    ax.set(
        xlabel="injected stall",
        ylabel="seconds after the stall began",
        title="step-stall detection",
    )
    top = max(max(s["detected_after_s"], s["deadline_s"]) for s in found)
    ax.set_ylim(0, top * 1.2)
    ax.legend(fontsize=8)
    return fig


def _restarts(res: Results):
    secs = [r["seconds"] for r in res.restarts if r.get("seconds") is not None]
    if not secs:
        return None
    fig, ax = plt.subplots(figsize=(5, 4))
    ready = [r.get("vllm_ready_after_s") or 0.0 for r in res.restarts if r.get("seconds")]
    xs = [f"#{i}" for i in range(1, len(secs) + 1)]
    ax.bar(xs, secs, color=ON, label="kill -> ready again")
    ax.bar(xs, ready, color=OFF, width=0.4, label="of which vLLM start-up")
    ax.set(ylabel="seconds", title="supervised restart of a killed decode")
    ax.legend(fontsize=8)
    return fig
