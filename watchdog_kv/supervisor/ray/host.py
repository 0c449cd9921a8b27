"""The node side of the Ray backend: the actor that hosts one vLLM server.

A :class:`ServerHost` actor runs in the server's placement-group bundle. On its
node it checks that the server's ports are free, then starts the stock vLLM
OpenAI server as a :class:`~watchdog_kv.supervisor.process.ManagedProcess` --
its own process group, its log in ``<run_dir>/logs/<server>.log`` *on that
node* -- listening on the node's address. The server is started with
``PR_SET_PDEATHSIG=SIGTERM``, so when the actor's process dies -- even by
SIGKILL -- the server gets SIGTERM and shuts its engine down.

:func:`reap_tree` is the task the supervisor sends to the same node once the
actor is gone: it stops whatever is left of the tree the actor last reported.

The actor imports ``watchdog_kv`` and runs vLLM from the Python environment the
Ray node was started with; no code is shipped through ``runtime_env``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import psutil

from watchdog_kv.supervisor.ports import PortInUseError, check_free
from watchdog_kv.supervisor.process import ManagedProcess, stop_processes
from watchdog_kv.supervisor.servers import ServerSpec

__all__ = ["TAIL_LINES", "ServerHost", "reap_tree"]

TAIL_LINES = 25
"""Log lines each poll brings back (what error messages quote)."""


class ServerHost:
    """The actor's body: hosts one vLLM server's process tree on the actor's node.

    Methods run on the actor's main thread, one at a time: the thread that
    starts the server is the one whose death ``PR_SET_PDEATHSIG`` watches.
    """

    def __init__(self) -> None:
        self._proc: ManagedProcess | None = None

    def launch(
        self, spec: ServerSpec, run_dir: Path, forwarded_env: Mapping[str, str]
    ) -> dict[str, Any]:
        """Start the server on this node's address; its placed spec and where it runs."""
        import ray

        node_ip: str = ray.util.get_node_ip_address()  # type: ignore[no-untyped-call,unused-ignore]
        placed = dataclasses.replace(spec, host=node_ip)
        context = ray.get_runtime_context()
        where: dict[str, Any] = {
            "node_ip": node_ip,
            "node_id": context.get_node_id(),
            "actor_id": context.get_actor_id(),
            "actor_pid": os.getpid(),
        }
        try:
            check_free(node_ip, placed.port, f"{spec.name} HTTP")
            check_free(node_ip, placed.side_channel_port, f"{spec.name} NIXL side channel")
        except PortInUseError as exc:
            return {**where, "error": str(exc)}
        env = placed.env({**os.environ, **forwarded_env}, run_dir)
        self._proc = ManagedProcess(
            spec.name, placed.argv(), env, run_dir / "logs" / f"{spec.name}.log"
        )
        self._proc.start()
        return {**where, "spec": placed, "pid": self._proc.pid}

    def poll(self) -> dict[str, Any]:
        """The server's exit code (None while it runs), its tree and its last log lines."""
        if self._proc is None:
            return {"code": None, "tree": [], "tail": []}
        tree = []
        for proc in self._proc.tree():
            with contextlib.suppress(psutil.Error):
                tree.append((proc.pid, proc.create_time()))
        return {"code": self._proc.poll(), "tree": tree, "tail": self._proc.tail(TAIL_LINES)}

    def tail(self, lines: int) -> list[str]:
        return self._proc.tail(lines) if self._proc is not None else []

    def stop(self, grace: float) -> tuple[list[int], int | None]:
        """Stop the whole tree (SIGTERM, ``grace`` seconds, SIGKILL): the pids
        killed and the server's exit code."""
        if self._proc is None:
            return [], None
        killed = self._proc.stop(grace)
        return killed, self._proc.poll()


def reap_tree(pgid: int, tree: list[tuple[int, float]], grace: float) -> list[int]:
    """Stop what is left of a server's tree whose actor died; runs on that node.

    Only processes still matching a recorded (pid, start time) are signalled,
    and the process group only while one of them still leads or belongs to it.
    """
    procs: list[psutil.Process] = []
    for pid, created in tree:
        with contextlib.suppress(psutil.Error):
            proc = psutil.Process(pid)
            if abs(proc.create_time() - created) < 0.01:
                procs.append(proc)
    return stop_processes(pgid, procs, grace, group_is_ours=False)
