"""Port checks done before anything is started, so a clash is a clear error."""

from __future__ import annotations

import contextlib
import socket

__all__ = ["PortInUseError", "check_free", "free_port"]


class PortInUseError(RuntimeError):
    def __init__(self, host: str, port: int, what: str) -> None:
        super().__init__(f"port {port} on {host} ({what}) is already in use")
        self.host, self.port, self.what = host, port, what


def _bind(host: str, port: int) -> socket.socket:
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        raise
    return sock


def check_free(host: str, port: int, what: str) -> None:
    """Raise :class:`PortInUseError` naming ``what`` if ``host:port`` cannot be bound."""
    try:
        sock = _bind(host, port)
    except OSError:
        raise PortInUseError(host, port, what) from None
    sock.close()


def free_port(host: str, taken: set[int]) -> int:
    """A port the kernel says is free now and that is not in ``taken``."""
    for _ in range(100):
        with contextlib.closing(_bind(host, 0)) as sock:
            port = int(sock.getsockname()[1])
        if port not in taken:
            taken.add(port)
            return port
    raise RuntimeError("could not find a free port")
