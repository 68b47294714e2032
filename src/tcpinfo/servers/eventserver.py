"""The event socket server: Open/Close lines for traceroute-caller, uuid-annotator and packet-headers.

Those consumers speak upstream's protocol (UPSTREAM.md section 8); the lines are
`tcpinfo.events.line`'s, which the client library reads.

Where upstream lets one stuck client stall the whole collector (a blocking write
under a global mutex behind a 100-event channel), here the collector only appends
to per-client bounded queues, and one thread (a `selectloop.Loop`) writes to every
client without ever blocking.  A client whose queue overflows is disconnected and
its lost events counted, while the collector and the other clients go on.  Each
client sees a Close only after the matching Open: a client that connects while a
flow is open never gets that flow's Close, unless replay is on, in which case it
first receives an Open for every open flow.

The socket is mode 0666 by default, as upstream's consumers expect, so any local
user can connect: at most `max_clients` are served, one more is closed at once
(counted, logged once a minute), and a client costs a socket and references to at
most BATCH lines being sent (shared with the other clients), never a thread.  The protocol is one-way: what a client
sends is read and dropped, and its EOF means it is gone, so its socket is closed
at once rather than at the next event.
"""
from __future__ import annotations

import functools
import logging
import os
import selectors
import socket
import stat
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass

from prometheus_client import Counter, Gauge

from tcpinfo.base.ratelog import RateLimitedLog
from tcpinfo.events.line import close_line, open_line
from tcpinfo.kernel.inetdiag import IDM_LEN
from tcpinfo.servers.selectloop import Acceptor, Loop, consume, fd_share

log = logging.getLogger(__name__)

OPEN, CLOSE = 0, 1
_DRAIN_SECONDS = 1.0
"""How long close() lets clients read what is queued (final Closes) before cutting them off."""
BATCH = 1024
"""Most lines handed to one sendmsg() (IOV_MAX): a client's write buffer, by reference.
Replayed Opens are formatted this many at a time, so a replay of 100,000 flows is built as it
is sent."""
_READ, _WRITE = selectors.EVENT_READ, selectors.EVENT_READ | selectors.EVENT_WRITE

SOCKET_MODE = 0o666
"""Permissions of the socket file, by default: upstream's consumers run as other users."""
QUEUE_LIMIT = 10000
"""Events queued per client, by default, before a client that stopped reading is disconnected."""
MAX_CLIENTS = 100
"""Clients served at once, by default."""


@dataclass(frozen=True)
class EventCounters:
    """Where the server counts what it does: series its owner keeps in its own registry."""
    flow_events: Counter   # events sent, label `event` (open, close)
    clients: Gauge         # clients connected
    drops: Counter         # events lost by clients that stopped reading
    disconnects: Counter   # clients disconnected for it
    refused: Counter       # clients closed at once beyond the cap
    accept_errors: Counter  # failed accept() calls, label `error` (errno name)


class _Client:
    """One connected reader: its socket, its bounded queue and what it may be told.

    The collector appends to `queue` under the server's lock; the loop thread swaps the queue
    out into `taken` and moves at most BATCH lines of it into `out`, the lines being sent.
    """

    __slots__ = ("sock", "queue", "taken", "out", "opened_after", "replay", "replayed",
                 "connected", "handler")

    def __init__(self, sock: socket.socket, opened_after: int,
                 replay: list[tuple[int, int, str, bytes]]) -> None:
        self.sock = sock
        self.queue: deque[bytes] = deque()
        self.taken: deque[bytes] = deque()
        self.out: list[bytes | memoryview] = []
        # Flows whose Open sequence number is above this were (or will be) sent to the client.
        self.opened_after = opened_after
        self.replay = replay
        self.replayed = 0
        self.connected = True
        self.handler: Callable[[int], None]   # set by the server once the client is admitted

    def idle(self) -> bool:
        """Nothing left to send."""
        return not (self.out or self.taken or self.queue or self.replay)


