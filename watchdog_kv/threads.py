"""Threads of ours inside vLLM processes, kept off the cores vLLM pins itself to.

vLLM's CPU worker pins its main thread to the OpenMP cores it was given
(``VLLM_CPU_OMP_THREADS_BIND``), and every thread started after that inherits
the one-core mask -- ZeroMQ's I/O threads included. A helper thread of ours
then shares one core with a main thread that spins between steps, and waits
on it (docs/kv-transfer.md, "Measured here"). :func:`start` runs a
thread allowed on every CPU, and :func:`zmq_context` makes a ZeroMQ context
whose I/O threads are born in such a thread.
"""

from __future__ import annotations

import contextlib
import os
import threading
from collections.abc import Callable
from typing import Any

import zmq

__all__ = ["INITIAL_CPUS", "start", "widen_this_thread", "zmq_context"]

INITIAL_CPUS: frozenset[int] = frozenset(os.sched_getaffinity(0))


def widen_this_thread() -> None:
    """Let the calling thread run on every CPU (Linux: the mask is per thread).

    vLLM may have pinned the whole process before watchdog_kv was imported
    (the engine core is pinned too), so the mask recorded at import is only the
    fallback when the machine's full set is not allowed (a cgroup cpuset).
    """
    for cpus in (set(range(os.cpu_count() or 1)), INITIAL_CPUS):
        with contextlib.suppress(OSError):
            os.sched_setaffinity(0, cpus)
            return


def start(target: Callable[[], Any], name: str) -> threading.Thread:
    def run() -> None:
        widen_this_thread()
        target()

    thread = threading.Thread(target=run, name=name, daemon=True)
    thread.start()
    return thread


def zmq_context() -> zmq.Context[Any]:
    """A new ZeroMQ context whose I/O and reaper threads run on the original mask."""
    box: dict[str, zmq.Context[Any]] = {}

    def make() -> None:
        ctx: zmq.Context[Any] = zmq.Context()
        ctx.socket(zmq.PAIR).close(linger=0)  # libzmq starts its threads with the first socket
        box["ctx"] = ctx

    start(make, "watchdog_kv-zmq").join()
    return box["ctx"]
