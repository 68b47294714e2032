"""One thread, one selector: the serving core of the event socket and the /metrics server.

A thread per client let any local user exhaust the collector's threads and file descriptors and
take its CPU.  Here a server is one thread running a selector over non-blocking sockets: a client
costs a socket and a small object, never a thread, and the server's owner closes a client as soon
as its hang-up (EOF or error) is seen.  `Acceptor` caps nothing itself but survives running out of
descriptors: it counts the failure, logs it at most once a minute, stops accepting for
`ACCEPT_BACKOFF` seconds and serves the clients it has meanwhile.

The poll thread shares the GIL with these threads, and a thread that wants the GIL back after a
system call can wait a whole switch interval behind a busy one (see SWITCH_INTERVAL); on a busy
host it also shares the CPUs.  So a loop pays for its work with REST times as much idle time: once
the CPU time it used and has not yet paid for by waiting in select() reaches `STRETCH`, it sleeps
REST times that long.  Under any load a server thus takes at most a fifth of one CPU, and the poll
thread never waits for the GIL much longer than a stretch.  CPU time, not wall time: time spent
waiting for the GIL (the poll thread had it) is not work, and must not make the loop rest.
Within a turn, clients are served before new connections are accepted, so the hang-ups of a
connect/close flood are closed before more come in.
"""
from __future__ import annotations

import errno
import heapq
import itertools
import logging
import resource
import selectors
import socket
import sys
import threading
import time
from collections.abc import Callable

from prometheus_client import Counter

from tcpinfo.base.ratelog import RateLimitedLog

log = logging.getLogger(__name__)

STRETCH = 0.001
"""CPU seconds of work after which a loop rests (see the module docstring)."""
REST = 4
"""Idle seconds per second of work: a loop takes at most 1/(1+REST) of a CPU."""
SWITCH_INTERVAL = 0.001
"""The GIL switch interval while loops run.  A thread that releases the GIL for a system call and
wants it back waits until the holder releases it or this interval ends: with Python's default of
5 ms, a loop thread forwarding events while the poll thread encodes a burst got one system call
per 5 ms (and fell behind), and the poll thread could wait up to 5 ms for a busy loop thread
after each of its dumps.  At 1 ms both waits are five times shorter; forced switches between CPU-bound
threads cost a few microseconds each."""
ACCEPT_BACKOFF = 0.1
"""Seconds an acceptor pauses after accept() fails for want of descriptors or memory."""
ACCEPT_BATCH = 32
"""Connections accepted per readiness of the listener, so a flood cannot monopolize a turn."""

Handler = Callable[[int], None]


class Loop:
    """A selector served by one daemon thread, with timers and a thread-safe wake-up.

    Everything but `wake`, `stop` and `join` is for the loop's own thread (and for setup before
    `start`): handlers, timers and the selector are never touched from two threads.
    """

    def __init__(self, name: str, on_wake: Callable[[], None] | None = None) -> None:
        self.name = name
        self._selector = selectors.DefaultSelector()
        self._timers: list[tuple[float, int, Callable[[], None]]] = []
        self._order = itertools.count()
        self._on_wake = on_wake
        self._wake_r, self._wake_w = socket.socketpair()
        self._wake_r.setblocking(False)
        self._wake_w.setblocking(False)
        self._wake_pending = False
        self._stopping = False
        self._thread: threading.Thread | None = None
        self._log = RateLimitedLog(log)
        self._last: set[int] = set()   # fds whose handlers run after the others in a turn
        self.watch(self._wake_r, selectors.EVENT_READ, self._woken)

    def start(self) -> None:
        """Starts the thread; OSError if the system refuses one (e.g. under a thread limit).

        Also lowers the process's GIL switch interval to SWITCH_INTERVAL (see its docstring).
        """
        sys.setswitchinterval(min(sys.getswitchinterval(), SWITCH_INTERVAL))
        thread = threading.Thread(target=self._run, name=self.name, daemon=True)
        try:
            thread.start()
        except RuntimeError as err:
            raise OSError(errno.EAGAIN, f"cannot start the {self.name} thread: {err}") from None
        self._thread = thread

    def watch(self, sock: socket.socket, events: int, handler: Handler, last: bool = False) -> None:
        """Calls handler(events that happened) whenever `sock` is ready for any of `events`;
        with `last`, after every other handler of the turn, however long they took."""
        if last:
            self._last.add(sock.fileno())
        key = self._selector.get_map().get(sock)
        if key is None:
            self._selector.register(sock, events, handler)
        elif key.events != events or key.data is not handler:
            self._selector.modify(sock, events, handler)

    def forget(self, sock: socket.socket) -> None:
        """Stops watching a socket (before it is closed); forgetting an unwatched one is a no-op."""
        if self._selector.get_map().get(sock) is not None:
            self._selector.unregister(sock)
            self._last.discard(sock.fileno())

    def call_at(self, when: float, callback: Callable[[], None]) -> None:
        """Runs callback on the loop's thread once time.monotonic() reaches `when`."""
        heapq.heappush(self._timers, (when, next(self._order), callback))

    def wake(self) -> None:
        """From any thread: makes the loop call on_wake soon; repeated calls before it does
        cost nothing."""
        if self._wake_pending:
            return
        self._wake_pending = True
        try:
            self._wake_w.send(b"\0")
        except OSError:
            pass   # the pipe is full: a wake-up is already on its way

    def stop(self) -> None:
        """From any thread: ends the loop after its current turn."""
        self._stopping = True
        self.wake()

    def join(self, timeout: float | None = None) -> None:
        if self._thread is not None and self._thread is not threading.current_thread():
            self._thread.join(timeout)

    def _woken(self, _events: int) -> None:
        # Drain first, then clear the flag: cleared first, a wake() in between would set it and
        # send a byte that this recv swallows, leaving the flag set with nothing in the pipe, and
        # every later wake() would return at once: the loop would never wake again (seen as a
        # close() that hung and events that stopped, under load).  Cleared after, a wake() in
        # between is covered by on_wake below, which runs after it and sees what it announced.
        try:
            self._wake_r.recv(4096)   # one call: each system call may cost a wait for the GIL
        except BlockingIOError:
            pass
        self._wake_pending = False
        if self._on_wake is not None:
            self._on_wake()

    def _run(self) -> None:
        selector, registered = self._selector, self._selector.get_map()
        worked = 0.0   # CPU seconds not yet paid for by REST times as much idle time or sleep
        try:
            while not self._stopping:
                timeout = max(0.0, self._timers[0][0] - time.monotonic()) if self._timers else None
                waited = time.monotonic()
                ready = selector.select(timeout)
                worked = max(0.0, worked - (time.monotonic() - waited) / REST)
                started = time.thread_time()
                deferred = []
                for key, events in ready:
                    if key.fd in self._last:
                        deferred.append((key, events))
                    elif registered.get(key.fd) is key:   # not closed by an earlier handler
                        self._call(key.data, events)
                        if time.thread_time() - started >= STRETCH:
                            break   # what is left is still ready at the next select()
                for key, events in deferred:
                    if registered.get(key.fd) is key:
                        self._call(key.data, events)
                while self._timers and self._timers[0][0] <= time.monotonic():
                    self._call(heapq.heappop(self._timers)[2])
                worked += time.thread_time() - started
                if worked >= STRETCH:
                    time.sleep(worked * REST)
                    worked = 0.0
        finally:
            self._selector.close()
            self._wake_r.close()
            self._wake_w.close()

    def _call(self, callback: Callable, *args: object) -> None:
        """Runs a handler; a bug in one is logged (once a minute) instead of ending the server."""
        try:
            callback(*args)
        except Exception:
            self._log(logging.ERROR, "handler", "%s: unexpected error in a handler", self.name,
                      exc_info=True)