class EventServer:
    """Serves flow events on a Unix stream socket without ever blocking the collector.

    `start()` before the first poll, so consumers that start early find the socket.
    `flow_created`/`flow_deleted` are called from the collector's thread and only append
    to queues; all methods are thread-safe.
    """

    def __init__(self, path: str, counters: EventCounters, mode: int = SOCKET_MODE,
                 queue_limit: int = QUEUE_LIMIT, replay: bool = False,
                 max_clients: int = MAX_CLIENTS) -> None:
        if queue_limit < 1:
            raise ValueError(f"event queue limit must be at least 1, not {queue_limit}")
        if max_clients < 1:
            raise ValueError(f"event client limit must be at least 1, not {max_clients}")
        self.path = path
        self._counters = counters
        self._opens = counters.flow_events.labels(event="open")
        self._closes = counters.flow_events.labels(event="close")
        self.mode = mode
        self.queue_limit = queue_limit
        self.replay = replay
        self.max_clients = max_clients
        self._lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._ready: set[_Client] = set()     # given lines since the loop last looked
        self._doomed: list[_Client] = []      # disconnected by the collector; the loop closes them
        # uuid -> (Open sequence number, Open timestamp, uuid, raw IDM): what replay sends and
        # what decides which clients may see a Close.
        self._open: dict[str, tuple[int, int, str, bytes]] = {}
        self._seq = 0
        self._closing = False
        self._loop: Loop | None = None
        self._acceptor: Acceptor | None = None
        self._inode = 0
        self._draining = False
        self._finished = False
        self._log = RateLimitedLog(log)

    @property
    def _serving(self) -> Loop:
        """The loop thread's loop: made by start(), before any client or event can need it."""
        assert self._loop is not None, "EventServer.start() was not called"
        return self._loop

    @property
    def _accepting(self) -> Acceptor:
        assert self._acceptor is not None, "EventServer.start() was not called"
        return self._acceptor

    @property
    def client_count(self) -> int:
        """Clients currently connected."""
        with self._lock:
            return len(self._clients)

    def start(self) -> None:
        """Creates the socket (replacing a stale one) and serves clients from a background thread.

        Upstream removes whatever is at the path; a regular file or directory there is
        more likely a mistyped flag than a leftover, so it is refused and left alone.  A
        socket that still accepts connections belongs to a running collector and is
        refused too.
        """
        self.max_clients = fd_share(self.max_clients, f"event socket {self.path}")
        _remove_stale_socket(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            self._inode = os.stat(self.path).st_ino
            # Before listen(): nobody can connect while the mode is still the umask's.
            os.chmod(self.path, self.mode)
            listener.listen(128)
            self._loop = Loop("eventsocket", self._woken)
            self._acceptor = Acceptor(self._loop, listener, self._admit,
                                      self._counters.accept_errors, f"event socket {self.path}")
            self._loop.start()
        except OSError:
            self._loop = None
            listener.close()
            self._remove_socket_file()
            raise
        log.info("serving flow events on %s (mode %o, replay %s, at most %d clients)", self.path,
                 self.mode, "on" if self.replay else "off", self.max_clients)

    def flow_created(self, ts_ns: int, uuid: str, raw_idm: bytes) -> None:
        """Queues an Open for every connected client; never blocks on a client."""
        idm = bytes(raw_idm[:IDM_LEN])
        with self._lock:
            self._seq += 1
            self._open[uuid] = (self._seq, ts_ns, uuid, idm)
            if self._clients:
                line = open_line(ts_ns, uuid, idm)
                for client in list(self._clients):
                    self._enqueue(client, line)
        self._opens.inc()
        if self._ready or self._doomed:
            self._serving.wake()

    def flow_deleted(self, ts_ns: int, uuid: str) -> None:
        """Queues a Close for the clients that were sent this flow's Open; never blocks.

        A flow never opened (upstream's cookie-0 case) produces no event at all.
        """
        with self._lock:
            opened = self._open.pop(uuid, None)
            if opened is None:
                return
            targets = [c for c in self._clients if c.opened_after < opened[0]]
            if targets:
                line = close_line(ts_ns, uuid)
                for client in targets:
                    self._enqueue(client, line)
        self._closes.inc()
        if self._ready or self._doomed:
            self._serving.wake()

    def close(self) -> None:
        """Stops accepting, lets clients drain briefly, disconnects them and removes the socket.

        The socket file is removed only if it is still ours, so a collector that
        replaced it in the meantime keeps its socket.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
        if self._loop is None:
            return
        self._loop.wake()
        self._loop.join()
        self._remove_socket_file()

    # --- the collector's side; the caller holds self._lock ---

    def _enqueue(self, client: _Client, line: bytes) -> None:
        """Queues a line, or disconnects a client that has stopped reading."""
        if len(client.queue) < self.queue_limit:
            if not client.queue:
                self._ready.add(client)
            client.queue.append(line)
            return
        lost = len(client.queue) + len(client.taken) + 1
        self._counters.drops.inc(lost)
        self._counters.disconnects.inc()
        log.warning("event client stopped reading (%d events queued): disconnecting it, "
                    "%d events lost", self.queue_limit, lost)
        client.queue.clear()
        self._forget(client)
        self._doomed.append(client)

    def _forget(self, client: _Client) -> None:
        """Takes a client off the lists; the loop thread closes its socket."""
        client.connected = False
        self._clients.discard(client)
        self._ready.discard(client)
        self._counters.clients.dec()

    # --- the loop thread's side ---

    def _admit(self, sock: socket.socket) -> None:
        """A new connection: a client with its replay, or refused at once beyond the cap."""
        with self._lock:
            connected, closing = len(self._clients), self._closing
            client = None
            if connected < self.max_clients and not closing:
                replay = list(self._open.values()) if self.replay else []
                client = _Client(sock, 0 if self.replay else self._seq, replay)
                self._clients.add(client)
                self._counters.clients.inc()
        if closing:
            sock.close()   # accepted in the turn close() was called: shutting down, not refused
            return
        if client is None:
            self._counters.refused.inc()   # before the client sees EOF
            sock.close()
            self._log(logging.WARNING, "refused", "event socket %s: refused a client, %d are "
                      "connected (-tcpinfo.eventsocket-max-clients)", self.path, connected)
            return
        self._log(logging.INFO, "connected", "event client connected (%d replayed Opens)",
                  len(client.replay))
        client.handler = functools.partial(self._serve, client)
        self._serving.watch(sock, _WRITE if client.replay else _READ, client.handler)

    def _serve(self, client: _Client, events: int) -> None:
        if events & selectors.EVENT_READ:
            try:
                gone = not client.sock.recv(4096)   # what a client sends is dropped
            except BlockingIOError:
                gone = False
            except OSError:
                gone = True
            if gone:
                self._hang_up(client)
                return
        if events & selectors.EVENT_WRITE:
            self._flush(client)

    def _flush(self, client: _Client) -> None:
        """Sends what the client is owed until its socket is full or 4 batches went (fairness)."""
        for _ in range(4):
            if not client.out:
                client.out = self._next_lines(client)
                if not client.out:
                    self._serving.watch(client.sock, _READ, client.handler)
                    if self._draining:
                        self._finish_if_drained()
                    return
            try:
                sent = client.sock.sendmsg(client.out)
            except BlockingIOError:
                self._serving.watch(client.sock, _WRITE, client.handler)
                return
            except OSError:
                self._hang_up(client)
                return
            consume(client.out, sent)
        self._serving.watch(client.sock, _WRITE, client.handler)

    def _next_lines(self, client: _Client) -> list[bytes | memoryview]:
        """The next lines owed, at most BATCH: replayed Opens first, then queued lines."""
        if client.replay:
            batch = client.replay[client.replayed:client.replayed + BATCH]
            client.replayed += len(batch)
            if client.replayed == len(client.replay):
                client.replay, client.replayed = [], 0
            return [open_line(ts, uuid, idm) for _, ts, uuid, idm in batch]
        taken = client.taken
        if not taken:
            with self._lock:   # O(1): the loop takes the whole queue, the collector gets a new one
                client.taken, client.queue = client.queue, taken
            taken = client.taken
        return [taken.popleft() for _ in range(min(BATCH, len(taken)))]

    def _hang_up(self, client: _Client) -> None:
        """The client closed its end (EOF) or its socket failed: forget and close it now."""
        with self._lock:
            if client.connected:
                self._forget(client)
        self._log(logging.INFO, "gone", "event client went away")
        self._release(client)
        if self._draining:
            self._finish_if_drained()

    def _release(self, client: _Client) -> None:
        """Closes a forgotten client's socket and frees what it held; safe to repeat."""
        if client.sock.fileno() != -1:
            self._serving.forget(client.sock)
            client.sock.close()
        client.taken.clear()
        client.out = []
        client.replay = []

    def _woken(self) -> None:
        """The collector queued lines or disconnected clients, or close() was called."""
        with self._lock:
            ready, self._ready = self._ready, set()
            doomed, self._doomed = self._doomed, []
            closing = self._closing
        for client in doomed:
            self._release(client)
        for client in ready:
            if client.connected:
                self._flush(client)
        if closing and not self._draining:
            self._draining = True
            self._accepting.close()
            self._serving.call_at(time.monotonic() + _DRAIN_SECONDS, self._finish)
        if self._draining:
            self._finish_if_drained()

    def _finish_if_drained(self) -> None:
        with self._lock:
            drained = all(client.idle() for client in self._clients)
        if drained:
            self._finish()

    def _finish(self) -> None:
        """Draining is over (or took too long): disconnects everyone and ends the loop."""
        if self._finished:
            return
        self._finished = True
        with self._lock:
            clients = list(self._clients)
            for client in clients:
                self._forget(client)
        for client in clients:
            self._release(client)
        self._serving.stop()

    def _remove_socket_file(self) -> None:
        try:
            if os.stat(self.path).st_ino == self._inode:
                os.unlink(self.path)
        except FileNotFoundError:
            pass


class NullServer:
    """What the collector holds when no event socket was asked for: every call does nothing."""

    client_count = 0

    def start(self) -> None:
        """Nothing to create."""

    def flow_created(self, ts_ns: int, uuid: str, raw_idm: bytes) -> None:
        """No clients, no event."""

    def flow_deleted(self, ts_ns: int, uuid: str) -> None:
        """No clients, no event."""

    def close(self) -> None:
        """Nothing to remove."""


def _remove_stale_socket(path: str) -> None:
    """Removes a socket file nobody listens on; refuses anything else at the path."""
    try:
        st = os.lstat(path)
    except FileNotFoundError:
        return
    if not stat.S_ISSOCK(st.st_mode):
        raise FileExistsError(f"event socket path {path} exists and is not a socket; "
                              f"refusing to replace it (remove it or choose another path)")
    probe = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        probe.connect(path)
    except OSError:
        os.unlink(path)  # stale: left behind by a collector that is gone
    else:
        raise FileExistsError(f"event socket {path} is in use by a running process; "
                              f"refusing to take it over")
    finally:
        probe.close()
