"""Evidence from outside a stalled process: stacks, beacon, flight recorder.

Everything here runs in the monitor's process and asks nothing of the watched
one:

* stacks come from ``py-spy dump --json`` (it reads the process's memory; it
  does not need the GIL). A running process gets ``--native`` too, so a thread
  blocked in C shows the C frames under its Python ones and py-spy marks the
  thread that holds the GIL. A *stopped* process (state ``T``) cannot be
  paused again by py-spy's ptrace, so it is read with ``--nonblocking`` --
  exact, since a stopped process cannot change under the reader -- without
  native frames (py-spy needs ptrace for those; ``gdb`` can read them but took
  over 20 s on a vLLM engine core here, so it is not used). A stopped process
  stays stopped;
* the beacon and flight recorder are read from the process's beacon file.

An incident is one directory holding ``incident.json`` (the stall and the
processes of the affected server) and ``proc-<pid>.json`` per process.
``watchdog-kv report`` reads them back (see :mod:`watchdog_kv.monitor.report`).
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import sysconfig
import time
from collections.abc import Iterable
from pathlib import Path
from typing import Any

from watchdog_kv.beacon import beacon_path, read_beacon
from watchdog_kv.process import process_state, write_json

__all__ = ["collect_incident", "dump_stacks", "process_state", "py_spy_path"]

DUMP_TIMEOUT_S = 20.0


def py_spy_path() -> str | None:
    """py-spy installed next to this interpreter, else on PATH."""
    for folder in (sysconfig.get_path("scripts"), str(Path(sys.executable).parent)):
        candidate = Path(folder) / "py-spy"
        if candidate.is_file() and os.access(candidate, os.X_OK):
            return str(candidate)
    return shutil.which("py-spy")


def _run(argv: list[str], timeout: float) -> tuple[int, str, str]:
    try:
        done = subprocess.run(argv, capture_output=True, text=True, timeout=timeout, check=False)
    except subprocess.TimeoutExpired:
        return -1, "", f"{argv[0]} did not finish within {timeout:g} s"
    except OSError as exc:
        return -1, "", str(exc)
    return done.returncode, done.stdout, done.stderr


def dump_stacks(pid: int, timeout: float = DUMP_TIMEOUT_S) -> dict[str, Any]:
    """Every thread's stack of ``pid``: ``{"tool", "state", "threads", "errors", ...}``."""
    state = process_state(pid)
    out: dict[str, Any] = {"pid": pid, "state": state, "threads": [], "errors": []}
    if state == "gone":
        out["errors"].append("process has exited")
        return out
    spy = py_spy_path()
    if spy is None:
        out["errors"].append("py-spy is not installed (pip install py-spy)")
        return out
    stopped = state in ("T", "t")
    attempts = (
        [["--nonblocking"]] if stopped else [["--native"], ["--nonblocking"]]
    )  # a live process that ptrace cannot pause still reads without it
    t0 = time.monotonic()
    for extra in attempts:
        code, stdout, stderr = _run([spy, "dump", "--json", *extra, "--pid", str(pid)], timeout)
        if code == 0:
            try:
                threads = json.loads(stdout)
            except ValueError:
                out["errors"].append(f"py-spy {' '.join(extra)}: output is not JSON")
                continue
            out["threads"] = threads if isinstance(threads, list) else []
            out["tool"] = f"py-spy dump --json {' '.join(extra)}"
            break
        out["errors"].append(f"py-spy {' '.join(extra)}: {stderr.strip()[-400:]}")
    out["seconds"] = round(time.monotonic() - t0, 3)
    return out


def collect_incident(
    dump_root: Path,
    stall: dict[str, Any],
    processes: Iterable[dict[str, Any]],
    state_dir: Path,
) -> Path:
    """Write one incident directory for ``stall`` and the processes around it."""
    stamp = time.strftime("%Y%m%d-%H%M%S", time.localtime(stall.get("detected_wall", time.time())))
    label = f"{stall.get('server') or 'server'}-{stall.get('role')}{stall.get('rank') or ''}"
    folder = dump_root / f"{stamp}-{label}-{stall['pid']}"
    folder.mkdir(parents=True, exist_ok=True)
    procs = list(processes)
    for rec in procs:
        pid = int(rec["pid"])
        got = read_beacon(beacon_path(state_dir, pid))
        entry = {
            "record": rec,
            "beacon": got[0].as_dict() if got else None,
            "flight_recorder": got[1] if got else [],
            "stacks": dump_stacks(pid),
        }
        _write_json(folder / f"proc-{pid}.json", entry)
    _write_json(
        folder / "incident.json",
        {"stall": stall, "pids": [int(r["pid"]) for r in procs], "written_wall": time.time()},
    )
    return folder


def _write_json(path: Path, data: Any) -> None:
    write_json(path, data)
