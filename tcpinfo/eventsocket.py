"""The event socket: Open/Close lines for traceroute-caller, uuid-annotator and packet-headers.

Those consumers speak upstream's protocol (UPSTREAM.md section 8), so every line is
byte-compatible with it: `{"Event":0|1,"Timestamp":…,"UUID":…,"ID":{…}|null}` plus
a newline, with upstream's SockID (Go address strings, `Interface` decoded
big-endian, `Cookie` signed) and real, un-anonymized addresses.

Where upstream lets one stuck client stall the whole collector (a blocking write
under a global mutex behind a 100-event channel), here the collector only appends
to per-client bounded queues; one writer thread per client does the blocking.  A
client whose queue overflows is disconnected and its lost events counted, while
the collector and the other clients go on.  Each client sees a Close only after
the matching Open: a client that connects while a flow is open never gets that
flow's Close, unless replay is on, in which case it first receives an Open for
every open flow.
"""
from __future__ import annotations

import logging
import os
import socket
import stat
import struct
import threading
import time
from collections import deque

from tcpinfo import metrics
from tcpinfo.inetdiag import IDM_LEN, ip_string
from tcpinfo.record import go_json, format_time

log = logging.getLogger(__name__)

OPEN, CLOSE = 0, 1
_DRAIN_SECONDS = 1.0
"""How long close() lets clients read what is queued (final Closes) before cutting them off."""

_OPENS = metrics.FLOW_EVENTS.labels(event="open")
_CLOSES = metrics.FLOW_EVENTS.labels(event="close")


def sockid(raw_idm: bytes) -> dict:
    """Upstream's SockID of a raw inet_diag_msg, field order and quirks included.

    Interface is read big-endian and the cookie as a signed int64, as upstream
    does (UPSTREAM.md 6.1, 8); consumers compare these values with what upstream sent.
    """
    family = raw_idm[0]
    sport, dport = struct.unpack_from(">HH", raw_idm, 4)
    (interface,) = struct.unpack_from(">I", raw_idm, 40)
    (cookie,) = struct.unpack_from("<q", raw_idm, 44)
    return {"SPort": sport, "DPort": dport,
            "SrcIP": ip_string(raw_idm[8:24], family), "DstIP": ip_string(raw_idm[24:40], family),
            "Interface": interface, "Cookie": cookie}


def open_line(ts_ns: int, uuid: str, raw_idm: bytes) -> bytes:
    """The Open line upstream writes for this flow."""
    return go_json({"Event": OPEN, "Timestamp": format_time(ts_ns), "UUID": uuid,
                     "ID": sockid(raw_idm)}) + b"\n"


def close_line(ts_ns: int, uuid: str) -> bytes:
    """The Close line upstream writes for this flow (`ID` is always null)."""
    return go_json({"Event": CLOSE, "Timestamp": format_time(ts_ns), "UUID": uuid,
                     "ID": None}) + b"\n"


class _Client:
    """One connected reader: its socket, its bounded queue and what it may be told."""

    def __init__(self, sock: socket.socket, cond: threading.Condition, opened_after: int,
                 replay: list[tuple[int, str, bytes]]) -> None:
        self.sock = sock
        self.cond = cond
        self.queue: deque[bytes] = deque()
        # Flows whose Open sequence number is above this were (or will be) sent to the client.
        self.opened_after = opened_after
        self.replay = replay
        self.connected = True


