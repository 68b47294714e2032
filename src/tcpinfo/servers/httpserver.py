"""The /metrics HTTP server: one thread for any number of clients, with bounded work and memory.

prometheus_client's server starts a thread per connection, listens with a backlog of 5 and answers
200 on every path: a thousand slow clients stalled polling.  This one runs on a `selectloop.Loop`:
  * GET and HEAD of /metrics get the text exposition (format 0.0.4, what Prometheus scrapes) of the
    registry it was given, gzipped when the client accepts gzip; any other method is 405, any
    other path 404, a malformed request 400, a request header over MAX_HEADER bytes 431;
  * every response ends its connection (`Connection: close`), so a connection is one request;
  * a request header must arrive complete within `timeout` seconds of connecting (an idle or
    trickling client is dropped) and the response must be taken within `timeout` after that;
  * at most `max_connections` are open: a new one beyond them replaces the oldest one still sending
    its request, or is closed at once if every one is being answered (both counted);
  * requests waiting together share one exposition, and generating expositions takes at most a
    fifth of the time (the next starts no sooner than 4x the last one's duration after it ends), so
    scrapes cannot monopolize the GIL the poll thread needs.
A connection holds at most its request header and one response (an exposition shared with the other
connections answered with it).
"""
from __future__ import annotations

import functools
import gzip
import ipaddress
import logging
import os
import re
import selectors
import socket
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

from prometheus_client import CollectorRegistry, Counter, Gauge
from prometheus_client.exposition import choose_encoder

from tcpinfo.base.ratelog import RateLimitedLog
from tcpinfo.servers.selectloop import Acceptor, Loop, consume, fd_share

log = logging.getLogger(__name__)

BACKLOG = 1024
"""Connections the kernel queues before accept(): a burst of a thousand slow clients fits, so a
scrape that comes with them waits its turn instead of a SYN retry (Go listens with 4096)."""
MAX_HEADER = 8192
"""Most bytes of request line and headers a client may send."""
METRICS_PATH = "/metrics"
QUERY_PATH = "/v1/connections/"
MAX_UUID = 256
MAX_CONNECTIONS = 32
"""Connections open at once, by default (-prometheusx.max-connections)."""
GENERATION_SHARE = 0.2
"""Most of the time spent generating expositions (see the module docstring)."""
STATUS = {200: "OK", 400: "Bad Request", 404: "Not Found", 405: "Method Not Allowed",
          431: "Request Header Fields Too Large", 500: "Internal Server Error"}
DROP_REASONS = ("timeout", "evicted", "limit")
_HEADER_END = re.compile(rb"\r?\n\r?\n")
_TEXT = "text/plain; charset=utf-8"
_JSON = "application/json"
_PERCENT = re.compile(r"(?:[^%]|%[0-9A-Fa-f]{2})*")

Queries = Callable[[str, Callable[[int, bytes], None]], None]
"""Who answers GET /v1/connections/<uuid>: (uuid, reply(status, json body))."""


@dataclass(frozen=True)
class Counters:
    """Where the server counts what it does: series its owner keeps in its own registry."""
    connections: Gauge     # connections open
    requests: Counter      # answered requests, label `code`
    dropped: Counter       # connections closed without an answer, label `reason` (DROP_REASONS)
    accept_errors: Counter  # failed accept() calls, label `error` (errno name)


class _Conn:
    """One client connection: what it sent so far, or the response it is being sent."""

    __slots__ = ("sock", "state", "inbuf", "out", "deadline", "head_only", "gzip", "encoder",
                 "handler")

    def __init__(self, sock: socket.socket, deadline: float) -> None:
        self.sock = sock
        self.state = "reading"   # then "waiting" (an exposition) or "answering" (a query), "writing"
        self.inbuf = bytearray()
        self.out: list[bytes | memoryview] = []
        self.deadline = deadline
        self.head_only = False
        self.gzip = False
        self.encoder = choose_encoder("")   # the text format (0.0.4) unless asked for another
        self.handler: Callable[[int], None]   # set by the server once the connection is admitted


