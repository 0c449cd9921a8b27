"""A child process the supervisor owns: started in its own session, stopped whole.

A vLLM server is a tree (API server, engine core, worker, multiprocessing's
resource tracker). Each managed process is started with ``start_new_session`` so
the tree shares one process group, with ``PR_SET_PDEATHSIG`` so the child gets
SIGTERM if the supervisor itself dies, and with stdout and stderr captured to a
log file whose tail is quoted in errors.

:meth:`ManagedProcess.stop` sends SIGTERM to the group, waits ``grace``
seconds for every process of the tree, then SIGKILLs whatever is left — the
group and any descendant that moved out of it — so nothing is left running.
"""

from __future__ import annotations

import contextlib
import ctypes
import os
import signal
import subprocess
import time
from collections import deque
from collections.abc import Mapping, Sequence
from pathlib import Path

import psutil

__all__ = ["ManagedProcess"]

_PR_SET_PDEATHSIG = 1


def _die_with_parent() -> None:  # runs in the child between fork and exec
    with contextlib.suppress(Exception):
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(_PR_SET_PDEATHSIG, signal.SIGTERM)


class ManagedProcess:
    def __init__(
        self,
        name: str,
        argv: Sequence[str],
        env: Mapping[str, str],
        log_path: Path,
    ) -> None:
        self.name = name
        self.argv = list(argv)
        self.env = dict(env)
        self.log_path = log_path
        self._popen: subprocess.Popen[bytes] | None = None
        self._known: dict[int, psutil.Process] = {}

    @property
    def pid(self) -> int | None:
        return self._popen.pid if self._popen else None

    def start(self) -> None:
        self.log_path.parent.mkdir(parents=True, exist_ok=True)
        with open(self.log_path, "ab") as log:
            self._popen = subprocess.Popen(
                self.argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
                preexec_fn=_die_with_parent,
            )

    def poll(self) -> int | None:
        """The exit code if the top process has exited, else None."""
        return self._popen.poll() if self._popen else None

    def tree(self) -> list[psutil.Process]:
        """The top process and its live descendants (remembered across calls)."""
        if self._popen is None:
            return []
        try:
            top = psutil.Process(self._popen.pid)
            found = [top, *top.children(recursive=True)]
        except psutil.NoSuchProcess:
            found = []
        for proc in found:
            self._known.setdefault(proc.pid, proc)
        return [p for p in self._known.values() if _alive(p)]

    def tail(self, lines: int = 20) -> list[str]:
        try:
            with open(self.log_path, errors="replace") as fh:
                return [ln.rstrip("\n") for ln in deque(fh, maxlen=lines)]
        except OSError:
            return []

    def stop(self, grace: float = 20.0) -> list[int]:
        """Stop the whole tree; return the pids that had to be SIGKILLed."""
        if self._popen is None:
            return []
        procs = self.tree()
        pgid = self._popen.pid  # session leader: its pid is the group id
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGTERM)
        for proc in procs:  # descendants that left the group, if any
            with contextlib.suppress(psutil.Error):
                proc.terminate()
        deadline = time.monotonic() + grace
        while time.monotonic() < deadline:
            self._popen.poll()
            if not any(_alive(p) for p in procs):
                break
            time.sleep(0.1)
        killed: list[int] = []
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(pgid, signal.SIGKILL)
        for proc in procs:
            if _alive(proc):
                killed.append(proc.pid)
                with contextlib.suppress(psutil.Error):
                    proc.kill()
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5)
        return killed


def _alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's wait is owed)."""
    try:
        return proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE
    except psutil.Error:
        return False
