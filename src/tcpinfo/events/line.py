"""The event socket's lines (UPSTREAM.md section 8), written by the server and read by the client.

traceroute-caller, uuid-annotator and packet-headers speak upstream's protocol, so every line is
byte-compatible with it: `{"Event":0|1,"Timestamp":…,"UUID":…,"ID":{…}|null}` plus a newline, with
upstream's SockID (Go address strings, `Interface` decoded big-endian, `Cookie` signed) and real,
un-anonymized addresses.  Both ends import this module, so the format is written once.
"""
from __future__ import annotations

import struct
from datetime import UTC, datetime, timedelta, timezone
from typing import NamedTuple

import orjson

from tcpinfo.archive.record import format_time, go_json, parse_time
from tcpinfo.kernel.inetdiag import IDM, IDM_NET, ip_string

OPEN, CLOSE = 0, 1
_COOKIE = struct.Struct("<q")   # upstream's SockID.Cookie is an int64
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def sockid(raw_idm: bytes) -> dict:
    """Upstream's SockID of a raw inet_diag_msg, field order and quirks included.

    Interface is read big-endian and the cookie as a signed int64, as upstream does (UPSTREAM.md
    6.1, 8); consumers compare these values with what upstream sent.
    """
    family = raw_idm[IDM["family"]]
    sport, dport, src, dst, interface = IDM_NET.unpack_from(raw_idm)
    (cookie,) = _COOKIE.unpack_from(raw_idm, IDM["cookie"])
    return {"SPort": sport, "DPort": dport, "SrcIP": ip_string(src, family),
            "DstIP": ip_string(dst, family), "Interface": interface, "Cookie": cookie}


def open_line(ts_ns: int, uuid: str, raw_idm: bytes) -> bytes:
    """The Open line upstream writes for this flow."""
    return go_json({"Event": OPEN, "Timestamp": format_time(ts_ns), "UUID": uuid,
                    "ID": sockid(raw_idm)}) + b"\n"


def close_line(ts_ns: int, uuid: str) -> bytes:
    """The Close line upstream writes for this flow (`ID` is always null)."""
    return go_json({"Event": CLOSE, "Timestamp": format_time(ts_ns), "UUID": uuid,
                    "ID": None}) + b"\n"


class Event(NamedTuple):
    """One event line, decoded."""

    kind: int            # OPEN, CLOSE, or a kind this reader does not know
    timestamp: datetime  # in the zone the line was written in
    uuid: str
    sockid: dict | None  # upstream's SockID object as sent (Open); None for Close


def event_time(text: str) -> datetime:
    """The event's RFC 3339 timestamp as an aware datetime in its own zone (to the microsecond)."""
    ns, offset_s = parse_time(text)
    zone = timezone(timedelta(seconds=offset_s))
    return (_EPOCH + timedelta(microseconds=ns // 1000)).astimezone(zone)


def parse_line(line: bytes) -> Event:
    """Decodes one event line.

    A line that is not an event object is a ValueError: the stream is not what this reader
    understands, and guessing would hand a consumer garbage.
    """
    try:
        event = orjson.loads(line)
        kind, ts, uuid = event["Event"], event["Timestamp"], event["UUID"]
        return Event(kind, event_time(ts), uuid, event.get("ID"))
    except (orjson.JSONDecodeError, KeyError, TypeError) as err:
        raise ValueError(f"malformed event line {line[:200]!r}: {err}") from err
