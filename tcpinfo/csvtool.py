"""csvtool: convert tcp-info archives to CSV (UPSTREAM.md §7), streaming, with a modern schema.

The default output is byte-identical to upstream's ``csvtool`` because analysts' pipelines were
built on it, quirks and all (duplicated ``TCP.LastDataRecv``, ``SKMemInfo.Sndbug``, the metadata
line as a row dated 2009-05-29, big-endian Interface, unpadded hex cookie).  That path is tuned
for speed: attribute values are formatted once per distinct base64 string and reused.

``--schema modern`` and ``--json`` give correct names and values instead: every field the
kernel sent and nothing it did not, a UUID column and no metadata row.
"""
from __future__ import annotations

import argparse
import binascii
import re
import struct
import sys
from collections.abc import Callable
from typing import BinaryIO

import orjson

from .archive import STDIN, ArchiveError, expand_paths, read_blocks
from .inetdiag import (
    BBRINFO,
    DCTCPINFO,
    IDM_HOST,
    IDM_LEN,
    IDM_NET,
    INET_DIAG_BBRINFO,
    INET_DIAG_CLASS_ID,
    INET_DIAG_CONG,
    INET_DIAG_DCTCPINFO,
    INET_DIAG_INFO,
    INET_DIAG_MARK,
    INET_DIAG_MEMINFO,
    INET_DIAG_PROTOCOL,
    INET_DIAG_SHUTDOWN,
    INET_DIAG_SKMEMINFO,
    INET_DIAG_TCLASS,
    INET_DIAG_TOS,
    INET_DIAG_VEGASINFO,
    MEMINFO,
    SKMEMINFO,
    STRUCT_ATTRIBUTES,
    SCALAR_ATTRIBUTES,
    TCP_INFO,
    VEGASINFO,
    decode_attributes,
    decode_idm,
    ip_string,
)
from .record import ZERO_TIME, ZERO_TIME_NS, b64decode, decode_line, format_time, parse_time
from .tcp import Layout, state_name, struct_for

# --- Go encoding/csv -------------------------------------------------------------------------

_GO_SPACES = frozenset("\t\n\v\f\r \x85\xa0\u1680\u2028\u2029\u202f\u205f\u3000") | frozenset(
    chr(c) for c in range(0x2000, 0x200B)
)


def go_csv_field(field: str) -> str:
    """Quote a field exactly when Go's encoding/csv would (comma, quote, CR, LF, leading space, ``\\.``)."""
    if field == "" or not (
        field == r"\." or "," in field or '"' in field or "\r" in field or "\n" in field or field[0] in _GO_SPACES
    ):
        return field
    return '"' + field.replace('"', '""') + '"'


# --- upstream schema -------------------------------------------------------------------------

def _struct_header(prefix: str, layout: Layout) -> list[str]:
    return [f"{prefix}.{name}" for name in layout.go_names]


UPSTREAM_HEADER: list[str] = (
    ["Timestamp", "Observed", "NotFullyParsed", "IDM.Family", "IDM.State", "IDM.Timer", "IDM.Retrans",
     "IDM.SockID.SPort", "IDM.SockID.DPort", "IDM.SockID.Src", "IDM.SockID.Dst", "IDM.SockID.Interface",
     "IDM.SockID.Cookie", "IDM.Expires", "IDM.Rqueue", "IDM.Wqueue", "IDM.UID", "IDM.Inode",
     "CongestionAlgorithm", "TOS", "TClass", "ClassID", "Shutdown", "Protocol", "Mark"]
    + _struct_header("TCP", TCP_INFO)
    + _struct_header("MemInfo", MEMINFO)
    + _struct_header("SKMemInfo", SKMEMINFO)
    + _struct_header("Vegas", VEGASINFO)
    + _struct_header("DCTCP", DCTCPINFO)
    + _struct_header("BBR", BBRINFO)
)

# Attribute-valued columns, in row order around the TCP.* block: "head" (CongestionAlgorithm ..
# Mark) before it, "tail" (MemInfo .. BBR) after it.  Each slot holds one CSV fragment.
_HEAD_TYPES = (INET_DIAG_CONG, INET_DIAG_TOS, INET_DIAG_TCLASS, INET_DIAG_CLASS_ID, INET_DIAG_SHUTDOWN,
               INET_DIAG_PROTOCOL, INET_DIAG_MARK)
