"""Upstream csvtool's CSV schema (UPSTREAM.md §7): the header, one table of column groups, a
Python reference converter and the C loop that does the bulk of the work.

The output is byte-identical to upstream's ``csvtool`` because analysts' pipelines were built on
it, quirks and all (duplicated ``TCP.LastDataRecv``, ``SKMemInfo.Sndbug``, the metadata line as a
row dated 2009-05-29, big-endian Interface, unpadded hex cookie).

Speed comes from C (``cffi_build/csv.c``): it converts whole blocks of lines of the shape
Go's encoder writes, and declines any other line.  Declined lines (the Metadata header, unusual
but valid JSON, bad input) go through ``UpstreamConverter.row``, the readable reference, which
also produces the one-line errors.  Both read the same ``GROUPS`` table.
"""
from __future__ import annotations

from typing import BinaryIO, NamedTuple

import orjson

from tcpinfo.archive.record import ZERO_TIME, ZERO_TIME_NS, b64decode, format_time, parse_time
from tcpinfo.core.binding import ffi, lib
from tcpinfo.csvtool.gocsv import go_csv_field
from tcpinfo.kernel.inetdiag import (
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
    TCP_INFO,
    VEGASINFO,
    ip_string,
)
from tcpinfo.kernel.tcp import Layout

# --- the schema ------------------------------------------------------------------------------

class Group(NamedTuple):
    """The columns one attribute type fills in upstream's row (after the IDM columns)."""

    type: int
    kind: int
    """How the value prints: a ``lib.TCPI_CSV_*`` kind."""
    prefix: str = ""
    layout: Layout | None = None
    """Struct kinds: the struct, read as upstream's Go struct."""

    @property
    def absent(self) -> str:
        """Upstream prints absent scalars as 0, an absent CONG as nothing and absent structs (nil
        pointers) as empty columns."""
        if self.layout is not None:
            return "," * (len(self.layout.go_names) - 1)
        return "" if self.kind == lib.TCPI_CSV_CONG else "0"


def _struct(attr_type: int, prefix: str, layout: Layout) -> Group:
    return Group(attr_type, lib.TCPI_CSV_STRUCT, prefix, layout)


GROUPS: tuple[Group, ...] = (
    Group(INET_DIAG_CONG, lib.TCPI_CSV_CONG),
    Group(INET_DIAG_TOS, lib.TCPI_CSV_U8),
    Group(INET_DIAG_TCLASS, lib.TCPI_CSV_U8),
    Group(INET_DIAG_CLASS_ID, lib.TCPI_CSV_U8),
    Group(INET_DIAG_SHUTDOWN, lib.TCPI_CSV_U8),
    Group(INET_DIAG_PROTOCOL, lib.TCPI_CSV_U8),
    Group(INET_DIAG_MARK, lib.TCPI_CSV_MARK),
    _struct(INET_DIAG_INFO, "TCP", TCP_INFO),
    _struct(INET_DIAG_MEMINFO, "MemInfo", MEMINFO),
    _struct(INET_DIAG_SKMEMINFO, "SKMemInfo", SKMEMINFO),
    _struct(INET_DIAG_VEGASINFO, "Vegas", VEGASINFO),
    _struct(INET_DIAG_DCTCPINFO, "DCTCP", DCTCPINFO),
    _struct(INET_DIAG_BBRINFO, "BBR", BBRINFO),
)
"""Upstream's attribute columns in row order.  CLASS_ID is a u32 that upstream reads as one byte."""
_GROUP_OF = {g.type: i for i, g in enumerate(GROUPS)}
_ABSENT = [g.absent for g in GROUPS]

UPSTREAM_HEADER: list[str] = (
    ["Timestamp", "Observed", "NotFullyParsed", "IDM.Family", "IDM.State", "IDM.Timer", "IDM.Retrans",
     "IDM.SockID.SPort", "IDM.SockID.DPort", "IDM.SockID.Src", "IDM.SockID.Dst", "IDM.SockID.Interface",
     "IDM.SockID.Cookie", "IDM.Expires", "IDM.Rqueue", "IDM.Wqueue", "IDM.UID", "IDM.Inode",
     "CongestionAlgorithm", "TOS", "TClass", "ClassID", "Shutdown", "Protocol", "Mark"]
    + [f"{g.prefix}.{name}" for g in GROUPS if g.layout is not None for name in g.layout.go_names]
)
_NO_IDM = "," * 14
METADATA_TIME = "2009-05-29T23:59:59Z"
"""Upstream's snapshot reader replaces a zero Timestamp with this date ("HACK")."""


# --- the reference converter -----------------------------------------------------------------

def _format(group: Group, raw: bytes) -> tuple[str, bool]:
    """The group's columns for a present value, and whether upstream parsed it fully."""
    kind = group.kind
    if group.layout is not None:
        values, ok = group.layout.decode_go(raw)
        return ",".join(map(str, values)), ok
    if kind == lib.TCPI_CSV_U8:
        return (str(raw[0]), True) if raw else ("0", False)
    if kind == lib.TCPI_CSV_MARK:
        return (str(int.from_bytes(raw, "little")), True) if len(raw) == 4 else ("0", False)
    if not raw:
        raise ValueError("empty CONG attribute (upstream csvtool panics here)")
    return go_csv_field(raw[:-1].decode("utf-8", "surrogateescape")), True


