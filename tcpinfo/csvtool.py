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
import sys
from collections.abc import Callable
from typing import BinaryIO

import orjson

from .archive import STDIN, ArchiveError, expand_paths, read_archive
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
from .record import ZERO_TIME, ZERO_TIME_NS, decode_line, format_time, parse_time
from .tcp import Layout, state_name

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

# A row is built from these 17 slots, each one CSV fragment (struct slots hold several columns).
_TS, _OBS, _NFP, _IDM, _CONG, _TOS, _TCLASS, _CLASSID, _SHUTDOWN, _PROTOCOL, _MARK = range(11)
_STRUCT_SLOTS = {INET_DIAG_INFO: 11, INET_DIAG_MEMINFO: 12, INET_DIAG_SKMEMINFO: 13,
                 INET_DIAG_VEGASINFO: 14, INET_DIAG_DCTCPINFO: 15, INET_DIAG_BBRINFO: 16}
_U8_SLOTS = {INET_DIAG_TOS: _TOS, INET_DIAG_TCLASS: _TCLASS, INET_DIAG_CLASS_ID: _CLASSID,
             INET_DIAG_SHUTDOWN: _SHUTDOWN, INET_DIAG_PROTOCOL: _PROTOCOL}
_EMPTY_ROW: list[str] = (
    ["", "0", "0", "," * 14, ""] + ["0"] * 6
    + ["," * (len(layout.go_names) - 1)
       for _, layout in sorted((slot, STRUCT_ATTRIBUTES[t][1]) for t, slot in _STRUCT_SLOTS.items())]
)
_METADATA_TIME = "2009-05-29T23:59:59Z"
"""Upstream's snapshot reader replaces a zero Timestamp with this date ("HACK")."""

_Formatter = Callable[[bytes], "tuple[int, str, bool]"]


def _struct_formatter(slot: int, layout: Layout) -> _Formatter:
    def fmt(raw: bytes) -> tuple[int, str, bool]:
        values, ok = layout.decode_go(raw)
        return slot, ",".join(map(str, values)), ok
    return fmt


def _u8_formatter(slot: int) -> _Formatter:
    def fmt(raw: bytes) -> tuple[int, str, bool]:
        return (slot, str(raw[0]), True) if raw else (slot, "0", False)
    return fmt


def _mark(raw: bytes) -> tuple[int, str, bool]:
    if len(raw) != 4:
        return _MARK, "0", False
    return _MARK, str(int.from_bytes(raw, "little")), True


def _cong(raw: bytes) -> tuple[int, str, bool]:
    if not raw:
        raise ValueError("empty CONG attribute (upstream csvtool panics here)")
    return _CONG, go_csv_field(raw[:-1].decode("utf-8", "surrogateescape")), True


def _undecoded(raw: bytes) -> tuple[int, str, bool]:
    return -1, "", False


_FORMATTERS: dict[int, _Formatter] = {
    **{t: _struct_formatter(slot, STRUCT_ATTRIBUTES[t][1]) for t, slot in _STRUCT_SLOTS.items()},
    **{t: _u8_formatter(slot) for t, slot in _U8_SLOTS.items()},
    INET_DIAG_MARK: _mark,
    INET_DIAG_CONG: _cong,
}
_CACHE_LIMIT = 20_000


def _b64(text: object, what: str) -> bytes:
    if type(text) is not str:
        raise ValueError(f"{what}: expected a base64 string or null, got {type(text).__name__}")
    try:
        return binascii.a2b_base64(text, strict_mode=True)
    except binascii.Error as exc:
        raise ValueError(f"{what}: bad base64 ({exc})") from None


