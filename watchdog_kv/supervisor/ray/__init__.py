"""The Ray backend: each vLLM server hosted by a Ray actor in its own placement group.

* :mod:`~watchdog_kv.supervisor.ray.cluster` -- the cluster: connecting to one
  that already runs (never starting one), what it has free, the backend's errors;
* :mod:`~watchdog_kv.supervisor.ray.host` -- on the node: the actor that starts
  and stops one server's process tree;
* :mod:`~watchdog_kv.supervisor.ray.server` -- in the supervisor: the handle
  (:class:`RayServer`) that places the actor, watches it and stops it.

Ray itself is imported only where it is used, so importing this package does not
need Ray.
"""

from watchdog_kv.supervisor.ray.cluster import (
    PlacementTimeout,
    RayBackendError,
    RayClusterUnreachable,
    connect,
)
from watchdog_kv.supervisor.ray.host import ServerHost
from watchdog_kv.supervisor.ray.server import (
    ACTOR_LOST_EXIT_CODE,
    DEFAULT_BUNDLE,
    FORWARDED_ENV_PREFIXES,
    POLL_INTERVAL_S,
    RayServer,
)

__all__ = [
    "ACTOR_LOST_EXIT_CODE",
    "DEFAULT_BUNDLE",
    "FORWARDED_ENV_PREFIXES",
    "POLL_INTERVAL_S",
    "PlacementTimeout",
    "RayBackendError",
    "RayClusterUnreachable",
    "RayServer",
    "ServerHost",
    "connect",
]