class EventServer:
    """Serves flow events on a Unix stream socket without ever blocking the collector.

    `start()` before the first poll, so consumers that start early find the socket.
    `flow_created`/`flow_deleted` are called from the collector's thread; all methods
    are thread-safe.
    """

    def __init__(self, path: str, mode: int = 0o666, queue_limit: int = 10000,
                 replay: bool = False) -> None:
        if queue_limit < 1:
            raise ValueError(f"event queue limit must be at least 1, not {queue_limit}")
        self.path = path
        self.mode = mode
        self.queue_limit = queue_limit
        self.replay = replay
        self._lock = threading.Lock()
        self._clients: set[_Client] = set()
        self._writers: list[threading.Thread] = []
        # uuid -> (Open sequence number, Open timestamp, raw IDM): what replay sends and
        # what decides which clients may see a Close.
        self._open: dict[str, tuple[int, int, bytes]] = {}
        self._seq = 0
        self._closing = False
        self._listener: socket.socket | None = None
        self._inode = 0
        self._acceptor: threading.Thread | None = None

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
        _remove_stale_socket(self.path)
        listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            listener.bind(self.path)
            # Before listen(): nobody can connect while the mode is still the umask's.
            os.chmod(self.path, self.mode)
            listener.listen(64)
        except OSError:
            listener.close()
            raise
        self._inode = os.stat(self.path).st_ino
        self._listener = listener
        self._acceptor = threading.Thread(target=self._accept_loop, name="eventsocket-accept",
                                          daemon=True)
        self._acceptor.start()
        log.info("serving flow events on %s (mode %o, replay %s)", self.path, self.mode,
                 "on" if self.replay else "off")

    def flow_created(self, ts_ns: int, uuid: str, raw_idm: bytes) -> None:
        """Queues an Open for every connected client; never blocks on a client."""
        idm = bytes(raw_idm[:IDM_LEN])
        with self._lock:
            self._seq += 1
            self._open[uuid] = (self._seq, ts_ns, idm)
            if self._clients:
                line = open_line(ts_ns, uuid, idm)
                for client in list(self._clients):
                    self._enqueue(client, line)
        _OPENS.inc()

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
        _CLOSES.inc()

    def close(self) -> None:
        """Stops accepting, lets clients drain briefly, disconnects them and removes the socket.

        The socket file is removed only if it is still ours, so a collector that
        replaced it in the meantime keeps its socket.
        """
        with self._lock:
            if self._closing:
                return
            self._closing = True
            for client in self._clients:
                client.cond.notify()
            writers = list(self._writers)
        if self._listener is not None:
            _shutdown(self._listener)
            self._acceptor.join()
            self._listener.close()
            try:
                if os.stat(self.path).st_ino == self._inode:
                    os.unlink(self.path)
            except FileNotFoundError:
                pass
        deadline = time.monotonic() + _DRAIN_SECONDS
        for writer in writers:
            writer.join(max(0.0, deadline - time.monotonic()))
        with self._lock:
            for client in list(self._clients):
                self._disconnect(client)
        for writer in writers:
            writer.join()

    # --- internals; the caller holds self._lock where noted ---

    def _accept_loop(self) -> None:
        while True:
            try:
                sock, _ = self._listener.accept()
            except OSError as err:
                if self._closing:
                    return
                # E.g. out of file descriptors: keep serving the clients we have and retry.
                log.warning("cannot accept event client on %s: %s", self.path, err)
                time.sleep(0.1)
                continue
            with self._lock:
                if self._closing:
                    sock.close()
                    return
                replay = []
                if self.replay:
                    replay = [(ts, uuid, idm) for uuid, (_, ts, idm) in self._open.items()]
                client = _Client(sock, threading.Condition(self._lock),
                                 0 if self.replay else self._seq, replay)
                self._clients.add(client)
                writer = threading.Thread(target=self._write_loop, args=(client,),
                                          name="eventsocket-writer", daemon=True)
                self._writers = [w for w in self._writers if w.is_alive()]
                self._writers.append(writer)
            metrics.EVENT_CLIENTS.inc()
            log.info("event client connected (%d replayed Opens)", len(replay))
            writer.start()

    def _write_loop(self, client: _Client) -> None:
        """Sends the client its replay, then its queue, until it is disconnected or we close."""
        try:
            while client.replay:
                batch, client.replay = client.replay[:256], client.replay[256:]
                client.sock.sendall(b"".join(open_line(*item) for item in batch))
            while True:
                with client.cond:
                    while client.connected and not client.queue and not self._closing:
                        client.cond.wait()
                    if not client.connected or not client.queue:
                        break
                    batch = list(client.queue)
                    client.queue.clear()
                client.sock.sendall(b"".join(batch))
        except OSError as err:
            log.info("event client went away: %s", err)
        with self._lock:
            if client.connected:
                self._disconnect(client)
        client.sock.close()

    def _enqueue(self, client: _Client, line: bytes) -> None:
        """(lock held) Queues a line, or disconnects a client that has stopped reading."""
        if len(client.queue) < self.queue_limit:
            client.queue.append(line)
            client.cond.notify()
            return
        lost = len(client.queue) + 1
        metrics.EVENT_DROPS.inc(lost)
        metrics.EVENT_DISCONNECTS.inc()
        log.warning("event client stopped reading (%d events queued): disconnecting it, "
                    "%d events lost", self.queue_limit, lost)
        client.queue.clear()
        self._disconnect(client)

    def _disconnect(self, client: _Client) -> None:
        """(lock held) Forgets a client and wakes its writer, even one blocked in send."""
        client.connected = False
        self._clients.discard(client)
        metrics.EVENT_CLIENTS.dec()
        _shutdown(client.sock)
        client.cond.notify()


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


def _shutdown(sock: socket.socket) -> None:
    """Wakes any thread blocked on the socket; the socket may already be dead."""
    try:
        sock.shutdown(socket.SHUT_RDWR)
    except OSError:
        pass


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
