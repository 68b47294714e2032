"""One archive's lines -> Arrow record batches of the snapshots shape (one row per snapshot).

The columns are the modern schema's (``tcpinfo.modern``, what ``csvtool --schema modern``
prints) with ``.`` written ``_`` (``tcp.rtt`` -> ``tcp_rtt``: SQL needs no quoting), each typed
as the kernel's struct member (uint8 ... uint64), null where the kernel did not send it, plus
the archive's UUID, host and Metadata and where each row came from.

``archive_batches`` is a pure function of one archive (a path or ``-``): a distributed engine
runs it per file (``analysis.spark`` does, through ``export.write_group``) and gets exactly what
``tcpinfo export`` writes.  Speed comes from never touching a line in Python: C (``cffi_build/columns.c``,
``_decode_block_in_c``) fills the column buffers of a batch of lines from the reader's text blocks
as they are, in one pass: timestamps as nanoseconds, the IDM's bytes, each
attribute type's value bytes and length, which numpy views with the kernel structs' dtypes.  C
takes the lines csvtool's loop takes (Go's shape, canonical timestamps); a batch with any other
line goes to ``_decode_block``, which parses the same shape with whole-buffer array operations
(positions of quotes, commas and newlines) and reads any timestamp Arrow does.  A line in another
JSON spelling is re-written in Go's shape (orjson) and decoded with its neighbours; anything else
takes the reference path (``modern_fields``), which is also where bad input gets csvtool's
one-line errors.
"""
from __future__ import annotations

import binascii
import functools
import itertools
import re
import struct
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, read_text
from tcpinfo.archive.record import ZERO_TIME, parse_time
from tcpinfo.core.binding import ffi, lib
from tcpinfo.csvtool.convert import BadInput, long_line
from tcpinfo.csvtool.modern import MODERN_HEADER, modern_fields
from tcpinfo.kernel.inetdiag import (
    IDM_HOST,
    IDM_LEN,
    IDM_NET,
    INET_DIAG_CONG,
    INET_DIAG_SOCKOPT,
    SCALAR_ATTRIBUTES,
    STRUCT_ATTRIBUTES,
    congestion_name,
    ip_string,
    sockopt_names,
)
from tcpinfo.kernel.tcp import Layout, state_name

BATCH_ROWS = 8_192
"""Rows per record batch (and Parquet row group): a batch's text, its parse arrays and its
columns are ~50 MB at most, so memory stays flat whatever the input."""

_ARROW_INT = {"B": pa.uint8(), "H": pa.uint16(), "I": pa.uint32(), "Q": pa.uint64()}
_NUMPY_INT = {"B": "u1", "H": "u2", "I": "u4", "Q": "u8"}


def column(modern_name: str) -> str:
    """The export's column for a modern-schema field (``tcp.rtt`` -> ``tcp_rtt``)."""
    return modern_name.replace(".", "_")


def _members(st: struct.Struct, names: tuple[str, ...]) -> list[tuple[str, int, str]]:
    """(name, offset, code) of each value a standard-size struct format unpacks, in order."""
    out, offset, byte_order = [], 0, st.format[0]
    for count, code in re.findall(r"(\d*)([a-zA-Z?])", st.format[1:]):
        n = int(count or 1)
        if code == "x":
            offset += n
        elif code == "s":
            out.append((f"{byte_order}{n}s", offset, code))
            offset += n
        else:
            size = struct.calcsize(byte_order + code)
            out.extend((f"{byte_order}{code}", offset + i * size, code) for i in range(n))
            offset += n * size
    assert len(out) == len(names), (st.format, names)
    return [(name, off, code) for name, (_, off, code) in zip(names, out)]


# decode_idm's unpack order (tcpinfo.inetdiag): host-order members, then network-order ones
_IDM_HOST = _members(IDM_HOST, ("family", "state", "timer", "retrans", "interface", "cookie",
                                "expires", "rqueue", "wqueue", "uid", "inode"))
_IDM_NET = _members(IDM_NET, ("sport", "dport", "src", "dst", "interface_be"))
_IDM_INTS = {name: (off, code, IDM_NET.format[0] if any(n == name for n, _, _ in _IDM_NET) else "<")
             for name, off, code in _IDM_HOST + _IDM_NET if code != "s"}
_IDM_ADDR = {name: off for name, off, code in _IDM_NET if code == "s"}
_IDM_DTYPE = np.dtype({
    "names": list(_IDM_INTS),
    "formats": [order + _NUMPY_INT[code] for off, code, order in _IDM_INTS.values()],
    "offsets": [off for off, _, _ in _IDM_INTS.values()],
    "itemsize": IDM_LEN,
})


