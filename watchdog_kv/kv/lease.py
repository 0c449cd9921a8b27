"""The lease check: a decode asks the prefill whether the KV it read can be trusted.

The prefill's worker runs a :class:`LeaseServer` (a ZeroMQ REP socket on its own
thread) that answers from its :class:`~watchdog_kv.kv.states.LeaseTable`: the
read is *valid* if the blocks are still kept, or were released because a
decode reported its read; it is *stale* if the lease ran out first (the blocks
may since hold another request's KV) and *unknown* if this prefill never
leased them. The prefill advertises the server's address in the
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
from concurrent.futures import Future, ThreadPoolExecutor

import zmq

from watchdog_kv.kv.states import LeaseTable, Verdict
from watchdog_kv.telemetry import get_logger

__all__ = ["LEASE_PARAM", "LeaseClient", "LeaseServer"]

LEASE_PARAM = "watchdog_kv_lease"

_log = get_logger("watchdog_kv.kv.lease")


class LeaseServer:
    """Answers ``{"req": id}`` with ``{"verdict": "valid"|"stale"|"unknown"}``."""

    def __init__(self, table: LeaseTable, host: str) -> None:
        self._table = table
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.REP)
        self._sock.setsockopt(zmq.LINGER, 0)
        port = self._sock.bind_to_random_port(f"tcp://{host}")
        self.endpoint = f"tcp://{host}:{port}"
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._serve, name="watchdog_kv-lease", daemon=True)
        self._thread.start()

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
            try:
                req = json.loads(raw)["req"]
                verdict = self._table.verdict(str(req)).value
            except (ValueError, KeyError, TypeError):
                verdict = "bad_request"
            try:
                self._sock.send(json.dumps({"verdict": verdict}).encode())
            except zmq.ZMQError:
                _log.exception("kv.lease_server_error")

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        self._sock.close(linger=0)


class LeaseClient:
    """Asks a prefill's lease server, off the engine's thread; answers arrive as futures."""

    def __init__(self) -> None:
        self._ctx = zmq.Context.instance()
        self._pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="watchdog_kv-lease")

    def check(self, endpoint: str, req_id: str, timeout_s: float) -> Future[Verdict]:
        return self._pool.submit(self._ask, endpoint, req_id, timeout_s)

    def _ask(self, endpoint: str, req_id: str, timeout_s: float) -> Verdict:
        sock = self._ctx.socket(zmq.REQ)
        sock.setsockopt(zmq.LINGER, 0)
        sock.setsockopt(zmq.RCVTIMEO, max(1, int(timeout_s * 1000)))
        sock.setsockopt(zmq.SNDTIMEO, max(1, int(timeout_s * 1000)))
        try:
            sock.connect(endpoint)
            sock.send(json.dumps({"req": req_id}).encode())
            answer = json.loads(sock.recv())["verdict"]
            return Verdict(answer) if answer in Verdict.__members__.values() else Verdict.UNKNOWN
        except zmq.Again:
            raise TimeoutError(
                f"lease server {endpoint} did not answer in {timeout_s:g} s"
            ) from None
        finally:
            sock.close(linger=0)

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)
