"""The monitor: reads every beacon from outside and says which process is stalled.

It runs in the supervisor (``watchdog-kv serve``) or as a sidecar
(``watchdog-kv monitor``), never inside a watched process, so it keeps working
when a vLLM process holds the GIL or is stopped. The rules are
:mod:`watchdog_kv.stalls`'s, checked every ``interval``. A stall is reported
once per phase (by the beacon's sequence number); when the process moves on,
the stall is cleared. On a new stall the monitor logs it, calls ``on_stall``
and collects an incident (stacks of the stalled process and of the other
processes of its server, beacons, flight recorders) in the background.
"""

from __future__ import annotations

import concurrent.futures
import threading
from collections.abc import Callable
from pathlib import Path
from typing import Any

from watchdog_kv import process as procrecords
from watchdog_kv.beacon import read_beacons
from watchdog_kv.monitor.evidence import collect_incident
from watchdog_kv.stalls import Stall, StallRules
from watchdog_kv.telemetry import get_logger

__all__ = ["Monitor"]

_log = get_logger("watchdog_kv.step")


class Monitor:
    """Checks the beacons of one state directory on a thread of its own."""

    def __init__(
        self,
        state_dir: Path,
        dump_dir: Path,
        *,
        interval_s: float = 0.25,
        on_stall: Callable[[Stall], None] | None = None,
        on_clear: Callable[[Stall], None] | None = None,
        collect: bool = True,
    ) -> None:
        self.state_dir, self.dump_dir = state_dir, dump_dir
        self.interval_s = interval_s
        self.on_stall, self.on_clear = on_stall, on_clear
        self.collect = collect
        self._lock = threading.Lock()
        self._active: dict[tuple[int, int, str], Stall] = {}
        self._history: list[Stall] = []
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._pool = concurrent.futures.ThreadPoolExecutor(1, thread_name_prefix="wkv-evidence")
        self._evidence: dict[tuple[int, int, str], concurrent.futures.Future[Path | None]] = {}
        self._rules = StallRules()

    # -- lifecycle ----------------------------------------------------------------------
    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="wkv-monitor", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self._pool.shutdown(wait=False, cancel_futures=True)

    def _run(self) -> None:
        while not self._stop.wait(self.interval_s):
            try:
                self.check()
            except Exception:
                _log.exception("watchdog_kv.internal_error", what="monitor check")

    # -- one pass -------------------------------------------------------------------------
    def check(self, now: float | None = None) -> list[Stall]:
        """Read everything once; report new stalls and cleared ones. Returns the current."""
        records = procrecords.read_records(self.state_dir)
        beacons = {pid: got[0] for pid, got in read_beacons(self.state_dir).items()}
        found = {s.key: s for s in self._rules.find(records, beacons, now)}
        with self._lock:
            new = [s for k, s in found.items() if k not in self._active]
            gone = [s for k, s in self._active.items() if k not in found]
            for stall in gone:
                del self._active[stall.key]
            for key, stall in found.items():
                if key in self._active:  # keep the first detection, refresh the numbers
                    self._active[key].elapsed_s = stall.elapsed_s
                else:
                    self._active[key] = stall
                    self._history.append(stall)
        for stall in gone:
            _log.info("step.stall_cleared", **_fields(stall))
            if self.on_clear is not None:
                self.on_clear(stall)
        for stall in new:
            _log.error("step.stall_detected", message=stall.describe(), **_fields(stall))
            if not self.collect:
                pass
            elif (same := self._episode(stall)) is not None:
                # another process of this server is already stalled: one incident
                # (it holds every process of the server) serves both
                self._evidence[stall.key] = self._evidence[same.key]
            else:
                peers = _peers(records, stall)
                self._evidence[stall.key] = self._pool.submit(self._collect, stall, peers)
            if self.on_stall is not None:
                self.on_stall(stall)
        return self.current()

    def _episode(self, stall: Stall) -> Stall | None:
        """An earlier, still active stall of the same server with evidence under way."""
        with self._lock:
            for other in self._active.values():
                if (
                    other.key != stall.key
                    and other.server == stall.server
                    and other.key in self._evidence
                ):
                    return other
        return None

    def _collect(self, stall: Stall, peers: list[dict[str, Any]]) -> Path | None:
        try:
            folder = collect_incident(self.dump_dir, stall.as_dict(), peers, self.state_dir)
        except Exception:
            _log.exception("watchdog_kv.internal_error", what="incident collection")
            return None
        stall.incident = str(folder)
        _log.warning("step.incident_written", pid=stall.pid, incident=str(folder))
        return folder

    def evidence(self, stall: Stall, timeout: float | None = None) -> Path | None:
        """Wait for the incident of ``stall`` to be written (None if not collected)."""
        fut = self._evidence.get(stall.key)
        if fut is None:
            return None
        try:
            return fut.result(timeout=timeout)
        except (concurrent.futures.TimeoutError, concurrent.futures.CancelledError):
            return None

    # -- queries --------------------------------------------------------------------------
    def current(self, server: str | None = None) -> list[Stall]:
        with self._lock:
            return [s for s in self._active.values() if server is None or s.server == server]

    def history(self) -> list[Stall]:
        with self._lock:
            return list(self._history)


def _peers(records: list[dict[str, Any]], stall: Stall) -> list[dict[str, Any]]:
    """The stalled process first, then the other live processes of its server."""
    alive = [r for r in records if r.get("alive")]
    same = [r for r in alive if stall.server is None or r.get("server") == stall.server]
    first = [r for r in same if int(r["pid"]) == stall.pid]
    return first + [r for r in same if int(r["pid"]) != stall.pid]


def _fields(stall: Stall) -> dict[str, Any]:
    return {
        "pid": stall.pid,
        "server": stall.server,
        "proc_role": stall.role,
        "rank": stall.rank,
        "reason": stall.reason,
        "phase": stall.phase,
        "what": stall.what,
        "elapsed_s": stall.elapsed_s,
        "deadline_s": stall.deadline_s,
    }
