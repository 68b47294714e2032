"""Client side of the event socket, in the shape of upstream's `eventsocket.MustRun`.

A consumer implements a handler with `open` and `close` callbacks and calls
`run(path, handler)`: the same two callbacks upstream's Go `Handler` has, so a
consumer ported from Go keeps its structure.  Callbacks run synchronously on the
reading thread; unlike upstream, a slow handler only delays this client (the
server drops a client that falls `queue_limit` events behind), never the collector.
"""
from __future__ import annotations

import logging
import socket
import threading
from datetime import datetime
from typing import Protocol

from tcpinfo.events.line import CLOSE, OPEN, parse_line

log = logging.getLogger(__name__)

_STOP_CHECK_SECONDS = 0.1
"""How often a blocked read looks at the stop event."""


class Handler(Protocol):
    """What `run` calls for each event (upstream's `eventsocket.Handler`)."""

    def open(self, ts: datetime, uuid: str, sockid: dict | None) -> None:
        """A flow was first seen; `sockid` is upstream's SockID object as sent (None if the
        line had none)."""

    def close(self, ts: datetime, uuid: str) -> None:
        """A flow whose Open this client received has gone."""


def connect(path: str) -> socket.socket:
    """Connects to the event socket, with an error that says what is wrong."""
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    try:
        sock.connect(path)
    except FileNotFoundError as err:
        sock.close()
        raise FileNotFoundError(err.errno, f"no event socket at {path}: is tcp-info running "
                                           f"with -tcpinfo.eventsocket={path}?") from err
    except ConnectionRefusedError as err:
        sock.close()
        raise ConnectionRefusedError(err.errno, f"nothing listens on the event socket {path} "
                                                f"(a stale file from a stopped tcp-info?)") from err
    except OSError:
        sock.close()
        raise
    return sock


def dispatch(line: bytes, handler: Handler) -> None:
    """Decodes one event line and calls the handler; unknown event types are logged and skipped.

    A line that is not an event object is a ValueError (see `line.parse_line`).
    """
    event = parse_line(line)
    if event.kind == OPEN:
        handler.open(event.timestamp, event.uuid, event.sockid)
    elif event.kind == CLOSE:
        handler.close(event.timestamp, event.uuid)
    else:
        log.warning("skipping unknown event type %r for %s", event.kind, event.uuid)


def run(path: str, handler: Handler, stop: threading.Event | None = None) -> None:
    """Reads events from the socket at `path` and dispatches them until EOF or `stop` is set."""
    with connect(path) as sock:
        sock.settimeout(_STOP_CHECK_SECONDS if stop is not None else None)
        pending = b""
        while stop is None or not stop.is_set():
            try:
                chunk = sock.recv(1 << 16)
            except TimeoutError:
                continue
            if not chunk:
                return
            *lines, pending = (pending + chunk).split(b"\n")
            for line in lines:
                dispatch(line, handler)
