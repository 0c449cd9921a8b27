"""The lease check: a decode asks the prefill whether the KV it read can be trusted.

The prefill's worker runs a :class:`LeaseServer` (a ZeroMQ ROUTER socket) that
answers from its :class:`~watchdog_kv.kv.states.LeaseTable`: the
read is *valid* if the blocks are still kept, or were released because a
decode reported its read; it is *stale* if the lease ran out first (the blocks
may since hold another request's KV) and *unknown* if this prefill never
leased them. One lease feeds one read: once a decode was told *valid*, any
later asker for the same request (replayed ``kv_transfer_params``) is told
*stale*. The prefill advertises the server's address in the
``kv_transfer_params`` it returns (key ``watchdog_kv_lease``), so the check
needs no configuration and a decode without watchdog_kv simply ignores it.

Questions are answered from two places: the prefill worker's step, which
answers whatever has arrived each time it runs, and the server's own thread,
which sleeps in ``poll`` and answers as soon as a question arrives. Whichever
comes first answers. The thread needs the GIL for every question, and a worker
busy with its own steps on a loaded machine can keep it from the thread for
longer than a decode's deadline; the step holds the GIL already. The thread
does not wait for the step either: a decode asks right after its read, which is
when the prefill's steps for that request have just stopped, so a thread that
deferred to the step would add its delay to most checks (both measured:
docs/kv-transfer.md, "Measured here").

Because a lease is never renewed after release, "kept when asked, after the
read finished" implies "kept during the read". The decode asks only after its
transfer completed, and uses the KV only on *valid*; anything else -- stale,
unknown, a prefill that does not answer within the deadline -- fails closed.
"""

from __future__ import annotations

import select
import threading
import time

import zmq

from watchdog_kv import threads, wire
from watchdog_kv.guard import contained
from watchdog_kv.kv.states import LeaseTable, Verdict
from watchdog_kv.telemetry import get_logger

__all__ = ["LeaseClient", "LeaseServer"]

_log = get_logger("watchdog_kv.kv.lease")


class LeaseServer:
    """Answers ``{"req": id}`` with ``{"req": id, "verdict": "valid"|"stale"|"unknown"}``.

    The worker's step calls :meth:`answer_pending`; the server's thread answers
    whenever the socket has news. ZeroMQ sockets are not thread-safe: one lock
    keeps the socket to one thread at a time, and the step never waits for it.
    ``serve_in_thread=False`` leaves all answering to the step (tests).
    """

    def __init__(self, table: LeaseTable, host: str, *, serve_in_thread: bool = True) -> None:
        self._table = table
        self._lock = threading.Lock()
        self._closed = False
        self._ctx = threads.zmq_context()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)  # a reply that cannot go raises
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self.answered = {"step": 0, "thread": 0}
        self._stop = threading.Event()
        self._thread = threads.start(self._serve, "watchdog_kv-lease") if serve_in_thread else None

    def answer_pending(self) -> int:
        """From the step: answer every question that has arrived; how many.

        Returns 0 at once, without waiting, while the thread is answering.
        """
        if not self._lock.acquire(blocking=False):
            return 0
        try:
            return self._drain("step")
        finally:
            self._lock.release()

    def _drain(self, by: str) -> int:  # caller holds the lock
        if self._closed:
            return 0
        answered = 0
        try:
            # Reading EVENTS takes in ZeroMQ's pending commands and clears the FD:
            # drain until it says nothing is readable, so no arrival is left
            # behind a cleared FD.
            while self._sock.getsockopt(zmq.EVENTS) & zmq.POLLIN:
                try:
                    frames = self._sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                self._answer(frames, by)
                answered += 1
        finally:
            self.answered[by] += answered
        return answered

    def _answer(self, frames: list[bytes], by: str) -> None:
        # ROUTER frames: [peer identity, b"" (the DEALER's envelope), question].
        req = wire.read_question(frames[-1])
        if req is None:  # anything that is not a question, however malformed
            verdict = "bad_request"
        else:
            verdict = self._table.claim(req).value
            _log.debug("kv.lease_question", remote_request_id=req, verdict=verdict, by=by)
        reply = wire.lease_answer(req, verdict)
        try:
            self._sock.send_multipart([*frames[:-1], reply], flags=zmq.NOBLOCK)
        except zmq.ZMQError:  # the asker is gone or its queue is full: it times out
            _log.warning("kv.lease_answer_dropped", remote_request_id=req)

    def _serve(self) -> None:
        # A failure of ours is logged and ends the thread; the step keeps answering.
        with contained("kv.lease_server", on_error=self._stop.set):
            with self._lock:
                if self._closed:
                    return
                fd = self._sock.getsockopt(zmq.FD)
            waiter = select.poll()  # not select(): a worker's FDs may number over 1024
            waiter.register(fd, select.POLLIN)
            while not self._stop.is_set():
                # The FD says the socket may have news (edge-triggered, and the
                # step may take the news first); the timeout bounds a missed edge.
                waiter.poll(200)
                with self._lock:
                    self._drain("thread")

    def close(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=2)
        with self._lock:
            self._closed = True
            self._sock.close(linger=0)
        self._ctx.term()


class LeaseClient:
    """Asks lease servers from the caller's own thread, never blocking it.

    :meth:`ask` sends at once (a DEALER socket per server; ZeroMQ's I/O thread
    does the network); :meth:`answers` collects whatever has arrived. The
    worker calls both from its step, so the check needs no Python thread of its
    own -- a helper thread would have to win the GIL from a busy engine loop to
    deliver an answer.
    A server that never answers is the caller's deadline to handle.
    """

    def __init__(self) -> None:
        self._ctx = threads.zmq_context()
        self._socks: dict[str, zmq.Socket[bytes]] = {}

    def ask(self, endpoint: str, req_id: str) -> bool:
        """Send the question; False if it could not even be queued (treat as no answer)."""
        sock = self._socks.get(endpoint)
        if sock is None:
            sock = self._ctx.socket(zmq.DEALER)
            sock.setsockopt(zmq.LINGER, 0)
            sock.setsockopt(zmq.SNDHWM, 10000)
            sock.connect(endpoint)
            self._socks[endpoint] = sock
        try:
            sock.send_multipart([b"", wire.lease_question(req_id)], flags=zmq.NOBLOCK)
        except zmq.ZMQError:
            return False
        return True

    def answers(self) -> dict[str, Verdict]:
        """Every answer that has arrived since the last call, by request id."""
        out: dict[str, Verdict] = {}
        for sock in self._socks.values():
            while True:
                try:
                    frames = sock.recv_multipart(flags=zmq.NOBLOCK)
                except zmq.Again:
                    break
                got = wire.read_answer(frames[-1])
                if got is None:
                    continue
                req, verdict = got
                values = {v.value for v in Verdict}
                out[req] = Verdict(verdict) if verdict in values else Verdict.UNKNOWN
        return out

    def wait(self, endpoint: str, req_id: str, timeout_s: float) -> Verdict:
        """Blocking form of ask + answers, for tools and tests."""
        deadline = time.monotonic() + timeout_s
        if self.ask(endpoint, req_id):
            while time.monotonic() < deadline:
                got = self.answers().get(req_id)
                if got is not None:
                    return got
                time.sleep(0.005)
        raise TimeoutError(f"lease server {endpoint} did not answer in {timeout_s:g} s")

    def close(self) -> None:
        for sock in self._socks.values():
            sock.close(linger=0)
        self._socks.clear()
        self._ctx.term()