def _layout_dtype(layout: Layout) -> np.dtype:
    return np.dtype({"names": [f.name for f in layout.fields],
                     "formats": ["<" + _NUMPY_INT[f.fmt] for f in layout.fields],
                     "offsets": [f.offset for f in layout.fields], "itemsize": layout.size})


_STRUCTS = {t: (prefix, layout, _layout_dtype(layout)) for t, (prefix, layout) in STRUCT_ATTRIBUTES.items()}
_SCALARS = {t: (name, st, np.dtype({"names": ["v"], "formats": ["<" + _NUMPY_INT[st.format[-1]]],
                                    "offsets": [0], "itemsize": st.size}))
            for t, (name, st) in SCALAR_ATTRIBUTES.items()}


def _modern_type(name: str) -> pa.DataType:
    """The Arrow type of one modern-schema column."""
    if name == "timestamp":
        return pa.timestamp("ns", tz="UTC")
    if name in ("uuid", "idm.state_name", "idm.src", "idm.dst", "cong", "sockopt"):
        return pa.string()
    if name.startswith("idm."):
        return _ARROW_INT[_IDM_INTS[name[4:]][1]]
    for _t, (scalar, st, _) in _SCALARS.items():
        if name == scalar:
            return _ARROW_INT[st.format[-1]]
    prefix, member = name.split(".", 1)
    layout = next(lay for p, lay in STRUCT_ATTRIBUTES.values() if p == prefix)
    for f in layout.fields:
        if f.name == member:
            return _ARROW_INT[f.fmt]
    return pa.uint8()  # a bit field's part


EXTRA_FIELDS = [
    pa.field("host", pa.string()),
    pa.field("archive_sequence", pa.int64()),
    pa.field("archive_start_time", pa.timestamp("ns", tz="UTC")),
    pa.field("archive_metadata", pa.string()),
    pa.field("source_file", pa.string()),
    pa.field("source_line", pa.int64()),
    pa.field("date", pa.date32()),
]
SCHEMA = pa.schema([pa.field(column(n), _modern_type(n)) for n in MODERN_HEADER] + EXTRA_FIELDS)
"""The snapshots shape: the modern columns, then host, the archive's Metadata (sequence, start
time and the whole object as JSON), the source file and line, and the partition date."""

_UUID_RE = re.compile(r"(?P<host>.+)_\d+(?:_unsafe)?_[0-9A-F]{16}\Z")


def host_of(uuid: str) -> str | None:
    """The host name in a UUID upstream's way (``<hostname>_<boot time>[_unsafe]_<cookie>``), or
    None for a UUID of another shape (a -uuid-prefix-file may hold anything)."""
    m = _UUID_RE.match(uuid)
    return m.group("host") if m else None


_TIME_PATTERN = r"^\d{4}-\d{2}-\d{2}T\d{2}:\d{2}:\d{2}(\.\d+)?(Z|[+-]\d{2}:\d{2})$"
"""What record.parse_time accepts (its range checks are Arrow's cast's)."""
_NS_RANGE = (-(2**63), 2**63)


@dataclass
class Counts:
    """What one conversion did: rows written, bad lines skipped (``--skip-bad``)."""

    rows: int = 0
    skipped: int = 0


class _Archive:
    """The state one file carries from its header to its rows."""

    def __init__(self, source: str) -> None:
        self.source = source
        self.set_metadata(None)

    def set_metadata(self, metadata: dict | None) -> None:
        md = metadata or {}
        self.uuid = str(md.get("UUID", "")) if metadata is not None else ""
        self.host = host_of(self.uuid)
        seq = md.get("Sequence")
        self.sequence = seq if type(seq) is int else None
        self.start_ns = None
        start = md.get("StartTime")
        if type(start) is str:
            try:
                ns, _ = parse_time(start)
            except ValueError:
                ns = None
            if ns is not None and _NS_RANGE[0] <= ns < _NS_RANGE[1]:
                self.start_ns = ns
        self.metadata = None if metadata is None else orjson.dumps(metadata).decode()


_PREFIX = b'{"Timestamp":"'
_AFTER_TS = np.frombuffer(b'","RawIDM":"', np.uint8)
_AFTER_IDM = np.frombuffer(b'","Attributes":[', np.uint8)
_END = np.frombuffer(b"]}", np.uint8)
_QUOTE, _COMMA, _CLOSE, _PAD, _ZERO_SEXTET = ord('"'), ord(","), ord("]"), ord("="), ord("A")
_NULL = np.frombuffer(b"null", np.uint8)
_MAX_TIME_CHARS = 64
_SLACK = 64
"""Zero bytes after a block: room for the fixed-width windows the parser reads."""


def _rows(buf: np.ndarray, starts: np.ndarray, width: int) -> np.ndarray:
    """The ``width`` bytes at each of ``starts`` as a (len(starts), width) matrix (one copy)."""
    if not width or not len(starts):
        return np.zeros((len(starts), width), np.uint8)
    return np.lib.stride_tricks.sliding_window_view(buf, width)[starts]