class Acceptor:
    """Accepts connections on a listening socket for a Loop and hands each to `admit`.

    When accept() fails (EMFILE, ENFILE: out of descriptors; ENOBUFS, ENOMEM; anything but a
    client that gave up while queued), the connection stays in the kernel's backlog: the failure
    is counted in `errors{error}`, logged at most once a minute, and the listener rests for
    ACCEPT_BACKOFF seconds (a level-triggered selector would otherwise spin on it) while the loop
    serves the clients it has.
    """

    def __init__(self, loop: Loop, listener: socket.socket,
                 admit: Callable[[socket.socket], None], errors: Counter, what: str,
                 batch: int = ACCEPT_BATCH) -> None:
        listener.setblocking(False)
        self._batch = min(batch, ACCEPT_BATCH)
        self._loop = loop
        self._listener = listener
        self._admit = admit
        self._errors = errors
        self._what = what
        self._log = RateLimitedLog(log)
        self._closed = False
        loop.watch(listener, selectors.EVENT_READ, self._ready, last=True)

    def close(self) -> None:
        """Stops accepting and closes the listener (on the loop's thread)."""
        self._closed = True
        self._loop.forget(self._listener)
        self._listener.close()

    def _ready(self, _events: int) -> None:
        for _ in range(self._batch):
            try:
                sock, _ = self._listener.accept()
            except BlockingIOError:
                return
            except OSError as err:
                if err.errno == errno.ECONNABORTED:
                    continue   # the client gave up while queued
                name = errno.errorcode.get(err.errno or 0, "other")
                self._errors.labels(error=name).inc()
                self._log(logging.WARNING, name, "%s cannot accept a connection (%s): pausing "
                          "%.1f s, serving the connected clients meanwhile", self._what,
                          err.strerror or err, ACCEPT_BACKOFF)
                self._loop.forget(self._listener)
                self._loop.call_at(time.monotonic() + ACCEPT_BACKOFF, self._resume)
                return
            sock.setblocking(False)
            self._admit(sock)

    def _resume(self) -> None:
        if not self._closed:
            self._loop.watch(self._listener, selectors.EVENT_READ, self._ready, last=True)


def consume(parts: list[bytes | memoryview], sent: int) -> None:
    """Drops the first `sent` bytes from a list of buffers, as sendmsg() took them."""
    whole = 0
    while whole < len(parts) and sent >= len(parts[whole]):
        sent -= len(parts[whole])
        whole += 1
    del parts[:whole]
    if sent:
        parts[0] = memoryview(parts[0])[sent:]


def fd_share(requested: int, what: str) -> int:
    """The most clients a server may hold: `requested`, or a quarter of the process's descriptor
    limit if that is lower, so that clients can never leave the collector without descriptors
    for its archives.  A lowered cap is logged, since the operator asked for more."""
    soft, _ = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft == resource.RLIM_INFINITY or requested <= max(1, soft // 4):
        return requested
    share = max(1, soft // 4)
    log.warning("%s: at most %d clients, not %d: a quarter of this process's limit of %d open "
                "files (ulimit -n), so archives always have descriptors", what, share, requested,
                soft)
    return share
