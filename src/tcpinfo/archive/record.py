"""ArchivalRecord JSON lines (UPSTREAM.md §4): encode, decode, header line and timestamps.

Upstream's readers (M-Lab's ETL, csvtool) compare archives byte for byte with what the Go
program wrote, so the encoder reproduces Go's ``encoding/json`` output exactly: key order
Timestamp, RawIDM, Attributes, Metadata; compact separators; standard padded base64; ``null`` for
an absent attribute and ``""`` for a present empty one; Go ``time.RFC3339Nano`` timestamps.

This is the format's reference in pure Python; the daemon's hot path builds the same bytes in C
(``tcpinfo.archive.encode``), and tests check the two agree.  Decoding needs no C at all.
"""
from __future__ import annotations

import binascii
import re
from datetime import datetime, timedelta
from typing import NamedTuple

import orjson

ZERO_TIME: str = "0001-01-01T00:00:00Z"

_EPOCH = datetime(1970, 1, 1)
_NS_PER_S = 1_000_000_000
_S_PER_DAY = 86_400
ZERO_TIME_NS: int = (datetime(1, 1, 1) - _EPOCH) // timedelta(seconds=1) * _NS_PER_S
"""Unix nanoseconds of Go's zero ``time.Time`` (0001-01-01T00:00:00Z)."""

_b64 = binascii.b2a_base64


def _offset_suffix(offset_s: int) -> str:
    """Go's ``Z07:00``: ``Z`` for UTC, else ``+hh:mm`` (seconds of an odd offset are dropped)."""
    if offset_s == 0:
        return "Z"
    sign = "+" if offset_s > 0 else "-"
    minutes = abs(offset_s) // 60
    return f"{sign}{minutes // 60:02d}:{minutes % 60:02d}"


def format_time(ns: int, offset_s: int = 0) -> str:
    """Format Unix nanoseconds as Go's ``time.RFC3339Nano`` in the zone ``offset_s`` east of UTC.

    The fraction keeps nanosecond precision with trailing zeros trimmed and is left out entirely
    when zero, exactly as Go prints it, so re-encoded archives are byte-identical.
    """
    seconds, frac = divmod(ns + offset_s * _NS_PER_S, _NS_PER_S)
    days, sod = divmod(seconds, _S_PER_DAY)
    date = _EPOCH + timedelta(days=days)
    hh, rem = divmod(sod, 3600)
    mm, ss = divmod(rem, 60)
    text = f"{date.year:04d}-{date.month:02d}-{date.day:02d}T{hh:02d}:{mm:02d}:{ss:02d}"
    if frac:
        text += "." + f"{frac:09d}".rstrip("0")
    return text + _offset_suffix(offset_s)


_TIME_RE = re.compile(
    r"(\d{4})-(\d{2})-(\d{2})T(\d{2}):(\d{2}):(\d{2})(?:\.(\d+))?(?:(Z)|([+-])(\d{2}):(\d{2}))\Z"
)


def parse_time(s: str) -> tuple[int, int]:
    """Parse an RFC 3339 timestamp into (Unix nanoseconds, UTC offset in seconds).

    Any offset is accepted because archives written between Aug 2019 and Apr 2020 carry local
    offsets (the finwait2 sample); keeping the offset lets csvtool print the time as written.
    """
    m = _TIME_RE.match(s)
    if m is None:
        raise ValueError(f"bad RFC 3339 timestamp {s!r}")
    year, month, day, hh, mm, ss, frac, zulu, sign, oh, om = m.groups()
    if int(hh) > 23 or int(mm) > 59 or int(ss) > 59 or int(oh or 0) > 23 or int(om or 0) > 59:
        raise ValueError(f"bad RFC 3339 timestamp {s!r}")
    try:
        days = (datetime(int(year), int(month), int(day)) - _EPOCH).days
    except ValueError:
        raise ValueError(f"bad RFC 3339 timestamp {s!r}") from None
    offset = 0 if zulu else (int(oh) * 3600 + int(om) * 60) * (1 if sign == "+" else -1)
    local_s = days * _S_PER_DAY + int(hh) * 3600 + int(mm) * 60 + int(ss)
    frac_ns = int(frac[:9].ljust(9, "0")) if frac else 0
    return (local_s - offset) * _NS_PER_S + frac_ns, offset


_GO_HTML_ESCAPES = (
    (b"<", b"\\u003c"),
    (b">", b"\\u003e"),
    (b"&", b"\\u0026"),
    ("\u2028".encode(), b"\\u2028"),
    ("\u2029".encode(), b"\\u2029"),
)


def go_json(value: object) -> bytes:
    """Compact JSON as Go's ``json.Marshal`` writes it (HTML-sensitive characters escaped)."""
    out = orjson.dumps(value)
    for raw, escaped in _GO_HTML_ESCAPES:
        if raw in out:
            out = out.replace(raw, escaped)
    return out


