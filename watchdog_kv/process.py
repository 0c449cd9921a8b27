"""Which vLLM process are we in, and the status record each one publishes.

vLLM V1 runs one server as several processes, and loads the
``vllm.general_plugins`` entry point in each:

========================  ===========================  ===================
process                   multiprocessing name         role
========================  ===========================  ===================
OpenAI API server         ``MainProcess``              ``api_server``
offline ``LLM(...)``      ``MainProcess``              ``frontend``
extra API servers         ``ApiServer_<n>``            ``api_server``
engine core               ``EngineCore[_DP<r>]``       ``engine_core``
worker (mp executor)      ``VllmWorker-<r>``           ``worker``
========================  ===========================  ===================

On CPU, vLLM always uses the multiprocess executor, so a server is three
processes even at tensor-parallel size 1.

Each registered process writes ``<state_dir>/procs/<pid>.json`` (atomically, by
rename) so that tests, the supervisor and operators can see which processes have
watchdog_kv loaded without asking the process itself.
"""

from __future__ import annotations

import json
import multiprocessing
import os
import re
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

__all__ = [
    "ProcessIdentity",
    "boot_id",
    "detect",
    "process_state",
    "read_records",
    "running",
    "start_ticks",
    "write_json",
    "write_record",
]

_ENGINE = re.compile(r"^EngineCore(?:_DP(?P<rank>\d+))?$")
_WORKER = re.compile(r"^VllmWorker-(?P<rank>\d+)$")
_API = re.compile(r"^ApiServer_(?P<rank>\d+)$")


@dataclass(frozen=True)
class ProcessIdentity:
    role: str
    rank: int | None
    process_name: str


def _main_module() -> str:
    main = sys.modules.get("__main__")
    spec = getattr(main, "__spec__", None)
    return getattr(spec, "name", "") or ""


def detect() -> ProcessIdentity:
    """Tell the role of this process from what vLLM names it."""
    name = multiprocessing.current_process().name
    if m := _ENGINE.match(name):
        return ProcessIdentity("engine_core", int(m["rank"] or 0), name)
    if m := _WORKER.match(name):
        return ProcessIdentity("worker", int(m["rank"]), name)
    if m := _API.match(name):
        return ProcessIdentity("api_server", int(m["rank"]), name)
    if name == "MainProcess":
        serving = "vllm.entrypoints.openai.api_server" in sys.modules
        if _main_module().startswith("vllm.entrypoints") or serving:
            return ProcessIdentity("api_server", None, name)
        return ProcessIdentity("frontend", None, name)
    return ProcessIdentity("other", None, name)


_boot_id: str | None = None


def boot_id() -> str | None:
    """This host's boot id: a record made under another one is another host's (or an
    earlier boot's), whose pids mean nothing here."""
    global _boot_id
    if _boot_id is None:
        try:
            _boot_id = Path("/proc/sys/kernel/random/boot_id").read_text().strip()
        except OSError:
            return None
    return _boot_id


def _stat(pid: int) -> list[str] | None:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except (OSError, IndexError):
        return None


def start_ticks(pid: int) -> int | None:
    """When ``pid`` started, in clock ticks since boot (``/proc/<pid>/stat`` field 22):
    with the pid, it names one process, not whichever reuses the number later."""
    fields = _stat(pid)
    try:
        return int(fields[19]) if fields else None
    except (ValueError, IndexError):
        return None


def process_state(pid: int) -> str:
    """The kernel's one-letter state of ``pid`` (R, S, D, T, t, Z...), or ``gone``."""
    fields = _stat(pid)
    return fields[0] if fields else "gone"


def running(pid: int, ticks: int | None = None) -> bool:
    """``pid`` is a live process (not a zombie) and, when ``ticks`` is given, the one
    that started then."""
    if pid <= 0 or process_state(pid) in ("gone", "Z", "X"):
        return False
    return ticks is None or start_ticks(pid) == ticks


@dataclass
class StatusRecord:
    pid: int
    ppid: int
    role: str
    rank: int | None
    process_name: str
    server: str | None
    hooks: list[str] = field(default_factory=list)
    kv: dict[str, Any] | None = None  # the KV-transfer watch of this process, if any
    metrics: dict[str, Any] | None = None  # counters and histograms (telemetry.metrics)
    registered_at: float = field(default_factory=time.time)
    vllm_version: str | None = None
    watchdog_kv_version: str | None = None
    amx: dict[str, Any] | None = None  # what was found and done about AMX (host.amx)
    crash_record: str | None = None  # where faulthandler writes if this process crashes
    cpus: dict[str, Any] | None = None  # an engine core's OpenMP binding (host.cpus)
    boot_id: str | None = field(default_factory=boot_id)  # the host (and boot) of the pid
    start_ticks: int | None = field(default_factory=lambda: start_ticks(os.getpid()))


def write_json(path: Path, data: Any, indent: int | None = 1) -> Path:
    """Write ``data`` as JSON to ``path`` atomically (a reader sees the old file or the new
    one, never half of one)."""
    tmp = path.with_name(f".{path.name}.tmp")
    tmp.write_text(json.dumps(data, indent=indent, default=str) + "\n")
    os.replace(tmp, path)
    return path


def write_record(state_dir: Path, record: StatusRecord) -> Path:
    procs = state_dir / "procs"
    procs.mkdir(parents=True, exist_ok=True)
    return write_json(procs / f"{record.pid}.json", asdict(record))


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def read_records(state_dir: Path) -> list[dict[str, Any]]:
    """Every status record under ``state_dir``, each with ``alive`` added."""
    out: list[dict[str, Any]] = []
    procs = state_dir / "procs"
    if not procs.is_dir():
        return out
    for path in sorted(procs.glob("*.json")):
        try:
            rec = json.loads(path.read_text())
        except (OSError, ValueError):
            continue  # a record being replaced, or a foreign file
        if not isinstance(rec, dict) or not isinstance(rec.get("pid"), int) or rec["pid"] <= 0:
            continue  # not a record of ours
        rec["alive"] = _alive(rec["pid"])
        out.append(rec)
    return out
