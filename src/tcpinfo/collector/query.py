"""`GET /v1/connections/<uuid>`: one connection's latest snapshot and what it says, on request.

The question arrives on the /metrics server's thread; the answer needs what only the collector's
thread may touch (the C core's table of last snapshots, the health aggregates' per-connection
samples), so the request waits in a queue, the collector answers it between polls (it wakes for
it, so the wait is at most one poll's work), and the reply goes back to the server's thread.
Nothing is kept per open connection for this: the latest snapshot is the core's own copy; only
connections closed in the last RECENT_NS keep their final snapshot here, at most RECENT_MAX of
them.

The answer is JSON: the snapshot decoded to the modern schema's names, and derived values by
health.connection's rule (the same code as `tcpinfo summary`): RTT min/mean/max of the samples
the health aggregates took (at most one per -health.sample-interval), bytes, retransmit share,
the busy / receive-window / send-buffer shares of the time observed, and the why-slow class.
"""
from __future__ import annotations

import re
import socket
import threading
from collections import OrderedDict, deque
from collections.abc import Callable

import orjson

from tcpinfo.archive.record import format_time
from tcpinfo.collector.poller import Poller
from tcpinfo.csvtool.modern import message_fields
from tcpinfo.health.aggregate import Aggregator
from tcpinfo.health.connection import Accumulator, summarize
from tcpinfo.kernel.inetdiag import split_message

PATH = "/v1/connections/"
RECENT_NS = 300 * 1_000_000_000
"""How long a closed connection's final snapshot is kept for queries."""
RECENT_MAX = 10_000
"""Most closed connections kept for queries (the oldest go first)."""
_COOKIE = re.compile(r"[0-9A-F]{16}")
_SAMPLED = ("rtt_min_us", "rtt_max_us", "rtt_sum_us", "rtt_samples")

Reply = Callable[[int, bytes], None]
"""How an answer goes back: (HTTP status, JSON body), callable from any thread."""


class ConnectionQueries:
    """Queries waiting for the collector's thread, and the recently closed connections."""

    def __init__(self, prefix: str, poller: Poller, health: Aggregator | None) -> None:
        self._prefix = prefix
        self._poller = poller
        self._health = health
        self._pending: deque[tuple[str, Reply]] = deque()
        self._recent: OrderedDict[int, tuple[int, bytes | None, dict | None]] = OrderedDict()
        self._lock = threading.Lock()
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self.wake = self._wake_r
        """Readable while queries wait: the collector selects on it between polls."""

    # --- any thread (the /metrics server's) ---

    def ask(self, uuid: str, reply: Reply) -> None:
        """Queues a question; `reply` is called once with the answer, from the collector's thread."""
        with self._lock:
            self._pending.append((uuid, reply))
        try:
            self._wake_w.send(b"\0")
        except BlockingIOError:
            pass   # full: the collector has plenty of wake-ups to read already

    # --- the collector's thread ---

    @property
    def waiting(self) -> bool:
        return bool(self._pending)

    def answer_pending(self, now_ns: int) -> None:
        """Answers every waiting question."""
        try:
            while self._wake_r.recv(4096):
                pass
        except BlockingIOError:
            pass
        with self._lock:
            pending, self._pending = self._pending, deque()
        for uuid, reply in pending:
            status, answer = self.answer(uuid, now_ns)
            reply(status, orjson.dumps(answer, option=orjson.OPT_INDENT_2) + b"\n")

    def remember_close(self, cookie: int, final: bytes | None, ts_ns: int) -> None:
        """A connection closed: its final snapshot (and what the samples said) stays queryable;
        None when there is none (its destroy notification was lost)."""
        seen = self._health.seen(cookie) if self._health is not None else None
        recent = self._recent
        recent[cookie] = (ts_ns, final, seen)
        recent.move_to_end(cookie)
        while len(recent) > RECENT_MAX or (recent and ts_ns - next(iter(recent.values()))[0] > RECENT_NS):
            recent.popitem(last=False)

    def answer(self, uuid: str, now_ns: int) -> tuple[int, dict]:
        """(HTTP status, JSON object) for one UUID."""
        prefix, _, cookie_hex = uuid.rpartition("_")
        if prefix != self._prefix or not _COOKIE.fullmatch(cookie_hex):
            return 404, {"error": f"no connection {uuid!r} on this host (UUIDs here are "
                                  f"{self._prefix}_<16 hex digits>)"}
        cookie = int(cookie_hex, 16)
        payload = self._poller.snapshot(cookie)
        if payload is not None:
            seen = self._health.seen(cookie) if self._health is not None else None
            return 200, self._describe(uuid, "open", payload, now_ns, seen)
        closed = self._recent.get(cookie)
        if closed is not None and now_ns - closed[0] <= RECENT_NS:
            ts_ns, final, seen = closed
            if final is None:
                return 200, {"uuid": uuid, "state": "closed", "snapshot_time": format_time(ts_ns),
                             "snapshot": None, "note": "closed without a final snapshot: its "
                             "destroy notification was lost (see tcpinfo_destroy_overruns_total)"}
            return 200, self._describe(uuid, "closed", final, ts_ns, seen)
        return 404, {"error": f"connection {uuid!r} is neither open nor closed in the last "
                              f"{RECENT_NS // 1_000_000_000} s"}

    @staticmethod
    def _describe(uuid: str, state: str, payload: bytes, ts_ns: int, seen: dict | None) -> dict:
        fields = message_fields(*split_message(payload))
        acc = Accumulator()
        acc.add(ts_ns, fields)
        values = acc.values()
        if seen is not None:   # the samples' view of the connection's life so far
            if seen["rtt_samples"]:
                for name in _SAMPLED:
                    values[name] = seen[name]
            for name in ("first_ns", "busy_first_us"):
                if seen[name] is not None:
                    values[name] = seen[name]
        return {"uuid": uuid, "state": state,
                "snapshot_time": format_time(ts_ns), "snapshot": fields,
                "derived": summarize(values).as_dict(),
                "note": "derived RTT min/mean/max are of the health aggregates' samples; "
                        "shares are of the time since the collector first saw the connection"}

    def close(self) -> None:
        self._wake_r.close()
        self._wake_w.close()