def _b64_rows(chars: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Strict standard base64 of equal-length values (the rows of ``chars``), decoded at once:
    (rows x bytes matrix, each row's length), or None if any is not valid padded base64 (the
    reference then says which).  Bytes past a row's length are not zero (what the padding
    left)."""
    k, width = chars.shape
    if width % 4:
        return None
    if not width:
        return np.zeros((k, 0), np.uint8), np.zeros(k, np.int64)
    last = chars[:, -1] == _PAD
    pads = last.astype(np.int64) + (last & (chars[:, -2] == _PAD))
    pad = chars == _PAD
    if np.count_nonzero(pad) != pads.sum():  # '=' anywhere but a value's padding
        return None
    if pads.any():
        chars = chars.copy()
        chars[pad] = _ZERO_SEXTET
    try:
        out = binascii.a2b_base64(np.ascontiguousarray(chars).data, strict_mode=True)  # C: alphabet checked
    except binascii.Error:
        return None
    return np.frombuffer(out, np.uint8).reshape(k, width // 4 * 3), width // 4 * 3 - pads


def _decode_values(buf: np.ndarray, starts: np.ndarray, widths: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """Base64 values at ``starts`` (of ``widths`` characters) in ``buf``: one decoded matrix of the
    longest's bytes and each value's length, or None if any is not valid base64.  Values of one
    length (the usual case: one kernel) are decoded in one call; mixed kernels group by length."""
    distinct = np.unique(widths)
    if len(distinct) == 1:
        return _b64_rows(_rows(buf, starts, int(distinct[0])))
    matrix = np.zeros((len(starts), int(distinct[-1]) // 4 * 3), np.uint8)
    lengths = np.zeros(len(starts), np.int64)
    for width in distinct:
        idx = np.flatnonzero(widths == width)
        decoded = _b64_rows(_rows(buf, starts[idx], int(width)))
        if decoded is None:
            return None
        matrix[idx, :decoded[0].shape[1]] = decoded[0]
        lengths[idx] = decoded[1]
    return matrix, lengths


def _decode_block(block: bytes, n: int, archive: _Archive, linenos: np.ndarray) -> pa.RecordBatch | None:
    """The rows of ``n`` data lines (``block``, then ``_SLACK`` zero bytes) in exactly the shape
    Go's encoder writes (``{"Timestamp":"…","RawIDM":"…","Attributes":[…]}``, no spaces, no
    escapes, each value a string or ``null``), parsed and decoded with whole-block array operations: no per-line
    Python.  None if any line differs in any way (the caller then takes each line through
    ``modern_fields``, the reference, which also reports bad input)."""
    buf = np.frombuffer(block, np.uint8)
    ends = np.flatnonzero(buf == ord("\n"))
    if len(ends) != n or b"\\" in block:
        return None
    starts = np.concatenate(([0], ends[:-1] + 1))
    quotes = np.flatnonzero(buf == _QUOTE)
    if len(quotes) % 2:
        return None
    opens, closes = quotes[0::2], quotes[1::2]   # every quoted string, in order
    first = np.searchsorted(opens, starts)        # a line's first string: "Timestamp"
    per_line = np.diff(np.append(first, len(opens)))
    if (per_line < 5).any() or (closes[np.minimum(first + per_line - 1, len(closes) - 1)] >= ends - 2).any():
        return None
    # the fixed text around the timestamp and the IDM, and the list's end
    ts_close, idm_close = closes[first + 1], closes[first + 3]
    if ((opens[first] != starts + 1) | (opens[first + 1] != starts + 13) | (opens[first + 3] != ts_close + 11)
            | (opens[first + 4] != idm_close + 2)).any():
        return None
    if not ((_rows(buf, starts, len(_PREFIX)) == np.frombuffer(_PREFIX, np.uint8)).all()
            and (_rows(buf, ts_close, len(_AFTER_TS)) == _AFTER_TS).all()
            and (_rows(buf, idm_close, len(_AFTER_IDM)) == _AFTER_IDM).all()
            and (_rows(buf, ends - 2, 2) == _END).all()):
        return None
    # the list: strings and nulls separated by commas, nothing else
    items_start, items_end = idm_close + len(_AFTER_IDM), ends - 2
    value_index = np.flatnonzero(np.arange(len(opens)) - np.repeat(first, per_line) >= 5)  # after 5 strings
    value_line = np.repeat(np.arange(n), per_line)[value_index]
    v_open, v_close = opens[value_index], closes[value_index]
    commas = np.flatnonzero(buf == _COMMA)
    commas_before_items = np.searchsorted(commas, items_start)
    separators = np.searchsorted(commas, items_end) - commas_before_items
    strings = per_line - 5
    nulls = np.where(items_end > items_start, separators + 1, 0) - strings
    if (nulls < 0).any():
        return None
    string_chars = np.bincount(value_line, weights=v_close - v_open + 1, minlength=n).astype(np.int64)
    if ((items_end - items_start) != string_chars + separators + 4 * nulls).any():
        return None
    # a null item is the word right after a separator ('[' or a comma of the list) and right
    # before one (',' or ']'): counted, with the length above that leaves room for nothing else
    m = int(nulls.sum())
    if m:
        comma_line = np.searchsorted(starts, commas, "right") - 1
        listed = commas[(commas >= items_start[comma_line]) & (commas < items_end[comma_line])]
        after = _rows(buf, np.concatenate((items_start - 1, listed)) + 1, 5)
        words = (after[:, :4] == _NULL).all(axis=1) & ((after[:, 4] == _COMMA) | (after[:, 4] == _CLOSE))
        if np.count_nonzero(words) != m:
            return None
    slots = np.searchsorted(commas, v_open) - commas_before_items[value_line]
    if slots.max(initial=0) > 255:  # attribute types are small numbers
        return None
    cols: dict[str, pa.Array] = {}
    # timestamps: ASCII text of a bounded length, parsed by Arrow
    t_len = ts_close - starts - 14
    if (t_len > _MAX_TIME_CHARS).any():
        return None
    chars = _rows(buf, starts + 14, int(t_len.max()))
    text = chars[np.arange(chars.shape[1]) < t_len[:, None]]
    if (text >= 128).any():
        return None
    offsets = np.concatenate(([0], np.cumsum(t_len))).astype(np.int32)
    times = pa.StringArray.from_buffers(n, pa.py_buffer(offsets), pa.py_buffer(text.tobytes()))
    if not pc.all(pc.match_substring_regex(times, _TIME_PATTERN)).as_py():
        return None
    times = pc.if_else(pc.equal(times, ZERO_TIME), pa.scalar(None, pa.string()), times)
    try:
        cols["timestamp"] = times.cast(pa.timestamp("ns", tz="UTC"))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
        return None
    # the IDM
    decoded = _decode_values(buf, opens[first + 3] + 1, idm_close - opens[first + 3] - 1)
    if decoded is None or (decoded[1] < IDM_LEN).any():
        return None
    _idm_columns(cols, np.ascontiguousarray(decoded[0][:, :IDM_LEN]))
    # each attribute type's values, where present
    order = np.argsort(slots.astype(np.int16), kind="stable")  # a radix sort
    bounds = np.searchsorted(slots[order], np.arange(slots.max(initial=-1) + 2))
    for t in range(len(bounds) - 1):
        sel = order[bounds[t]:bounds[t + 1]]
        if not len(sel):
            continue
        rows = value_line[sel]
        decoded = _decode_values(buf, v_open[sel] + 1, v_close[sel] - v_open[sel] - 1)  # every type: checked
        if decoded is None or (t in _KEPT and not _attribute_columns(cols, n, t, None if len(rows) == n else rows,
                                                                     *decoded)):
            return None
    return _assemble(cols, n, archive, linenos)


def _idm_columns(cols: dict[str, pa.Array], raw: np.ndarray) -> None:
    """The IDM's columns from each row's first IDM_LEN bytes (a contiguous rows x IDM_LEN matrix)."""
    idm = raw.view(_IDM_DTYPE).reshape(len(raw))
    for name, (_, code, _) in _IDM_INTS.items():
        if name != "interface_be":
            cols[f"idm_{name}"] = pa.array(idm[name].astype(_NUMPY_INT[code]))  # native order
    cols["idm_state_name"] = _STATE_NAMES.take(pa.array(idm["state"]))
    for name, off in _IDM_ADDR.items():
        cols[f"idm_{name}"] = _addresses(raw, off, raw[:, _IDM_INTS["family"][0]])


def _attribute_columns(cols: dict[str, pa.Array], n: int, t: int, rows: np.ndarray | None,
                       matrix: np.ndarray, lengths: np.ndarray) -> bool:
    """The columns of attribute type ``t`` from its values' first bytes (``matrix``) and decoded
    ``lengths``, at ``rows`` of the batch (None: every row, a length below 0 where absent).
    False if a value is one the reference must report."""
    if t in (INET_DIAG_CONG, INET_DIAG_SOCKOPT):
        if rows is None and (lengths < 0).any():
            rows = np.flatnonzero(lengths >= 0)
            matrix, lengths = matrix[rows], lengths[rows]
        texts = _texts(t, matrix, lengths)
        if texts is None:
            return False
        cols["cong" if t == INET_DIAG_CONG else _SCALARS[t][0]] = _scatter(n, rows, texts)
    elif t in _STRUCTS:
        prefix, layout, dtype = _STRUCTS[t]
        _struct_columns(cols, n, rows, matrix, lengths, prefix, layout, dtype)
    else:
        name, _, dtype = _SCALARS[t]
        _struct_columns(cols, n, rows, matrix, lengths, name, None, dtype)
    return True


_CONG_BYTES = 64
"""CONG bytes the C loop keeps: a longer name (none the kernel has) takes the numpy path."""
_KEPT = {**{t: dtype.itemsize for t, (_, _, dtype) in _STRUCTS.items()},
         **{t: dtype.itemsize for t, (_, _, dtype) in _SCALARS.items()}, INET_DIAG_CONG: _CONG_BYTES}
"""Attribute types with columns, and how many bytes of each the columns read."""
_N_TYPES = max(_KEPT) + 1


def _decode_block_in_c(texts: list[bytes], counts: list[int], archive: _Archive,
                       linenos: np.ndarray) -> pa.RecordBatch | None:
    """The rows of the data lines in ``texts`` (``counts[i]`` whole lines each), if every one
    has the shape csvtool's C loop takes (Go's, a canonical timestamp): C
    (``cffi_build/columns.c``) fills the column buffers in one pass over each text, and numpy
    views the kernel's structs in them.  None if C declines a line."""
    n = sum(counts)
    times, null = np.zeros(n, np.int64), np.zeros(n, np.uint8)
    idm = np.zeros((n, IDM_LEN), np.uint8)
    lengths = np.empty((n, _N_TYPES), np.int32)
    matrices = {t: np.zeros((n, width), np.uint8) for t, width in _KEPT.items()}
    values = ffi.new("uint8_t *[]", _N_TYPES)
    for t, matrix in matrices.items():
        values[t] = ffi.from_buffer("uint8_t[]", matrix)
    spec = ffi.new("struct tcpi_columns *", {
        "zero_time": _ZERO_TIME, "time_ns": ffi.from_buffer("int64_t[]", times),
        "time_null": ffi.from_buffer("uint8_t[]", null), "idm": ffi.from_buffer("uint8_t[]", idm),
        "idm_len": IDM_LEN, "n_types": _N_TYPES, "values": values, "widths": _WIDTHS,
        "lengths": ffi.from_buffer("int32_t[]", lengths)})
    row = 0
    for text, count in zip(texts, counts):
        if not lib.tcpi_columns_fill(text, len(text), row, count, spec):
            return None
        row += count
    if (lengths[:, INET_DIAG_CONG] > _CONG_BYTES).any():
        return None
    mask = null.view(bool)
    cols: dict[str, pa.Array] = {"timestamp": pa.array(times, pa.timestamp("ns", tz="UTC"),
                                                       mask=mask if mask.any() else None)}
    _idm_columns(cols, idm)
    for t, matrix in matrices.items():
        if (lengths[:, t] >= 0).any() and not _attribute_columns(cols, n, t, None, matrix, lengths[:, t]):
            return None
    return _assemble(cols, n, archive, linenos)


