"""The supervisor: launches stock vLLM servers and the router, watches, stops them."""

from watchdog_kv.supervisor.core import Supervisor
from watchdog_kv.supervisor.errors import ServerExitedError, ServerStartTimeout, StartupError
from watchdog_kv.supervisor.plan import ServeOptions
from watchdog_kv.supervisor.ports import PortInUseError
from watchdog_kv.supervisor.service import run_service

__all__ = [
    "PortInUseError",
    "ServeOptions",
    "ServerExitedError",
    "ServerStartTimeout",
    "StartupError",
    "Supervisor",
    "run_service",
]