class HTTPServer:
    """Serves a registry's exposition at /metrics on (host, port) from one thread."""

    def __init__(self, host: str, port: int, registry: CollectorRegistry, counters: Counters,
                 max_connections: int = MAX_CONNECTIONS, timeout: float = 10.0,
                 queries: Queries | None = None) -> None:
        """Binds at once, so a taken port is an OSError here; `start()` begins serving.

        `queries(uuid, reply)`, if given (or set later), answers GET /v1/connections/<uuid>: it is called on the
        server's thread and must not block; `reply(status, json)` may come from any thread,
        within the timeout (else the request is dropped as a timeout)."""
        self.queries = queries
        self._answers: list[tuple[_Conn, int, bytes]] = []
        self._answers_lock = threading.Lock()
        if max_connections < 1:
            raise ValueError(f"connection limit must be at least 1, not {max_connections}")
        self._registry = registry
        self._counters = counters
        self._timeout = timeout
        self._listener = listen(host, port)
        self.address: tuple[str, int] = self._listener.getsockname()[:2]
        self.max_connections = fd_share(max_connections, "the /metrics server")
        self._reading: OrderedDict[_Conn, None] = OrderedDict()   # by deadline = by arrival
        self._writing: OrderedDict[_Conn, None] = OrderedDict()   # by deadline
        self._waiting: list[_Conn] = []
        self._expiry_armed = False
        self._generation_armed = False
        self._next_generation = 0.0
        self._closing = False
        self._started = False
        self._loop = Loop("metrics-http", self._woken)
        # Accepting no more at a time than the cap lets a new connection's request, usually
        # already received, be read before later arrivals could evict it.
        self._acceptor = Acceptor(self._loop, self._listener, self._admit,
                                  counters.accept_errors, "the /metrics server",
                                  batch=self.max_connections)
        self._log = RateLimitedLog(log)

    def start(self) -> None:
        """Serves from a daemon thread; OSError (listener closed) if no thread can be had."""
        try:
            self._loop.start()
        except OSError:
            self._listener.close()
            raise
        self._started = True

    def close(self) -> None:
        """Stops serving: closes the listener and every connection, and ends the thread."""
        self._closing = True
        if not self._started:
            self._listener.close()
            return
        self._loop.wake()
        self._loop.join()

    # --- everything below runs on the loop's thread ---

    def _woken(self) -> None:
        with self._answers_lock:
            answers, self._answers = self._answers, []
        for conn, status, body in answers:
            if conn.state == "answering" and conn.sock.fileno() != -1:
                del self._writing[conn]   # waited there with the response deadline
                conn.state = "answered"
                self._respond(conn, status, body, _JSON)
        if not self._closing:
            return
        self._acceptor.close()
        for conn in [*self._reading, *self._waiting, *self._writing]:
            self._close(conn)
        self._loop.stop()

    def _admit(self, sock: socket.socket) -> None:
        """A new connection; beyond the cap it evicts the oldest one still reading, if any."""
        if len(self._reading) + len(self._waiting) + len(self._writing) >= self.max_connections:
            if not self._reading:
                self._counters.dropped.labels(reason="limit").inc()   # before the client sees EOF
                sock.close()
                self._log(logging.WARNING, "limit", "/metrics server: closed a new connection, "
                          "all %d are being answered (-prometheusx.max-connections)",
                          self.max_connections)
                return
            self._drop(next(iter(self._reading)), "evicted")
            self._log(logging.WARNING, "evicted", "/metrics server: %d connections open "
                      "(-prometheusx.max-connections); closed the oldest one still sending its "
                      "request to make room", self.max_connections)
        conn = _Conn(sock, time.monotonic() + self._timeout)
        conn.handler = functools.partial(self._serve, conn)
        self._reading[conn] = None
        self._counters.connections.inc()
        self._loop.watch(sock, selectors.EVENT_READ, conn.handler)
        self._arm_expiry()

    def _serve(self, conn: _Conn, _events: int) -> None:
        if conn.state == "reading":
            self._read(conn)
        elif conn.state == "writing":
            self._write(conn)

    def _read(self, conn: _Conn) -> None:
        try:
            data = conn.sock.recv(MAX_HEADER + 1 - len(conn.inbuf))
        except BlockingIOError:
            return
        except OSError:
            data = b""
        if not data:
            self._close(conn)   # the client gave up before its request was complete
            return
        conn.inbuf += data
        end = _HEADER_END.search(conn.inbuf)
        if end is None:
            if len(conn.inbuf) > MAX_HEADER:
                self._respond(conn, 431)
            return
        request = parse_request(bytes(conn.inbuf[:end.start()]))
        conn.inbuf = bytearray()
        if request is None:
            self._respond(conn, 400)
            return
        method, path, headers = request
        conn.head_only = method == "HEAD"
        if method not in ("GET", "HEAD"):
            self._respond(conn, 405, extra="Allow: GET, HEAD\r\n")
        elif path.startswith(QUERY_PATH) and self.queries is not None:
            self._ask(conn, path[len(QUERY_PATH):])
        elif path != METRICS_PATH:
            self._respond(conn, 404, b"404 page not found\n")
        else:
            conn.gzip = accepts_gzip(headers.get("accept-encoding", ""))
            conn.encoder = choose_encoder(headers.get("accept", ""))
            self._wait_for_exposition(conn)

    def _ask(self, conn: _Conn, quoted_uuid: str) -> None:
        """A connection query: refused here if malformed, else handed to `queries`."""
        try:
            uuid = unquote(quoted_uuid, errors="strict") if _PERCENT.fullmatch(quoted_uuid) else ""
        except UnicodeDecodeError:
            uuid = ""
        if not uuid or len(uuid) > MAX_UUID or "/" in uuid or not uuid.isprintable():
            self._respond(conn, 400, b'{"error": "want /v1/connections/<uuid>: one path segment, '
                          b'printable, at most 256 characters"}\n', _JSON)
            return
        del self._reading[conn]
        conn.state = "answering"
        conn.deadline = time.monotonic() + self._timeout
        self._writing[conn] = None
        self._loop.forget(conn.sock)
        self._arm_expiry()
        self.queries(uuid, functools.partial(self._answered, conn))   # type: ignore[misc]

    def _answered(self, conn: _Conn, status: int, body: bytes) -> None:
        """From any thread: the answer to a query, sent by the server's thread."""
        with self._answers_lock:
            self._answers.append((conn, status, body))
        self._loop.wake()

    def _wait_for_exposition(self, conn: _Conn) -> None:
        """Parks a /metrics request until the next exposition, which it shares with others."""
        del self._reading[conn]
        conn.state = "waiting"
        self._loop.forget(conn.sock)
        self._waiting.append(conn)
        if not self._generation_armed:
            self._generation_armed = True
            self._loop.call_at(max(time.monotonic(), self._next_generation), self._generate)

    def _generate(self) -> None:
        self._generation_armed = False
        waiting, self._waiting = self._waiting, []
        started = time.monotonic()
        bodies: dict[tuple[str, bool], bytes] = {}   # (format, gzipped) -> the shared response
        for conn in waiting:
            generate, content_type = conn.encoder
            key = (content_type, conn.gzip)
            try:
                if key not in bodies:
                    plain = bodies.get((content_type, False)) or generate(self._registry)
                    bodies[(content_type, False)] = plain
                    bodies[key] = gzip.compress(plain, compresslevel=6, mtime=0) if conn.gzip else plain
            except Exception:
                self._log(logging.ERROR, "generate", "/metrics: cannot generate the exposition",
                          exc_info=True)
                self._respond(conn, 500, b"cannot generate the exposition\n")
                continue
            encoding = "Content-Encoding: gzip\r\n" if conn.gzip else ""
            self._respond(conn, 200, bodies[key], content_type,
                          f"{encoding}Vary: Accept-Encoding, Accept\r\n")
        ended = time.monotonic()
        self._next_generation = ended + (ended - started) * (1 / GENERATION_SHARE - 1)

    def _respond(self, conn: _Conn, status: int, body: bytes = b"", content_type: str = _TEXT,
                 extra: str = "") -> None:
        """Starts sending a whole response; the connection closes once it is sent."""
        head = (f"HTTP/1.1 {status} {STATUS[status]}\r\nContent-Type: {content_type}\r\n"
                f"Content-Length: {len(body)}\r\nConnection: close\r\n{extra}\r\n").encode()
        self._counters.requests.labels(code=str(status)).inc()
        conn.out = [head]
        if body and not conn.head_only:
            conn.out.append(body)
        if conn.state == "reading":
            del self._reading[conn]
        conn.state = "writing"
        conn.deadline = time.monotonic() + self._timeout
        self._writing[conn] = None
        self._write(conn)
        self._arm_expiry()

    def _write(self, conn: _Conn) -> None:
        while conn.out:
            try:
                sent = conn.sock.sendmsg(conn.out)
            except BlockingIOError:
                self._loop.watch(conn.sock, selectors.EVENT_WRITE, conn.handler)
                return
            except OSError:
                break   # the client went away; nothing more to do for it
            consume(conn.out, sent)
        self._close(conn)

    def _drop(self, conn: _Conn, reason: str) -> None:
        self._counters.dropped.labels(reason=reason).inc()
        self._close(conn)

    def _close(self, conn: _Conn) -> None:
        """Forgets and closes a connection.  Unread input is drained first: closing with data
        still unread makes the kernel send a reset, which can destroy the response in flight."""
        if conn.sock.fileno() == -1:
            return
        self._reading.pop(conn, None)
        self._writing.pop(conn, None)
        if conn.state == "waiting" and conn in self._waiting:
            self._waiting.remove(conn)
        self._counters.connections.dec()
        self._loop.forget(conn.sock)
        try:
            for _ in range(4):   # a client that keeps sending cannot keep us here
                if not conn.sock.recv(65536):
                    break
        except OSError:
            pass
        conn.sock.close()
        conn.out = []

    def _arm_expiry(self) -> None:
        """Keeps one timer, at the earliest deadline (each table is in deadline order)."""
        if self._expiry_armed:
            return
        fronts = [next(iter(t)).deadline for t in (self._reading, self._writing) if t]
        if fronts:
            self._expiry_armed = True
            self._loop.call_at(min(fronts), self._expire)

    def _expire(self) -> None:
        self._expiry_armed = False
        now = time.monotonic()
        for table in (self._reading, self._writing):
            while table and next(iter(table)).deadline <= now:
                self._drop(next(iter(table)), "timeout")
        self._arm_expiry()