class UpstreamConverter:
    """Turns archive lines into rows of upstream's CSV, memoising every formatted fragment."""

    def __init__(self) -> None:
        self._attr_cache: list[dict[str, tuple[int, str, bool]]] = [{} for _ in range(39)]
        self._time_cache: dict[str, str] = {}
        self._addr_cache: dict[bytes, str] = {}

    def _time(self, ts: object) -> str:
        if ts is None or ts == ZERO_TIME:
            return _METADATA_TIME
        if type(ts) is not str:
            raise ValueError(f"Timestamp: expected a string, got {type(ts).__name__}")
        text = self._time_cache.get(ts)
        if text is None:
            ns, offset = parse_time(ts)
            text = _METADATA_TIME if ns == ZERO_TIME_NS and offset == 0 else format_time(ns, offset)
            if len(self._time_cache) > _CACHE_LIMIT:
                self._time_cache.clear()
            self._time_cache[ts] = text
        return text

    def _idm(self, text: object) -> str:
        raw = _b64(text, "RawIDM")
        if len(raw) < IDM_LEN:
            raise ValueError(f"RawIDM too short: {len(raw)} bytes < {IDM_LEN}")
        family, state, timer, retrans, _, cookie, expires, rq, wq, uid, inode = IDM_HOST.unpack_from(raw)
        sport, dport, _, _, if_be = IDM_NET.unpack_from(raw)
        key = raw[:1] + raw[8:40]
        addrs = self._addr_cache.get(key)
        if addrs is None:
            addrs = ip_string(raw[8:24], family) + "," + ip_string(raw[24:40], family)
            if len(self._addr_cache) > _CACHE_LIMIT:
                self._addr_cache.clear()
            self._addr_cache[key] = addrs
        return "%d,%d,%d,%d,%d,%d,%s,%d,%X,%d,%d,%d,%d,%d" % (
            family, state, timer, retrans, sport, dport, addrs, if_be, cookie, expires, rq, wq, uid, inode)

    def row(self, line: bytes) -> str:
        """One CSV row (without newline) for one archive line; ValueError on bad input."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if type(obj) is not dict:
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        out = _EMPTY_ROW.copy()
        out[_TS] = self._time(obj.get("Timestamp"))
        raw_idm = obj.get("RawIDM")
        if raw_idm is not None:
            out[_IDM] = self._idm(raw_idm)
        else:
            metadata = obj.get("Metadata")
            if metadata is None:
                raise ValueError("record has neither Metadata nor RawIDM")
            if type(metadata) is not dict:
                raise ValueError(f"Metadata: expected an object, got {type(metadata).__name__}")
        attrs = obj.get("Attributes")
        if attrs is not None:
            if type(attrs) is not list:
                raise ValueError(f"Attributes: expected an array, got {type(attrs).__name__}")
            observed = not_parsed = 0
            caches = self._attr_cache
            for t, text in enumerate(attrs):
                if text is None:
                    continue
                cache = caches[t] if t < 39 else {}
                hit = cache.get(text)
                if hit is None:
                    raw = _b64(text, f"Attributes[{t}]")
                    hit = _FORMATTERS.get(t, _undecoded)(raw)
                    if len(cache) > _CACHE_LIMIT:
                        cache.clear()
                    cache[text] = hit
                slot, fragment, ok = hit
                if slot >= 0:
                    out[slot] = fragment
                if 0 < t <= 32:
                    bit = 1 << (t - 1)
                    observed |= bit
                    if not ok:
                        not_parsed |= bit
            out[_OBS] = str(observed)
            out[_NFP] = str(not_parsed)
        return ",".join(out)


# --- modern schema ---------------------------------------------------------------------------

IDM_COLUMNS = ["idm.family", "idm.state", "idm.state_name", "idm.timer", "idm.retrans", "idm.sport",
               "idm.dport", "idm.src", "idm.dst", "idm.interface", "idm.cookie", "idm.expires",
               "idm.rqueue", "idm.wqueue", "idm.uid", "idm.inode"]
MODERN_HEADER: list[str] = (
    ["uuid", "timestamp"] + IDM_COLUMNS + ["cong"]
    + [name for name, _ in SCALAR_ATTRIBUTES.values()]
    + [f"{prefix}.{name}" for prefix, layout in STRUCT_ATTRIBUTES.values() for name in layout.names]
)


def modern_record(line: bytes, uuid: str) -> tuple[dict[str, object] | None, dict | None]:
    """(decoded fields of a data line or None for a header line, the line's Metadata or None)."""
    d = decode_line(line)
    if d.raw_idm is None:
        if d.metadata is None:
            raise ValueError("record has neither Metadata nor RawIDM")
        return None, d.metadata
    idm = decode_idm(d.raw_idm)
    fields: dict[str, object] = {"uuid": uuid}
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


def _modern_csv_row(fields: dict[str, object]) -> str:
    return ",".join(go_csv_field(str(fields.get(col, ""))) for col in MODERN_HEADER)


# --- driver ----------------------------------------------------------------------------------

class BadInput(Exception):
    """Stops the conversion; the message is one line naming file and line."""


def convert(paths: list[str], out: BinaryIO, *, schema: str = "upstream", json_lines: bool = False,
            skip_bad: bool = False) -> tuple[int, int]:
    """Stream every line of ``paths`` to ``out``; returns (rows written, bad lines skipped).

    Raises BadInput (or ArchiveError for unreadable/corrupt files) on the first bad line unless
    ``skip_bad``.  Output is flushed in blocks, so memory stays flat whatever the input size.
    """
    rows: list[str] = []
    written = skipped = 0

    def flush() -> None:
        if rows:
            out.write(("\n".join(rows) + "\n").encode("utf-8", "surrogateescape"))
            rows.clear()

    if not json_lines:
        rows.append(",".join(UPSTREAM_HEADER if schema == "upstream" else MODERN_HEADER))
    upstream = UpstreamConverter() if schema == "upstream" and not json_lines else None
    for path in paths:
        name = "<stdin>" if path == STDIN else path
        uuid = ""
        for lineno, line in read_archive(path):
            try:
                if upstream is not None:
                    rows.append(upstream.row(line))
                else:
                    fields, metadata = modern_record(line, uuid)
                    if metadata is not None:
                        uuid = str(metadata.get("UUID", ""))
                    if fields is None:
                        continue
                    fields["uuid"] = uuid
                    rows.append(orjson.dumps(fields).decode() if json_lines else _modern_csv_row(fields))
            except (ValueError, OverflowError) as exc:
                if not skip_bad:
                    flush()
                    raise BadInput(f"{name}:{lineno}: {exc}") from None
                skipped += 1
                continue
            written += 1
            if len(rows) >= 2000:
                flush()
    flush()
    return written, skipped


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
