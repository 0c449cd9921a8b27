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

__all__ = ["ManagedProcess", "alive", "stop_processes"]

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
        return [p for p in self._known.values() if alive(p)]

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
        # session leader: its pid is the group id. Once the leader is reaped, the kernel
        # still keeps that id from any new process while a member of the group lives --
        # an engine core or worker that outlived its killed API server must go too
        killed = stop_processes(self._popen.pid, self.tree(), grace, group_is_ours=True)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self._popen.wait(timeout=5)
        return killed


def stop_processes(
    pgid: int, procs: list[psutil.Process], grace: float, *, group_is_ours: bool
) -> list[int]:
    """SIGTERM the process group ``pgid`` and each of ``procs`` (descendants that
    left the group too), wait up to ``grace`` seconds for all of them, then
    SIGKILL what is left; return the pids that had to be SIGKILLed.

    ``group_is_ours=False`` (the group's leader was not our child, so its pid may
    have been reused): the group is signalled only while one of ``procs`` is
    still in it.
    """

    def signal_all(sig: signal.Signals, left: list[psutil.Process]) -> None:
        if group_is_ours or any(_pgid(p) == pgid for p in left):
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(pgid, sig)
        for proc in left:
            with contextlib.suppress(psutil.Error):
                proc.send_signal(sig)

    signal_all(signal.SIGTERM, [p for p in procs if alive(p)])
    deadline = time.monotonic() + grace
    while time.monotonic() < deadline and any(alive(p) for p in procs):
        time.sleep(0.1)
    left = [p for p in procs if alive(p)]
    if group_is_ours or left:
        signal_all(signal.SIGKILL, left)
    return [p.pid for p in left]


def _pgid(proc: psutil.Process) -> int | None:
    try:
        return os.getpgid(proc.pid)
    except OSError:
        return None


def alive(proc: psutil.Process) -> bool:
    """Running and not a zombie (a zombie has exited; only its parent's wait is owed)."""
    try:
        return bool(proc.is_running() and proc.status() != psutil.STATUS_ZOMBIE)
    except psutil.Error:
        return False