def listen(host: str, port: int) -> socket.socket:
    """A listening TCP socket on host:port; the unspecified IPv6 address is dual-stack, as Go's."""
    family, _, _, _, address = socket.getaddrinfo(host, port, type=socket.SOCK_STREAM,
                                                  flags=socket.AI_PASSIVE)[0]
    dual = (family == socket.AF_INET6 and socket.has_dualstack_ipv6()
            and ipaddress.ip_address(address[0]).is_unspecified)
    return socket.create_server(address, family=family, backlog=BACKLOG, dualstack_ipv6=dual)


def parse_request(head: bytes) -> tuple[str, str, dict[str, str]] | None:
    """(method, path, headers by lower-case name) of an HTTP/1.x request head; None if malformed."""
    lines = head.decode("latin-1").split("\n")
    parts = lines[0].rstrip("\r").split(" ")
    if len(parts) != 3 or not re.fullmatch(r"HTTP/1\.\d", parts[2]) or not parts[0].isalpha():
        return None
    method, target, _ = parts
    headers: dict[str, str] = {}
    for line in lines[1:]:
        name, colon, value = line.rstrip("\r").partition(":")
        if not colon or not name or name != name.strip():
            return None   # also folded (obsolete) continuation lines, which start with a space
        key, value = name.lower(), value.strip()
        headers[key] = f"{headers[key]}, {value}" if key in headers else value
    try:
        path = urlsplit(target).path
    except ValueError:
        return None
    return method, path, headers