_TAIL_TYPES = (INET_DIAG_MEMINFO, INET_DIAG_SKMEMINFO, INET_DIAG_VEGASINFO, INET_DIAG_DCTCPINFO,
               INET_DIAG_BBRINFO)
_SLOT = {t: i for i, t in enumerate(_HEAD_TYPES + _TAIL_TYPES)}
_ABSENT = [""] + ["0"] * 6 + ["," * (len(STRUCT_ATTRIBUTES[t][1].go_names) - 1) for t in _TAIL_TYPES]
"""Upstream prints absent scalars as 0 and absent structs (nil pointers) as empty columns."""
_NO_ATTRIBUTES = (",".join(_ABSENT[:7]), ",".join(_ABSENT[7:]), 0, 0)
_NO_IDM = "," * 14
_NO_INFO = "," * (len(TCP_INFO.go_names) - 1)
_METADATA_TIME = "2009-05-29T23:59:59Z"
"""Upstream's snapshot reader replaces a zero Timestamp with this date ("HACK")."""

_ZERO_PREFIX = ZERO_TIME[:19]
_CANONICAL_SUFFIX = re.compile(r"(?:\.\d{0,8}[1-9])?(?:Z|[+-](?!00:00)(?:[01]\d|2[0-3]):[0-5]\d)\Z").match
"""What Go prints after the seconds: a trimmed fraction, then ``Z`` or a non-zero offset."""


def _valid_prefix(prefix: str) -> bool:
    """Whether ``YYYY-MM-DDTHH:MM:SS`` is a real date and time (Go's Parse would accept it)."""
    try:
        parse_time(prefix + "Z")
    except ValueError:
        return False
    return True


_Formatter = Callable[[bytes], "tuple[str, bool]"]


def _struct_formatter(layout: Layout) -> _Formatter:
    template = ",".join(["%d"] * len(layout.go_names))  # one %-format beats map(str) + join

    def fmt(raw: bytes) -> tuple[str, bool]:
        values, ok = layout.decode_go(raw)
        return template % values, ok
    return fmt


def _u8(raw: bytes) -> tuple[str, bool]:
    return (str(raw[0]), True) if raw else ("0", False)


def _mark(raw: bytes) -> tuple[str, bool]:
    if len(raw) != 4:
        return "0", False
    return str(int.from_bytes(raw, "little")), True


def _cong(raw: bytes) -> tuple[str, bool]:
    if not raw:
        raise ValueError("empty CONG attribute (upstream csvtool panics here)")
    return go_csv_field(raw[:-1].decode("utf-8", "surrogateescape")), True


def _undecoded(raw: bytes) -> tuple[str, bool]:
    return "", False


_FORMATTERS: dict[int, _Formatter] = {
    **{t: _struct_formatter(STRUCT_ATTRIBUTES[t][1]) for t in _TAIL_TYPES},
    **{t: _u8 for t in (INET_DIAG_TOS, INET_DIAG_TCLASS, INET_DIAG_CLASS_ID, INET_DIAG_SHUTDOWN,
                        INET_DIAG_PROTOCOL)},
    INET_DIAG_MARK: _mark,
    INET_DIAG_CONG: _cong,
}
_CACHE_LIMIT = 20_000
_IDM_TAIL_OFFSET = 52
_IDM_TAIL = struct.Struct("<5I")
"""expires, rqueue, wqueue, uid, inode: the IDM members that change from poll to poll."""

# tcp_info: the first 44 bytes (state .. fackets) rarely change within a connection, so their
# columns are formatted once per distinct value; the rest is formatted every time.
_INFO_SPLIT = 44
_INFO_LEN = TCP_INFO.go_size
_GO_INFO_FIELDS = tuple(f for f in TCP_INFO.fields if f.go_fmt is not None)
_INFO_HEAD = struct_for(tuple(f for f in _GO_INFO_FIELDS if f.offset < _INFO_SPLIT), "go_fmt")
_INFO_REST = struct_for(tuple(f for f in _GO_INFO_FIELDS if f.offset >= _INFO_SPLIT), "go_fmt", _INFO_SPLIT)
_INFO_HEAD_TEMPLATE = ",".join(["%d"] * len(_INFO_HEAD.unpack(bytes(_INFO_HEAD.size))))
_INFO_REST_TEMPLATE = ",%d" * len(_INFO_REST.unpack(bytes(_INFO_REST.size)))
_INFO_BIT = 1 << (INET_DIAG_INFO - 1)




