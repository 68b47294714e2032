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
from datetime import datetime, timedelta, timezone
from typing import Protocol

import orjson

from tcpinfo.eventsocket import CLOSE, OPEN
from tcpinfo.record import parse_time

log = logging.getLogger(__name__)

_STOP_CHECK_SECONDS = 0.1
"""How often a blocked read looks at the stop event."""
_EPOCH = datetime(1970, 1, 1, tzinfo=timezone.utc)


class Handler(Protocol):
    """What `run` calls for each event (upstream's `eventsocket.Handler`)."""

    def open(self, ts: datetime, uuid: str, sockid: dict) -> None:
        """A flow was first seen; `sockid` is upstream's SockID object as sent."""

    def close(self, ts: datetime, uuid: str) -> None:
        """A flow whose Open this client received has gone."""


def event_time(text: str) -> datetime:
    """The event's RFC 3339 timestamp as an aware datetime in its own zone (to the microsecond)."""
    ns, offset_s = parse_time(text)
    zone = timezone(timedelta(seconds=offset_s))
    return (_EPOCH + timedelta(microseconds=ns // 1000)).astimezone(zone)


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

    A line that is not an event object is a ValueError: the stream is not what this
    client understands, and guessing would hand the handler garbage.
    """
    try:
        event = orjson.loads(line)
        kind, ts, uuid = event["Event"], event["Timestamp"], event["UUID"]
    except (orjson.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"malformed event line {line[:200]!r}: {err}") from err
    if kind == OPEN:
        handler.open(event_time(ts), uuid, event.get("ID"))
    elif kind == CLOSE:
        handler.close(event_time(ts), uuid)
    else:
        log.warning("skipping unknown event type %r for %s", kind, uuid)


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