def accepts_gzip(accept_encoding: str) -> bool:
    """Whether an Accept-Encoding value allows gzip: listed (or `*`) with a q-value above 0."""
    explicit: float | None = None
    wildcard: float | None = None
    for item in accept_encoding.split(","):
        coding, *params = item.split(";")
        q = 1.0
        for param in params:
            name, _, value = param.strip().partition("=")
            if name.lower() == "q":
                try:
                    q = float(value)
                except ValueError:
                    q = 0.0
        coding = coding.strip().lower()
        if coding in ("gzip", "x-gzip"):
            explicit = q
        elif coding == "*":
            wildcard = q
    chosen = explicit if explicit is not None else wildcard
    return chosen is not None and chosen > 0


def parse_listen_address(listen_address: str) -> tuple[str, int]:
    """Splits a Go listen address (":9990", "host:9990", "[::1]:9990") into host and port.

    An empty host means every interface, as in Go.  Only numeric ports are accepted.
    """
    host, sep, port = listen_address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad listen address {listen_address!r}: want [host]:port, "
                         f"e.g. ':9990', '127.0.0.1:9990' or '[::1]:9990'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as err:
            raise ValueError(f"bad listen address {listen_address!r}: {err}") from None
    elif ":" in host:
        raise ValueError(f"bad listen address {listen_address!r}: "
                         f"an IPv6 host must be in brackets, e.g. '[::1]:9990'")
    return host, int(port)


def serve(listen_address: str, registry: CollectorRegistry, counters: Counters,
          max_connections: int = MAX_CONNECTIONS) -> HTTPServer:
    """Serves the registry at /metrics from a daemon thread; the server's `address` is what was
    bound.

    Like Go's net.Listen, an empty host listens on every interface: one dual-stack IPv6 socket,
    or IPv4 alone on a kernel without IPv6.  Port 0 picks a free port, and a name is resolved,
    which is why the bound address is returned.
    """
    host, port = parse_listen_address(listen_address)
    if not host:
        host = "::" if os.path.exists("/proc/net/if_inet6") else "0.0.0.0"
    try:
        server = HTTPServer(host, port, registry, counters, max_connections)
        server.start()
    except OSError as err:
        raise OSError(err.errno, f"cannot serve metrics on {listen_address!r}: "
                                 f"{err.strerror or err}") from err
    return server
