"""A server's lifecycle, declared as a transition table.

The supervisor moves a server from one :class:`ServerState` to another only by
applying a :class:`ServerEvent`; :data:`LIFECYCLE` says, for each (state,
event), the next state::

    waiting    --spawn-->   starting --healthy--> ready
    starting   --exit-->    exited   <--exit--    ready
    starting, ready, exited --restart--> restarting --spawn--> starting
    starting, ready, exited --give_up--> failed
    every state but stopped --stop--> stopped

Anything else is an :class:`IllegalTransition`: :func:`apply` raises and the
server's state is not changed. The supervisor logs it and carries on: such an
event arrived after the server had moved on (it was stopped, or a restart of
it is under way).

Two rules follow from the table: ``stopped`` is final -- a stopped server is
never started again -- and ``failed`` is left only by ``stop`` -- a server given
up on is never restarted. The state names are what ``/watchdog/status``,
``/watchdog/health``, the logs and the router read.
"""

from __future__ import annotations

from collections.abc import Mapping
from enum import StrEnum

__all__ = [
    "COMING_BACK",
    "LIFECYCLE",
    "IllegalTransition",
    "ServerEvent",
    "ServerState",
    "apply",
]


class ServerState(StrEnum):
    WAITING = "waiting"  # planned; not started yet
    STARTING = "starting"  # spawned; its /health has not answered 200 yet
    READY = "ready"  # healthy: the router may send it requests
    EXITED = "exited"  # its API server exited, or an engine process of it is gone
    RESTARTING = "restarting"  # what is left of it is being stopped, to start it again
    FAILED = "failed"  # given up on: the restart limit, or the same crash twice
    STOPPED = "stopped"  # stopped with the service: final


class ServerEvent(StrEnum):
    SPAWN = "spawn"  # its processes are started
    HEALTHY = "healthy"  # its /health answered 200
    EXIT = "exit"  # its API server exited, or an engine process of it died
    RESTART = "restart"  # a restart attempt begins: what is left of it is stopped
    GIVE_UP = "give_up"  # no more restarts: it is failed for good
    STOP = "stop"  # the service stops it


_S, _E = ServerState, ServerEvent

LIFECYCLE: Mapping[tuple[ServerState, ServerEvent], ServerState] = {
    (_S.WAITING, _E.SPAWN): _S.STARTING,
    (_S.RESTARTING, _E.SPAWN): _S.STARTING,
    (_S.STARTING, _E.HEALTHY): _S.READY,
    (_S.STARTING, _E.EXIT): _S.EXITED,
    (_S.READY, _E.EXIT): _S.EXITED,
    # a death; a stall (ready, or still starting); an attempt that was not healthy in time
    **{(s, _E.RESTART): _S.RESTARTING for s in (_S.STARTING, _S.READY, _S.EXITED)},
    **{(s, _E.GIVE_UP): _S.FAILED for s in (_S.STARTING, _S.READY, _S.EXITED)},
    **{(s, _E.STOP): _S.STOPPED for s in _S if s is not _S.STOPPED},
}

COMING_BACK = frozenset({_S.WAITING, _S.STARTING, _S.EXITED, _S.RESTARTING})
"""States of a server on its way to ``ready`` without anyone asking (a router may wait)."""


class IllegalTransition(RuntimeError):
    """An event that :data:`LIFECYCLE` does not allow in the server's current state."""

    def __init__(self, server: str, state: str, event: str) -> None:
        self.server, self.state, self.event = server, str(state), str(event)
        super().__init__(
            f"server {server}: event {self.event!r} is not allowed in state {self.state!r}"
        )


def apply(server: str, state: ServerState | str, event: ServerEvent) -> ServerState:
    """The state ``event`` moves server ``server`` to from ``state``; raises
    :class:`IllegalTransition` if the table does not allow it."""
    new = LIFECYCLE.get((ServerState(state), event))
    if new is None:
        raise IllegalTransition(server, state, event)
    return new