def encode_header(
    uuid: str, sequence: int, start_ns: int, extra: dict | None = None, *, offset_s: int = 0
) -> bytes:
    """The first line of every archive file: zero Timestamp plus the connection's Metadata.

    ``extra`` keys follow upstream's three keys in the given order; upstream readers ignore them.
    ``offset_s`` only exists to reproduce 2019-era archives whose StartTime had a local offset.
    """
    metadata = {"UUID": uuid, "Sequence": sequence, "StartTime": format_time(start_ns, offset_s)}
    if extra:
        metadata.update(extra)
    return b'{"Timestamp":"' + ZERO_TIME.encode() + b'","Metadata":' + go_json(metadata) + b"}\n"


_last_ts: tuple[int, int, bytes] = (ZERO_TIME_NS, 0, ZERO_TIME.encode())


def timestamp_bytes(ts_ns: int, offset_s: int = 0) -> bytes:
    """RFC3339Nano bytes, memoised for the last value: a whole poll shares one timestamp."""
    global _last_ts
    if _last_ts[0] != ts_ns or _last_ts[1] != offset_s:
        _last_ts = (ts_ns, offset_s, format_time(ts_ns, offset_s).encode())
    return _last_ts[2]


def encode_record(
    ts_ns: int, raw_idm: bytes, attributes: list[bytes | None], *, offset_s: int = 0
) -> bytes:
    """One data line: ``{"Timestamp":…,"RawIDM":…,"Attributes":[…]}`` plus newline, as Go writes it.

    The daemon always writes UTC; ``offset_s`` reproduces 2019-era local-offset archives.
    """
    quoted = []
    for value in attributes:
        if value is None:
            quoted.append(b"null")
            continue
        text = _quoted_cache.get(value)
        if text is None:
            text = b'"' + _b64(value, newline=False) + b'"'
            if len(value) <= _QUOTED_CACHE_MAX_VALUE:
                if len(_quoted_cache) > _QUOTED_CACHE_LIMIT:
                    _quoted_cache.clear()
                _quoted_cache[value] = text
        quoted.append(text)
    return b"".join((
        b'{"Timestamp":"', timestamp_bytes(ts_ns, offset_s), b'","RawIDM":"', _b64(raw_idm, newline=False),
        b'","Attributes":[', b",".join(quoted), b"]}\n",
    ))


_quoted_cache: dict[bytes, bytes] = {}
"""Small attribute values (CONG, TOS, SHUTDOWN, MEMINFO…) repeat across sockets: memoise their
quoted base64 (bounded), which makes encoding ~15% faster."""
_QUOTED_CACHE_MAX_VALUE = 64
_QUOTED_CACHE_LIMIT = 4096


class DecodedLine(NamedTuple):
    """One parsed archive line; ``raw_idm``/``attributes``/``metadata`` are None when absent."""

    ts_ns: int
    offset_s: int
    raw_idm: bytes | None
    attributes: list[bytes | None] | None
    metadata: dict | None


def b64decode(text: object, what: str) -> bytes:
    """Decodes a base64 JSON value; ValueError naming ``what`` for a wrong type or bad text.

    The common, valid case costs one C call; the checks run only when it fails.
    """
    try:
        return binascii.a2b_base64(text, strict_mode=True)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        pass
    if type(text) is not str:
        raise ValueError(f"{what}: expected a base64 string, got {type(text).__name__}")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except ValueError as exc:  # binascii.Error, or non-ASCII text
        raise ValueError(f"{what}: bad base64 ({exc})") from None


def decode_line(line: bytes | str) -> DecodedLine:
    """Parse one archive line, validating JSON types like Go's ``json.Unmarshal`` would.

    Unknown keys are ignored; a missing Timestamp is Go's zero time.  Errors are ValueErrors
    with a message fit for a one-line report.
    """
    try:
        obj = orjson.loads(line)
    except orjson.JSONDecodeError as exc:
        raise ValueError(f"not JSON ({exc})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
    ts = obj.get("Timestamp")
    if ts is None:
        ts_ns, offset = ZERO_TIME_NS, 0
    elif isinstance(ts, str):
        ts_ns, offset = parse_time(ts)
    else:
        raise ValueError(f"Timestamp: expected a string, got {type(ts).__name__}")
    raw = obj.get("RawIDM")
    raw_idm = None if raw is None else b64decode(raw, "RawIDM")
    attrs = obj.get("Attributes")
    attributes = None
    if attrs is not None:
        if not isinstance(attrs, list):
            raise ValueError(f"Attributes: expected an array, got {type(attrs).__name__}")
        attributes = [
            None if a is None else b64decode(a, f"Attributes[{i}]") for i, a in enumerate(attrs)
        ]
    metadata = obj.get("Metadata")
    if metadata is not None and not isinstance(metadata, dict):
        raise ValueError(f"Metadata: expected an object, got {type(metadata).__name__}")
    return DecodedLine(ts_ns, offset, raw_idm, attributes, metadata)