def _time(ts: object) -> str:
    """Go's MarshalText of the parsed Timestamp (a zero one becomes upstream's metadata date)."""
    if ts is None or ts == ZERO_TIME:
        return METADATA_TIME
    if type(ts) is not str:
        raise ValueError(f"Timestamp: expected a string, got {type(ts).__name__}")
    ns, offset = parse_time(ts)
    if ns == ZERO_TIME_NS and ts.endswith("Z"):
        return METADATA_TIME
    return format_time(ns, offset)


def _idm(text: object) -> str:
    raw = b64decode(text, "RawIDM")
    if len(raw) < IDM_LEN:
        raise ValueError(f"RawIDM too short: {len(raw)} bytes < {IDM_LEN}")
    family, state, timer, retrans, _, cookie, expires, rqueue, wqueue, uid, inode = IDM_HOST.unpack_from(raw)
    sport, dport, src, dst, if_be = IDM_NET.unpack_from(raw)
    return "%d,%d,%d,%d,%d,%d,%s,%s,%d,%X,%d,%d,%d,%d,%d" % (
        family, state, timer, retrans, sport, dport, ip_string(src, family), ip_string(dst, family),
        if_be, cookie, expires, rqueue, wqueue, uid, inode)


class UpstreamConverter:
    """Turns archive text into rows of upstream's CSV: blocks in C, odd lines in Python."""

    def __init__(self, out_size: int = 1 << 20) -> None:
        """``out_size``: bytes of CSV per C call to start with (about one block of input)."""
        self._native = _NativeRows(out_size)

    def header(self) -> str:
        return ",".join(UPSTREAM_HEADER)

    def start_file(self) -> None:
        """Nothing carries over between files in upstream's schema."""

    def write_rows(self, text: bytes, pos: int, out: BinaryIO) -> tuple[int, int]:
        """Writes the rows of the lines of ``text`` from ``pos`` on that C converts; returns where
        it stopped (a line for ``row``, or the end) and how many rows it wrote."""
        return self._native.write_rows(text, pos, out)

    def row(self, line: bytes) -> str:
        """One CSV row (without newline) for one archive line; ValueError on bad input."""
        try:
            obj = orjson.loads(line)
        except orjson.JSONDecodeError as exc:
            raise ValueError(f"not JSON ({exc})") from None
        if type(obj) is not dict:
            raise ValueError(f"expected a JSON object, got {type(obj).__name__}")
        ts = _time(obj.get("Timestamp"))
        raw_idm = obj.get("RawIDM")
        if raw_idm is not None:
            idm = _idm(raw_idm)
        else:
            idm = _NO_IDM
            metadata = obj.get("Metadata")
            if metadata is None:
                raise ValueError("record has neither Metadata nor RawIDM")
            if type(metadata) is not dict:
                raise ValueError(f"Metadata: expected an object, got {type(metadata).__name__}")
        attrs = obj.get("Attributes")
        if attrs is not None and type(attrs) is not list:
            raise ValueError(f"Attributes: expected an array, got {type(attrs).__name__}")
        columns = _ABSENT.copy()
        observed = not_parsed = 0
        for t, text in enumerate(attrs or ()):
            if text is None:
                continue
            raw = b64decode(text, f"Attributes[{t}]")
            slot = _GROUP_OF.get(t)
            ok = False
            if slot is not None:
                columns[slot], ok = _format(GROUPS[slot], raw)
            if 0 < t <= 32:  # upstream's uint32 shift: higher types leave no trace
                observed |= 1 << (t - 1)
                if not ok:
                    not_parsed |= 1 << (t - 1)
        return ",".join([ts, str(observed), str(not_parsed), idm, *columns])


# --- the C loop ------------------------------------------------------------------------------

_C_FORMAT_CODES = frozenset("<xBbHhIiQq")


class _NativeRows:
    """GROUPS handed to ``tcpi_csv_rows`` once, and its output buffer."""

    def __init__(self, out_size: int) -> None:
        self._keep: list = []  # the C strings the schema points to
        groups = ffi.new("struct tcpi_csv_group[]", len(GROUPS))
        for cg, g in zip(groups, GROUPS):
            cg.type, cg.kind, cg.absent = g.type, g.kind, self._c_string(g.absent)
            if g.layout is not None:
                fmt = g.layout.go_struct.format
                if not set(fmt) <= _C_FORMAT_CODES:
                    raise ValueError(f"{g.prefix}: struct format {fmt!r} has codes tcpi_csv_rows lacks")
                cg.size, cg.go_size, cg.format = g.layout.go_struct.size, g.layout.go_size, self._c_string(fmt)
        self._schema = ffi.new("struct tcpi_csv_schema *", {
            "groups": groups, "n_groups": len(GROUPS),
            "zero_time": self._c_string(ZERO_TIME), "zero_time_as": self._c_string(METADATA_TIME)})
        self._keep.append(groups)
        self._out = ffi.new("char[]", out_size)
        self._progress = ffi.new("struct tcpi_csv_progress *")

    def _c_string(self, text: str) -> object:
        cdata = ffi.new("char[]", text.encode())
        self._keep.append(cdata)
        return cdata

    def write_rows(self, text: bytes, pos: int, out: BinaryIO) -> tuple[int, int]:
        progress = self._progress
        rows = 0
        while True:
            lib.tcpi_csv_rows(self._schema, text, len(text), pos, self._out, len(self._out), progress)
            if progress.out_used:
                out.write(ffi.buffer(self._out, progress.out_used))
            rows += progress.rows
            pos = progress.pos
            if progress.stop != lib.TCPI_CSV_FULL:
                return pos, rows
            if not progress.rows:  # not even one row fits
                self._out = ffi.new("char[]", 2 * len(self._out))

