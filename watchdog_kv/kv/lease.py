"""The lease check: a decode asks the prefill whether the KV it read can be trusted.

The prefill's worker runs a :class:`LeaseServer` (a ZeroMQ REP socket on its own
thread) that answers from its :class:`~watchdog_kv.kv.states.LeaseTable`: the
read is *valid* if the blocks are still kept, or were released because a
decode reported its read; it is *stale* if the lease ran out first (the blocks
may since hold another request's KV) and *unknown* if this prefill never
leased them. One lease feeds one read: once a decode was told *valid*, any
later asker for the same request (replayed ``kv_transfer_params``) is told
*stale*. The prefill advertises the server's address in the
``kv_transfer_params`` it returns (key ``watchdog_kv_lease``), so the check
needs no configuration and a decode without watchdog_kv simply ignores it.

Because a lease is never renewed after release, "kept when asked, after the
read finished" implies "kept during the read". The decode asks only after its
transfer completed, and uses the KV only on *valid*; anything else -- stale,
unknown, a prefill that does not answer within the deadline -- fails closed.
"""

from __future__ import annotations

import json
import threading
import time

import zmq

from watchdog_kv import threads
from watchdog_kv.kv.states import LeaseTable, Verdict
from watchdog_kv.telemetry import get_logger

__all__ = ["LEASE_PARAM", "LeaseClient", "LeaseServer"]

LEASE_PARAM = "watchdog_kv_lease"

_log = get_logger("watchdog_kv.kv.lease")


class LeaseServer:
    """Answers ``{"req": id}`` with ``{"req": id, "verdict": "valid"|"stale"|"unknown"}``."""

    def __init__(self, table: LeaseTable, host: str) -> None:
        self._table = table
        self._ctx = threads.zmq_context()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threads.start(self._serve, "watchdog_kv-lease")

    def _serve(self) -> None:
        poller = zmq.Poller()
        poller.register(self._sock, zmq.POLLIN)
        while not self._stop.is_set():
            try:
                if not poller.poll(200):
                    continue
                raw = self._sock.recv()
            except zmq.ZMQError:
                if self._stop.is_set():
                    return
                _log.exception("kv.lease_server_error")
                continue
            req = None
            try:
                req = str(json.loads(raw)["req"])
                verdict = self._table.claim(req).value
                _log.debug("kv.lease_question", remote_request_id=req, verdict=verdict)
            except (ValueError, KeyError, TypeError):
                verdict = "bad_request"
            try:
                self._sock.send(json.dumps({"req": req, "verdict": verdict}).encode())
            except zmq.ZMQError:
                _log.exception("kv.lease_server_error")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)
        self._ctx.term()


class LeaseClient:
    """Asks lease servers from the caller's own thread, never blocking it.

    :meth:`ask` sends at once (a DEALER socket per server; ZeroMQ's I/O thread
    does the network); :meth:`answers` collects whatever has arrived. The
    worker calls both from its step, so the check needs no Python thread of its
    own -- a helper thread would have to win the GIL from a busy engine loop to
    deliver an answer (measured here: answers delayed by up to 10 s that way).
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
            sock.send_multipart([b"", json.dumps({"req": req_id}).encode()], flags=zmq.NOBLOCK)
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
                try:
                    msg = json.loads(frames[-1])
                    req, verdict = str(msg["req"]), msg["verdict"]
                except (ValueError, KeyError, TypeError):
                    continue
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