_ZERO_TIME = ffi.new("char[]", ZERO_TIME.encode())
_WIDTHS = ffi.new("uint32_t[]", [_KEPT.get(t, 0) for t in range(_N_TYPES)])


def _cong_text(value: bytes) -> str | None:
    return _cong(value) if value else None


def _sockopt_text(value: bytes) -> str | None:
    st = _SCALARS[INET_DIAG_SOCKOPT][1]
    return "|".join(sockopt_names(st.unpack_from(value)[0])) if len(value) >= st.size else None


def _address_text(value: bytes) -> str:
    """A (family, 16 address bytes) key as ip_string writes it."""
    return ip_string(value[1:], value[0])


_ADDRESS = -1
_FORMATS: dict[int, Callable[[bytes], str | None]] = {
    INET_DIAG_CONG: _cong_text, INET_DIAG_SOCKOPT: _sockopt_text, _ADDRESS: _address_text}


@functools.lru_cache(maxsize=4096)
def _text(kind: int, value: bytes) -> str | None:
    """``_FORMATS[kind](value)``, formatted once: CONG, SOCKOPT and addresses take a handful of
    values per archive (bounded, as the values of a long export are not)."""
    return _FORMATS[kind](value)


def _texts(t: int, matrix: np.ndarray, lengths: np.ndarray) -> pa.Array | None:
    """CONG or SOCKOPT as text, each distinct value formatted once; None if a CONG is empty
    (the reference reports it).  A SOCKOPT too short to hold its value is absent."""
    keys = np.concatenate([lengths.astype("<i4")[:, None].view(np.uint8), matrix], axis=1)  # length, bytes
    unique, index = _distinct(keys)
    texts = [_text(t, data[4:4 + int.from_bytes(data[:4], "little")]) for data in unique]
    if t == INET_DIAG_CONG and None in texts:
        return None
    return pa.array(texts, pa.string()).take(index)


