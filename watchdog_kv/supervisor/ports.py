"""Port checks done before anything is started, so a clash is a clear error.

Ports the supervisor chooses are taken *below* the kernel's ephemeral range
(``/proc/sys/net/ipv4/ip_local_port_range``): between choosing a port and the
vLLM process binding it, any process binding port 0 -- a ZeroMQ socket, an
outgoing connection -- gets an ephemeral port, so it can never take ours.
"""

from __future__ import annotations

import random
import socket
from pathlib import Path

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


def _ephemeral_start() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def free_port(host: str, taken: set[int]) -> int:
    """A port below the ephemeral range, free now and not in ``taken``."""
    high = _ephemeral_start()
    low = max(1024, min(20000, high - 4096))
    for _ in range(200):
        port = random.randint(low, high - 1)
        if port in taken:
            continue
        try:
            sock = _bind(host, port)
        except OSError:
            continue
        sock.close()
        taken.add(port)
        return port
    raise RuntimeError(f"could not find a free port on {host} between {low} and {high - 1}")
