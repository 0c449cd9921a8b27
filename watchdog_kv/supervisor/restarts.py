"""The restart policy: when a server is restarted again, and when it is given up on.

A server's restarts form a *row*: every restart attempt counts, whether it
failed during start-up or the server died again before it had been ready for
:data:`STABLE_S`; a server ready that long starts a new row. Restart ``n`` of a
row waits ``WATCHDOG_KV_RESTART_BACKOFF * 2 ** (n - 2)`` seconds first, at most
:data:`BACKOFF_CAP_S` (the first restart of a row does not wait), and after
``WATCHDOG_KV_RESTART_LIMIT`` restarts in a row the server is given up on.

Both numbers are tenacity's: :class:`RestartPolicy` holds a ``wait_exponential``
and a ``stop_after_attempt``, applied to the row's count of restarts rather than
to one call's attempts, and tenacity does every wait -- including the one
before the first attempt of a call that continues a row (the server's last
restart did not last: that counts as a failed attempt of the row).
"""

from __future__ import annotations

import copy
import time
from collections.abc import AsyncIterator, Callable

from tenacity import (
    AsyncRetrying,
    AttemptManager,
    RetryCallState,
    Retrying,
    retry_if_exception,
    stop_after_attempt,
    wait_exponential,
)

__all__ = ["BACKOFF_CAP_S", "STABLE_S", "RestartPolicy", "stable"]

STABLE_S = 600.0
"""Ready this long: the server's next failure starts a new row (of restarts, and of crashes)."""

BACKOFF_CAP_S = 60.0
"""The longest wait before a restart, seconds."""


def stable(ready_since: float | None) -> bool:
    """Ready (since the monotonic time ``ready_since``) for at least :data:`STABLE_S`."""
    return ready_since is not None and time.monotonic() - ready_since >= STABLE_S


class _DidNotLast(Exception):
    """The row's last restart did not last: the server died before it was stable."""


class RestartPolicy:
    """``WATCHDOG_KV_RESTART_BACKOFF`` and ``WATCHDOG_KV_RESTART_LIMIT`` as tenacity's
    wait and stop, counted over a row of restarts."""

    def __init__(self, backoff_s: float, limit: int) -> None:
        self.limit = limit
        self.wait = wait_exponential(multiplier=backoff_s, max=BACKOFF_CAP_S)
        self.stop = stop_after_attempt(limit)

    def exhausted(self, in_a_row: int) -> bool:
        """``in_a_row`` restarts already: no further one is allowed."""
        return bool(self.stop(_row_state(RetryCallState(Retrying(), None, (), {}), in_a_row)))

    def backoff(self, in_a_row: int) -> float:
        """The wait before the restart that follows ``in_a_row`` restarts, seconds."""
        if in_a_row <= 0:
            return 0.0
        return float(self.wait(_row_state(RetryCallState(Retrying(), None, (), {}), in_a_row)))

    async def attempts(
        self,
        in_a_row: Callable[[], int],
        *,
        retry: Callable[[BaseException], bool],
        before_sleep: Callable[[RetryCallState], None],
    ) -> AsyncIterator[AttemptManager]:
        """Tenacity's attempts at restarting one server, for ``async for``.

        ``in_a_row()`` is the server's count of restarts in the row so far (each
        attempt adds one); a failed attempt whose error ``retry`` accepts is
        retried after :meth:`backoff` unless the row is :meth:`exhausted`, and the
        last error is raised. Called with a row under way, the first attempt
        comes after the row's wait too. ``before_sleep`` sees each failed attempt.
        """
        resumed = in_a_row() > 0
        retrying = AsyncRetrying(
            wait=lambda state: self.wait(_row_state(state, in_a_row())),
            stop=lambda state: self.stop(_row_state(state, in_a_row())),
            retry=retry_if_exception(lambda exc: isinstance(exc, _DidNotLast) or retry(exc)),
            before_sleep=lambda state: _unless_did_not_last(state, before_sleep),
            reraise=True,
        )
        async for attempt in retrying:
            if resumed:
                resumed = False
                with attempt:
                    raise _DidNotLast
                continue
            yield attempt


def _row_state(state: RetryCallState, in_a_row: int) -> RetryCallState:
    """``state`` with the row's count as its attempt number: what wait and stop read."""
    row = copy.copy(state)
    row.attempt_number = in_a_row
    return row


def _unless_did_not_last(
    state: RetryCallState, before_sleep: Callable[[RetryCallState], None]
) -> None:
    error = state.outcome.exception() if state.outcome is not None else None
    if not isinstance(error, _DidNotLast):
        before_sleep(state)
