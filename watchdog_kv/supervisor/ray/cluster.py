"""The Ray cluster the servers run on: connecting to it, what it has, its errors.

``watchdog-kv serve --backend ray`` connects to a Ray cluster that already runs
(``ray start --head`` on one machine, ``ray start --address=HEAD:PORT`` on the
others); it never starts one. :func:`connect` joins it once per process, and an
address where nothing answers is a :class:`RayClusterUnreachable` at once.
Every error of the Ray backend is a :class:`RayBackendError`, a
:class:`~watchdog_kv.supervisor.errors.StartupError`: to the restart policy a
server that cannot be placed or started is a failed attempt like any other.

Ray is imported inside the functions that use it: the supervisor imports this
module whether or not Ray is installed.
"""

from __future__ import annotations

import contextlib
import logging
import os
import signal
import socket
import threading
from collections.abc import Mapping
from typing import Any

from watchdog_kv.supervisor.errors import StartupError
from watchdog_kv.telemetry import get_logger

__all__ = [
    "PlacementTimeout",
    "RayBackendError",
    "RayClusterUnreachable",
    "connect",
    "first_line",
    "free_and_total",
    "remote",
    "resources",
]

_log = get_logger("watchdog_kv.supervisor")

_CONNECT_TIMEOUT_S = 5.0  # the TCP probe of the cluster's address before ray.init
_NAMESPACE = "watchdog_kv"


class RayBackendError(StartupError):
    """A server could not be placed or started on the Ray cluster; the message says why."""


class RayClusterUnreachable(RayBackendError):
    def __init__(self, address: str, reason: str) -> None:
        super().__init__(
            f"no Ray cluster reachable at {address}: {reason}. The Ray backend connects to a "
            "running cluster (`ray start --head` on the head node) and never starts one; "
            "pass its address with --ray-address HOST:PORT or RAY_ADDRESS"
        )
        self.address = address


class PlacementTimeout(RayBackendError):
    def __init__(
        self,
        name: str,
        bundle: Mapping[str, float],
        timeout_s: float,
        available: Mapping[str, float],
        total: Mapping[str, float],
    ) -> None:
        super().__init__(
            f"placement group for {name} ({resources(bundle)}) not placed within "
            f"{timeout_s:g} s; the cluster has {resources(available)} available "
            f"(of {resources(total)} in total)"
        )
        self.name, self.bundle, self.timeout_s = name, dict(bundle), timeout_s
        self.available = dict(available)


def resources(res: Mapping[str, float]) -> dict[str, float]:
    """Resources as an operator reads them: no per-node markers, memory in GiB."""
    out: dict[str, float] = {}
    for key, value in sorted(res.items()):
        if key.startswith("node:"):
            continue
        if key in ("memory", "object_store_memory"):
            out[f"{key}_gib"] = round(value / 2**30, 1)
        else:
            out[key] = value
    return out


_connect_lock = threading.Lock()


def connect(address: str | None) -> None:
    """Connect this process to the running Ray cluster at ``address`` (once per process).

    ``None`` means ``"auto"``: ``RAY_ADDRESS``, else the cluster last started on
    this machine. A process already connected (``ray.is_initialized()``) is left
    as it is. Raises :class:`RayClusterUnreachable` instead of starting a
    cluster or retrying for minutes. The process's SIGTERM handling is left as
    it was (``ray.init`` would replace it).
    """
    try:
        import ray
    except ImportError as exc:
        raise RayBackendError("the Ray backend needs Ray: pip install 'watchdog_kv[ray]'") from exc
    with _connect_lock:
        if ray.is_initialized():
            return
        target = _resolve_address(address or "auto")
        _keep_sigterm_quiet()
        # ray.init makes SIGTERM call sys.exit when called on the main thread (and
        # warns when not); the supervisor drains and stops its servers on SIGTERM,
        # so its own handler is put back.
        on_sigterm = signal.getsignal(signal.SIGTERM)
        worker_log = logging.getLogger("ray._private.worker")
        worker_log.addFilter(_no_sigterm_warning)
        try:
            ray.init(
                address=target,
                namespace=_NAMESPACE,
                log_to_driver=False,  # each server's log is its own file
                logging_level=logging.WARNING,
            )
        except Exception as exc:
            raise RayClusterUnreachable(target, first_line(exc)) from exc
        finally:
            worker_log.removeFilter(_no_sigterm_warning)
            if on_sigterm is not None and threading.current_thread() is threading.main_thread():
                signal.signal(signal.SIGTERM, on_sigterm)
        _log.info("ray.connected", address=target, resources=resources(free_and_total()[1]))


def _keep_sigterm_quiet() -> None:
    """No stack dump on SIGTERM: Ray's driver installs a C++ failure-signal handler
    that prints one before passing the signal on, and a supervisor is stopped
    with SIGTERM on purpose. An operator's ``RAY_DISABLE_FAILURE_SIGNAL_HANDLER``
    wins."""
    if "RAY_DISABLE_FAILURE_SIGNAL_HANDLER" in os.environ:
        return
    with contextlib.suppress(ImportError):
        from ray._private import ray_constants

        ray_constants.RAY_DISABLE_FAILURE_SIGNAL_HANDLER = True


def _no_sigterm_warning(record: logging.LogRecord) -> bool:
    return not str(record.msg).startswith("SIGTERM handler is not set")


def _resolve_address(address: str) -> str:
    """``host:port`` of the cluster, checked to accept connections (``ray.init`` would
    otherwise retry an unreachable address for minutes)."""
    if "://" in address:  # ray:// (Ray Client) and the like: Ray's own checks apply
        return address
    try:
        from ray._private.services import canonicalize_bootstrap_address_or_die
    except ImportError:  # moved in some Ray release: let ray.init resolve it
        return address
    try:
        target: str = canonicalize_bootstrap_address_or_die(address)
    except (ConnectionError, ValueError) as exc:
        raise RayClusterUnreachable(address, str(exc).splitlines()[0]) from exc
    host, _, port = target.rpartition(":")
    try:
        with socket.create_connection((host.strip("[]"), int(port)), _CONNECT_TIMEOUT_S):
            pass
    except (OSError, ValueError) as exc:
        raise RayClusterUnreachable(target, f"cannot connect: {exc}") from exc
    return target


_remotes: dict[Any, Any] = {}


def remote(target: Any) -> Any:
    """``ray.remote(target)``, made once per process."""
    import ray

    if target not in _remotes:
        _remotes[target] = ray.remote(target)
    return _remotes[target]


def free_and_total() -> tuple[dict[str, float], dict[str, float]]:
    """The cluster's available and total resources."""
    import ray

    state: Any = ray
    return dict(state.available_resources()), dict(state.cluster_resources())


def first_line(exc: BaseException | None) -> str:
    text = str(exc).strip() if exc is not None else ""
    return text.splitlines()[0] if text else type(exc).__name__