def _scatter(n: int, rows: np.ndarray | None, values: pa.Array) -> pa.Array:
    """``values`` at ``rows`` of ``n`` (null elsewhere); all of them when ``rows`` is None."""
    if rows is None:
        return values
    index = np.zeros(n, np.int64)
    index[rows] = np.arange(len(rows))
    mask = np.ones(n, bool)
    mask[rows] = False
    return values.take(pa.array(index, mask=mask))


class _Pending:
    """Data lines waiting to become one batch: whole text blocks of Go-shaped lines as read
    (no per-line work), and lines re-written in that shape one by one (``add_line``)."""

    def __init__(self) -> None:
        self.texts: list[bytes] = []
        self.originals: list[bytes] = []
        self.firsts: list[int] = []
        self.counts: list[int] = []
        self.rows = 0

    def add_text(self, text: bytes, first: int, count: int, original: bytes | None = None) -> None:
        """``count`` whole lines numbered from ``first`` (``original``: as read, if rewritten)."""
        self.texts.append(text)
        self.originals.append(text if original is None else original)
        self.firsts.append(first)
        self.counts.append(count)
        self.rows += count

    def add_line(self, line: bytes, lineno: int) -> bool:
        """Takes a data line of three keys of the right JSON types, re-written in Go's shape
        (key order, spacing); False leaves it to the reference."""
        try:
            obj = orjson.loads(line)
            if len(obj) != 3:
                return False
            ts, raw, attributes = obj["Timestamp"], obj["RawIDM"], obj["Attributes"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False
        if type(ts) is not str or type(raw) is not str or type(attributes) is not list:
            return False
        canonical = orjson.dumps({"Timestamp": ts, "RawIDM": raw, "Attributes": attributes}) + b"\n"
        self.add_text(canonical, lineno, 1, original=line + b"\n")
        return True

    def linenos(self) -> np.ndarray:
        """Each line's number in the archive."""
        return np.concatenate([np.arange(f, f + c) for f, c in zip(self.firsts, self.counts)])

    def lines(self) -> Iterator[tuple[bytes, int]]:
        """The original lines with their numbers (for the reference path)."""
        for text, first in zip(self.originals, self.firsts):
            lines = text.split(b"\n")
            lines.pop()
            yield from zip(lines, itertools.count(first))


def _cong(raw: bytes) -> str:
    """CONG as text; Parquet strings are UTF-8, so undecodable bytes become U+FFFD."""
    return congestion_name(raw).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_STATE_NAMES = pa.array([state_name(i) for i in range(256)], pa.string())


def _addresses(raw: np.ndarray, offset: int, family: np.ndarray) -> pa.Array:
    """ip_string of each row's 16 address bytes, formatted once per distinct (family, address)."""
    unique, index = _distinct(np.concatenate([family[:, None], raw[:, offset:offset + 16]], axis=1))
    return pa.array([_text(_ADDRESS, u) for u in unique], pa.string()).take(index)


def _distinct(keys: np.ndarray) -> tuple[list[bytes], pa.Array]:
    """The distinct rows of a byte matrix and each row's index among them, numbered by C
    (``tcpi_distinct``: a hash table, one pass; a row equal to the one before costs a compare)."""
    keys = np.ascontiguousarray(keys, np.uint8)
    n, width = keys.shape
    if not n:
        return [], pa.array(np.zeros(0, np.uint32))
    index, first = np.empty(n, np.uint32), np.empty(n, np.uint32)
    slots = 1 << (2 * n).bit_length()
    table = np.empty(slots, np.uint32)
    k = lib.tcpi_distinct(ffi.from_buffer("uint8_t[]", keys), n, width, ffi.from_buffer("uint32_t[]", index),
                          ffi.from_buffer("uint32_t[]", first), ffi.from_buffer("uint32_t[]", table), slots)
    return [keys[i].tobytes() for i in first[:k]], pa.array(index)


class _Validity:
    """Validity bitmaps of one attribute type's columns.  A member is present where its value
    is long enough to hold it, so its bitmap depends only on how many of the batch's distinct
    value lengths are shorter than the member's end: a handful per type, each built once and
    shared by the members (rather than a mask per column, converted per column)."""

    def __init__(self, n: int, rows: np.ndarray | None, lengths: np.ndarray, size: int) -> None:
        self.n, self.rows, self.lengths = n, rows, lengths
        # the distinct lengths below the type's size (-1: absent), in order; any longer holds every member
        self.sizes = np.flatnonzero(np.bincount(np.minimum(lengths, size) + 1, minlength=size + 2)[:size + 1]) - 1
        self._bitmaps: dict[int, tuple[pa.Buffer, int]] = {}

    def array(self, values: np.ndarray, end: int) -> pa.Array:
        """The column of ``values`` (contiguous, one per value) of a member ending at byte ``end``."""
        shorter = int(np.searchsorted(self.sizes, end))
        if self.rows is None and not shorter:
            return pa.array(values)
        if self.rows is not None:
            full = np.zeros(self.n, values.dtype)
            full[self.rows] = values
            values = full
        if shorter not in self._bitmaps:
            present = self.lengths >= end
            if self.rows is not None:
                present, inside = np.zeros(self.n, bool), present
                present[self.rows] = inside
            bits = np.packbits(present, bitorder="little")
            self._bitmaps[shorter] = pa.py_buffer(bits), self.n - int(np.count_nonzero(present))
        bitmap, nulls = self._bitmaps[shorter]
        return pa.Array.from_buffers(_UNSIGNED[values.dtype.itemsize], self.n, [bitmap, pa.py_buffer(values)], nulls)


_UNSIGNED = {np.dtype(code).itemsize: _ARROW_INT[k] for k, code in _NUMPY_INT.items()}
"""The Arrow type of each member's (unsigned) values, by size."""


def _struct_columns(cols: dict, n: int, rows: np.ndarray | None, matrix: np.ndarray, lengths: np.ndarray,
                    prefix: str, layout: Layout | None, dtype: np.dtype) -> None:
    """Columns of one attribute type from its decoded values (``matrix`` rows, ``lengths``):
    each member is null where the value is absent or too short to hold it (``Layout.decode``'s
    rule; a scalar is one member named ``v``, its column named ``prefix``)."""
    size = dtype.itemsize
    if matrix.shape[1] == size and matrix.flags.c_contiguous:
        padded = matrix
    else:
        padded = np.zeros((len(matrix), size), np.uint8)
        width = min(size, matrix.shape[1])
        padded[:, :width] = matrix[:, :width]
    decoded = padded.view(dtype).reshape(len(matrix))
    validity = _Validity(n, None if rows is None else np.asarray(rows), lengths, size)
    fields = layout.fields if layout is not None else ()
    members = [(f.name, f.offset + struct.calcsize(f.fmt)) for f in fields] or [("v", size)]
    for name, end in members:
        values = decoded[name]
        parts = layout.bitfields.get(name) if layout is not None else None
        if parts:
            for sub, shift, width in parts:
                cols[f"{prefix}_{sub}"] = validity.array(((values >> shift) & ((1 << width) - 1)).astype(np.uint8), end)
        else:
            column = f"{prefix}_{name}" if layout is not None else prefix
            cols[column] = validity.array(values.astype(values.dtype.newbyteorder("=")), end)


def _assemble(cols: dict[str, pa.Array], n: int, archive: _Archive, linenos: list[int] | np.ndarray) -> pa.RecordBatch:
    """The batch in SCHEMA's order: absent columns null, the archive's constants repeated."""
    consts = {
        "uuid": archive.uuid, "host": archive.host, "archive_sequence": archive.sequence,
        "archive_start_time": archive.start_ns, "archive_metadata": archive.metadata,
        "source_file": archive.source,
    }
    arrays = []
    for field in SCHEMA:
        name = field.name
        if name in cols:
            arr = cols[name]
            arrays.append(arr if arr.type == field.type else arr.cast(field.type))
        elif name in consts:
            arrays.append(pa.repeat(pa.scalar(consts[name], field.type), n))
        elif name == "source_line":
            arrays.append(pa.array(linenos, pa.int64()))
        elif name == "date":
            if archive.start_ns is not None:
                day = pa.scalar(archive.start_ns, pa.timestamp("ns", tz="UTC")).cast(pa.date32())
                arrays.append(pa.repeat(day, n))
            else:
                arrays.append(cols["timestamp"].cast(pa.date32()))
        else:
            arrays.append(pa.nulls(n, field.type))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def _reference_row(fields: dict[str, object]) -> dict[str, object]:
    """A row from modern_fields' dict (the reference): the export's names, time as Unix ns."""
    row = {column(k): v for k, v in fields.items()}
    if "timestamp" in fields:
        ns, _ = parse_time(fields["timestamp"])  # type: ignore[arg-type]
        if not _NS_RANGE[0] <= ns < _NS_RANGE[1]:
            raise ValueError(f"timestamp {fields['timestamp']} is outside what Parquet's nanosecond "
                             "timestamps hold (years 1678-2261)")
        row["timestamp"] = ns
    if "cong" in row:
        row["cong"] = row["cong"].encode("utf-8", "surrogateescape").decode("utf-8", "replace")  # type: ignore[attr-defined]
    return row


def _reference_batch(rows: list[dict], linenos: list[int], archive: _Archive) -> pa.RecordBatch:
    """Reference rows as a batch: the same columns, built value by value."""
    table = pa.RecordBatch.from_pylist(rows, schema=_REFERENCE_SCHEMA)
    cols = {name: table.column(name) for name in table.schema.names}
    return _assemble(cols, len(rows), archive, linenos)


_REFERENCE_SCHEMA = pa.schema([f for f in SCHEMA if f.name in {column(n) for n in MODERN_HEADER} - {"uuid"}])
"""What modern_fields gives (the UUID is the archive's, from its header)."""


def archive_batches(path: str, counts: Counts | None = None, *, skip_bad: bool = False,
                    max_line_bytes: int = MAX_LINE_BYTES, batch_rows: int = BATCH_ROWS,
                    source: str | None = None) -> Iterator[pa.RecordBatch]:
    """Record batches (``SCHEMA``) of one archive, in line order, ``batch_rows`` rows at most.

    Bad input raises ``BadInput`` (the rows before it have been yielded) unless ``skip_bad``,
    which counts it in ``counts.skipped``; an unreadable or corrupt file raises ArchiveError.
    ``source`` is what the ``source_file`` column says (default: the path).
    """
    counts = counts if counts is not None else Counts()
    name = "<stdin>" if path == STDIN else path
    archive = _Archive(source if source is not None else name)
    pending = _Pending()

    def bad(lineno: int, exc: Exception) -> None:
        if not skip_bad:
            raise BadInput(f"{name}:{lineno}: {exc}") from None
        counts.skipped += 1

    def reference(line: bytes, lineno: int) -> dict | None:
        """The row of a line the vectorised path did not take (None: a header, or skipped)."""
        try:
            fields, metadata = modern_fields(line)
            if metadata is not None:
                archive.set_metadata(metadata)
            return None if fields is None else _reference_row(fields)
        except (ValueError, OverflowError) as exc:
            bad(lineno, exc)
            return None

    def decode(block: _Pending, one_by_one: bool) -> Iterator[pa.RecordBatch]:
        """The block's rows: decoded at once, or if a line is not in Go's shape, its lines one
        by one (``one_by_one``) or through the reference."""
        if not block.rows:
            return
        linenos = block.linenos()
        batch = _decode_block_in_c(block.texts, block.counts, archive, linenos)
        if batch is None:
            batch = _decode_block(b"".join((*block.texts, bytes(_SLACK))), block.rows, archive, linenos)
        if batch is None and one_by_one:
            yield from by_line(block.lines())
            return
        if batch is None:
            rows = [(row, lineno) for line, lineno in block.lines() if (row := reference(line, lineno)) is not None]
            batch = _reference_batch([r for r, _ in rows], [n for _, n in rows], archive) if rows else None
        if batch is not None:
            counts.rows += batch.num_rows
            yield batch

    def by_line(lines: Iterable[tuple[bytes, int]]) -> Iterator[pa.RecordBatch]:
        """Lines one at a time: a data line in another JSON spelling is re-written in Go's shape
        (and decoded with its neighbours), anything else goes to the reference."""
        block = _Pending()
        for line, lineno in lines:
            if block.add_line(line, lineno):
                if block.rows >= batch_rows:
                    yield from decode(block, one_by_one=False)
                    block = _Pending()
                continue
            yield from decode(block, one_by_one=False)
            block = _Pending()
            row = reference(line, lineno)
            if row is not None:
                counts.rows += 1
                yield _reference_batch([row], [lineno], archive)
        yield from decode(block, one_by_one=False)

    for first, text, count in read_text(path, max_line_bytes):
        if text is None:  # the reader has dropped it
            yield from decode(pending, one_by_one=True)
            pending = _Pending()
            if not skip_bad:
                raise long_line(name, first, max_line_bytes)
            counts.skipped += 1
            continue
        cut = text.index(b"\n") + 1
        if first == 1 and text.find(_AFTER_TS.tobytes(), 0, cut) < 0:  # a header: by itself
            yield from by_line([(text[:cut - 1], 1)])
            text, first, count = text[cut:], 2, count - 1
        if not text.startswith(_PREFIX):  # another spelling: line by line
            yield from decode(pending, one_by_one=True)
            pending = _Pending()
            yield from by_line(zip(text.split(b"\n")[:-1], itertools.count(first)))
            continue
        while count:  # the usual case: whole blocks as read, checked when decoded
            take = min(count, batch_rows - pending.rows)
            if take < count:  # split at the line that fills the batch
                cut = int(np.flatnonzero(np.frombuffer(text, np.uint8) == ord("\n"))[take - 1]) + 1
                pending.add_text(text[:cut], first, take)
                text, first, count = text[cut:], first + take, count - take
            else:
                pending.add_text(text, first, count)
                count = 0
            if pending.rows >= batch_rows:
                yield from decode(pending, one_by_one=True)
                pending = _Pending()
    yield from decode(pending, one_by_one=True)