_a2b = binascii.a2b_base64


def _bounded_put(cache: dict, key: object, value: object) -> None:
    """Memoise with a hard size bound, so memory stays flat on endless input."""
    if len(cache) > _CACHE_LIMIT:
        cache.clear()
    cache[key] = value


class UpstreamConverter:
    """Turns archive lines into rows of upstream's CSV, memoising formatted fragments."""

    def header(self) -> str:
        return ",".join(UPSTREAM_HEADER)

    def start_file(self) -> None:
        """Nothing carries over between files in upstream's schema."""

    def __init__(self) -> None:
        self._attr_cache: dict[tuple[int, str], tuple[str, bool]] = {}
        self._prefix_cache: dict[str, bool] = {}
        self._set_cache: dict[tuple, tuple[str, str, int, int]] = {}
        self._idm_cache: dict[bytes, str] = {}
        self._info_cache: dict[bytes, str] = {}

    def _time(self, ts: object) -> str:
        """Go's MarshalText of the parsed Timestamp.  Canonical input (the norm) is returned as
        is once its date-time prefix has been validated; anything else is parsed and re-printed."""
        if ts is None or ts == ZERO_TIME:
            return _METADATA_TIME
        if type(ts) is not str:
            raise ValueError(f"Timestamp: expected a string, got {type(ts).__name__}")
        prefix = ts[:19]
        valid = self._prefix_cache.get(prefix)
        if valid is None:
            valid = _valid_prefix(prefix)
            _bounded_put(self._prefix_cache, prefix, valid)
        if valid and _CANONICAL_SUFFIX(ts, 19) and prefix != _ZERO_PREFIX:
            return ts
        ns, offset = parse_time(ts)
        if ns == ZERO_TIME_NS and ts.endswith("Z"):
            return _METADATA_TIME
        return format_time(ns, offset)

    def _idm(self, text: object) -> str:
        try:  # inline fast path: this runs for every row
            raw = _a2b(text, strict_mode=True)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raw = b64decode(text, "RawIDM")
        if len(raw) < IDM_LEN:
            raise ValueError(f"RawIDM too short: {len(raw)} bytes < {IDM_LEN}")
        # Bytes 0-51 (family .. cookie) rarely change within a connection: format them once.
        head = raw[:_IDM_TAIL_OFFSET]
        fragment = self._idm_cache.get(head)
        if fragment is None:
            family, state, timer, retrans, _, cookie, *_ = IDM_HOST.unpack_from(raw)
            sport, dport, src, dst, if_be = IDM_NET.unpack_from(raw)
            fragment = "%d,%d,%d,%d,%d,%d,%s,%s,%d,%X," % (
                family, state, timer, retrans, sport, dport, ip_string(src, family), ip_string(dst, family),
                if_be, cookie)
            _bounded_put(self._idm_cache, head, fragment)
        return fragment + "%d,%d,%d,%d,%d" % _IDM_TAIL.unpack_from(raw, _IDM_TAIL_OFFSET)

    def _info(self, text: object) -> tuple[str, bool]:
        """The TCP.* columns and whether upstream parsed them fully (not longer than its struct)."""
        try:  # inline fast path: this runs for every row
            raw = _a2b(text, strict_mode=True)  # type: ignore[arg-type]
        except (TypeError, ValueError):
            raw = b64decode(text, f"Attributes[{INET_DIAG_INFO}]")
        n = len(raw)
        if n < _INFO_LEN:
            raw += bytes(_INFO_LEN - n)
        head = raw[:_INFO_SPLIT]
        fragment = self._info_cache.get(head)
        if fragment is None:
            fragment = _INFO_HEAD_TEMPLATE % _INFO_HEAD.unpack(head)
            _bounded_put(self._info_cache, head, fragment)
        return fragment + _INFO_REST_TEMPLATE % _INFO_REST.unpack_from(raw, _INFO_SPLIT), n <= _INFO_LEN

    def _attributes(self, attrs: list) -> tuple[str, str, int, int]:
        """Head and tail fragments and Observed/NotFullyParsed bits of every attribute but INFO."""
        slots = _ABSENT.copy()
        observed = not_parsed = 0
        for t, text in enumerate(attrs):
            if text is None:
                continue
            hit = self._attr_cache.get((t, text))
            if hit is None:
                hit = _FORMATTERS.get(t, _undecoded)(b64decode(text, f"Attributes[{t}]"))
                _bounded_put(self._attr_cache, (t, text), hit)
            fragment, ok = hit
            slot = _SLOT.get(t)
            if slot is not None:
                slots[slot] = fragment
            if 0 < t <= 32:  # upstream's uint32 shift: higher types leave no trace
                observed |= 1 << (t - 1)
                if not ok:
                    not_parsed |= 1 << (t - 1)
        return ",".join(slots[:7]), ",".join(slots[7:]), observed, not_parsed

    def row(self, line: bytes) -> str:
        """One CSV row (without newline) for one archive line; ValueError on bad input."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if type(obj) is not dict:
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        ts = self._time(obj.get("Timestamp"))
        raw_idm = obj.get("RawIDM")
        if raw_idm is not None:
            idm = self._idm(raw_idm)
        else:
            idm = _NO_IDM
            metadata = obj.get("Metadata")
            if metadata is None:
                raise ValueError("record has neither Metadata nor RawIDM")
            if type(metadata) is not dict:
                raise ValueError(f"Metadata: expected an object, got {type(metadata).__name__}")
        attrs = obj.get("Attributes")
        info = None
        if attrs is None:
            attributes = _NO_ATTRIBUTES
        else:
            if type(attrs) is not list:
                raise ValueError(f"Attributes: expected an array, got {type(attrs).__name__}")
            if len(attrs) > INET_DIAG_INFO:
                info = attrs[INET_DIAG_INFO]
                attrs[INET_DIAG_INFO] = None
            # Everything but tcp_info tends to repeat from record to record: memoise the whole set.
            try:
                key: tuple | None = tuple(attrs)
                attributes = self._set_cache.get(key)  # type: ignore[arg-type]
            except TypeError:  # an unhashable value: _attributes reports it
                key = attributes = None
            if attributes is None:
                attributes = self._attributes(attrs)
                if key is not None:
                    _bounded_put(self._set_cache, key, attributes)
        head, tail, observed, not_parsed = attributes
        if info is None:
            tcp = _NO_INFO
        else:
            tcp, ok = self._info(info)
            observed |= _INFO_BIT
            if not ok:
                not_parsed |= _INFO_BIT
        return "%s,%d,%d,%s,%s,%s,%s" % (ts, observed, not_parsed, idm, head, tcp, tail)


# --- modern schema ---------------------------------------------------------------------------

IDM_COLUMNS = ["idm.family", "idm.state", "idm.state_name", "idm.timer", "idm.retrans", "idm.sport",
               "idm.dport", "idm.src", "idm.dst", "idm.interface", "idm.cookie", "idm.expires",
               "idm.rqueue", "idm.wqueue", "idm.uid", "idm.inode"]
MODERN_HEADER: list[str] = (
    ["uuid", "timestamp"] + IDM_COLUMNS + ["cong"]
    + [name for name, _ in SCALAR_ATTRIBUTES.values()]
    + [f"{prefix}.{name}" for prefix, layout in STRUCT_ATTRIBUTES.values() for name in layout.names]
)


def modern_fields(line: bytes) -> tuple[dict[str, object] | None, dict | None]:
    """(decoded fields of a data line, or None for a header line; the line's Metadata or None).

    Absent means not sent: a field the kernel did not send is missing from the dict.
    """
    d = decode_line(line)
    if d.raw_idm is None:
        if d.metadata is None:
            raise ValueError("record has neither Metadata nor RawIDM")
        return None, d.metadata
    idm = decode_idm(d.raw_idm)
    fields: dict[str, object] = {}
    if d.ts_ns != ZERO_TIME_NS or d.offset_s:
        fields["timestamp"] = format_time(d.ts_ns, d.offset_s)
    fields.update({
        "idm.family": idm.family, "idm.state": idm.state, "idm.state_name": state_name(idm.state),
        "idm.timer": idm.timer, "idm.retrans": idm.retrans, "idm.sport": idm.sport, "idm.dport": idm.dport,
        "idm.src": idm.src, "idm.dst": idm.dst, "idm.interface": idm.interface, "idm.cookie": idm.cookie,
        "idm.expires": idm.expires, "idm.rqueue": idm.rqueue, "idm.wqueue": idm.wqueue,
        "idm.uid": idm.uid, "idm.inode": idm.inode,
    })
    if d.attributes:
        if d.attributes[INET_DIAG_CONG:INET_DIAG_CONG + 1] == [b""]:
            raise ValueError("empty CONG attribute")
        fields.update(decode_attributes(d.attributes))
    return fields, d.metadata


class ModernConverter:
    """Rows of the modern schema (CSV or JSON lines); the UUID comes from the file's header line."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.uuid = ""

    def header(self) -> str | None:
        return None if self.json_lines else ",".join(MODERN_HEADER)

    def start_file(self) -> None:
        self.uuid = ""

    def row(self, line: bytes) -> str | None:
        fields, metadata = modern_fields(line)
        if metadata is not None:
            self.uuid = str(metadata.get("UUID", ""))
        if fields is None:
            return None
        fields = {"uuid": self.uuid, **fields}
        if self.json_lines:
            return orjson.dumps(fields).decode()
        return ",".join(go_csv_field(str(fields.get(col, ""))) for col in MODERN_HEADER)


# --- driver ----------------------------------------------------------------------------------

class BadInput(Exception):
    """Stops the conversion; the message is one line naming file and line."""


def convert(paths: list[str], out: BinaryIO, *, schema: str = "upstream", json_lines: bool = False,
            skip_bad: bool = False) -> tuple[int, int]:
    """Stream every line of ``paths`` to ``out``; returns (rows written, bad lines skipped).

    Raises BadInput (or ArchiveError for unreadable/corrupt files) on the first bad line unless
    ``skip_bad``.  Output is written once per input block, so memory stays flat whatever the size.
    """
    converter: UpstreamConverter | ModernConverter = (
        UpstreamConverter() if schema == "upstream" and not json_lines else ModernConverter(json_lines))
    header = converter.header()
    if header is not None:
        out.write((header + "\n").encode())
    row = converter.row
    written = skipped = 0
    for path in paths:
        name = "<stdin>" if path == STDIN else path
        converter.start_file()
        for first, lines in read_blocks(path):
            try:
                rows = list(map(row, lines))  # the fast path: no per-line Python loop
            except (ValueError, OverflowError):
                rows = []
                for lineno, line in enumerate(lines, first):
                    try:
                        rows.append(row(line))
                    except (ValueError, OverflowError) as exc:
                        if not skip_bad:
                            _write(out, rows)
                            raise BadInput(f"{name}:{lineno}: {exc}") from None
                        skipped += 1
            written += _write(out, rows)
    return written, skipped


def _write(out: BinaryIO, rows: list[str | None]) -> int:
    """Write the rows that exist (header lines give none); returns how many."""
    present = [r for r in rows if r is not None] if None in rows else rows
    if present:
        out.write(("\n".join(present) + "\n").encode("utf-8", "surrogateescape"))  # type: ignore[arg-type]
    return len(present)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csvtool",
        description="Convert tcp-info archives (JSONL or .zst) to CSV. With no FILE, read plain JSONL "
                    "from stdin (as upstream does); '-' is stdin too (zstd detected by its magic number).",
    )
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="archive files or directories (walked recursively in sorted order)")
    p.add_argument("--schema", choices=("upstream", "modern"), default="upstream",
                   help="upstream: byte-identical to M-Lab's csvtool (default); modern: correct names, "
                        "every kernel field, UUID column, no metadata row")
    p.add_argument("--json", action="store_true", help="write decoded JSON lines (modern field names)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip lines that cannot be decoded and report how many on stderr")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 1 on any bad input, always a one-line error."""
    args = _parser().parse_args(argv)
    try:
        paths = expand_paths(args.files) if args.files else [STDIN]
        _, skipped = convert(paths, sys.stdout.buffer, schema=args.schema, json_lines=args.json,
                             skip_bad=args.skip_bad)
        sys.stdout.flush()
    except (BadInput, ArchiveError) as exc:
        print(f"csvtool: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        sys.stderr.close()
        return 1
    except KeyboardInterrupt:
        return 130
    if skipped:
        print(f"csvtool: skipped {skipped} bad line{'s' * (skipped != 1)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
