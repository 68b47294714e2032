"""One archive's lines -> Arrow record batches of the snapshots shape (one row per snapshot).

The columns are the modern schema's (``tcpinfo.modern``, what ``csvtool --schema modern``
prints) with ``.`` written ``_`` (``tcp.rtt`` -> ``tcp_rtt``: SQL needs no quoting), each typed
as the kernel's struct member (uint8 ... uint64), null where the kernel did not send it, plus
the archive's UUID, host and Metadata and where each row came from.

``archive_batches`` is a pure function of one archive (a path or ``-``): a Spark job can run it
per file (``mapInArrow``) and gets exactly what ``tcpinfo export`` writes.  Speed comes from
decoding columns, not rows: each line is parsed (orjson) and its base64 decoded in a tight loop,
then a batch's attributes are decoded at once per type (numpy views of the kernel structs).  A
line that is not in the shape Go's encoder writes takes the reference path (``modern_fields``),
which is also where bad input gets csvtool's one-line errors.
"""
from __future__ import annotations

import binascii
import re
import struct
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import orjson
import pyarrow as pa
import pyarrow.compute as pc

from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, read_text
from tcpinfo.archive.record import ZERO_TIME, parse_time
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
"""Rows per record batch (and Parquet row group): one batch of lines and their decoded
attributes as Python objects is ~40 MB, so memory stays flat whatever the input."""

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


_B64 = np.full(256, 255, np.uint8)
for _i, _c in enumerate(b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/"):
    _B64[_c] = _i
_PAD = ord("=")


def _b64_matrix(values: list[str]) -> tuple[np.ndarray, np.ndarray] | None:
    """Strict standard base64 of equal-length strings, decoded at once: (rows x bytes matrix,
    each row's length), or None if any is not valid padded base64 (the reference then says
    which).  Bytes past a row's length are not zero (the padding's)."""
    width = len(values[0])
    if width % 4:
        return None
    try:
        text = "".join(values).encode("ascii")
    except (TypeError, UnicodeEncodeError):
        return None
    if len(text) != width * len(values):
        return None
    chars = np.frombuffer(text, np.uint8).reshape(len(values), width)
    if not width:
        return np.zeros((len(values), 0), np.uint8), np.zeros(len(values), np.int64)
    pads = (chars[:, -1] == _PAD).astype(np.int64) + (chars[:, -2] == _PAD)
    sextets = _B64[chars]
    bad = sextets == 255
    bad[:, -1] &= chars[:, -1] != _PAD
    bad[:, -2] &= ~((chars[:, -2] == _PAD) & (chars[:, -1] == _PAD))
    if bad.any():
        return None
    sextets[sextets == 255] = 0
    q = sextets.reshape(len(values), width // 4, 4).astype(np.uint32)
    triples = q[..., 0] << 18 | q[..., 1] << 12 | q[..., 2] << 6 | q[..., 3]
    out = np.empty((len(values), width // 4, 3), np.uint8)
    out[..., 0], out[..., 1], out[..., 2] = triples >> 16, triples >> 8 & 255, triples & 255
    return out.reshape(len(values), -1), width // 4 * 3 - pads


class _Block:
    """Lines of one archive collected for one batch, decoded column-wise by ``batch``."""

    def __init__(self) -> None:
        self.lines: list[bytes] = []
        self.linenos: list[int] = []
        self.times: list[str] = []
        self.idms: list[str] = []
        self.attrs: list[list] = []

    def add(self, line: bytes, lineno: int) -> bool:
        """Takes a data line of the shape Go's encoder writes (three keys of the right JSON
        types); False leaves it to the reference.  Values are checked by ``batch``."""
        try:
            obj = orjson.loads(line)
            if len(obj) != 3:
                return False
            ts, raw, attributes = obj["Timestamp"], obj["RawIDM"], obj["Attributes"]
        except (orjson.JSONDecodeError, KeyError, TypeError):
            return False
        if type(ts) is not str or type(raw) is not str or type(attributes) is not list:
            return False
        self.times.append(ts)
        self.idms.append(raw)
        self.attrs.append(attributes)
        self.lines.append(line)
        self.linenos.append(lineno)
        return True

    def __len__(self) -> int:
        return len(self.idms)

    def batch(self, archive: _Archive) -> pa.RecordBatch | None:
        """The block's rows, or None if a value needs the reference path (then the caller
        converts the block's lines one by one, which reports bad input)."""
        n = len(self.idms)
        cols: dict[str, pa.Array] = {}
        times = pa.array(self.times, pa.string())
        if not pc.all(pc.match_substring_regex(times, _TIME_PATTERN)).as_py():
            return None
        times = pc.if_else(pc.equal(times, ZERO_TIME), pa.scalar(None, pa.string()), times)
        try:
            cols["timestamp"] = times.cast(pa.timestamp("ns", tz="UTC"))
        except (pa.ArrowInvalid, pa.ArrowNotImplementedError):
            return None
        decoded = _b64_matrix(self.idms) if len(set(map(len, self.idms))) == 1 else None
        if decoded is None or (decoded[1] < IDM_LEN).any():
            return None
        raw = np.ascontiguousarray(decoded[0][:, :IDM_LEN])
        idm = raw.view(_IDM_DTYPE).reshape(n)
        for name, (_, code, _) in _IDM_INTS.items():
            if name != "interface_be":
                cols[f"idm_{name}"] = pa.array(idm[name].astype(_NUMPY_INT[code]))  # native order
        cols["idm_state_name"] = _STATE_NAMES.take(pa.array(idm["state"]))
        for name, off in _IDM_ADDR.items():
            cols[f"idm_{name}"] = _addresses(raw, off, raw[:, _IDM_INTS["family"][0]])
        attrs = self.attrs
        width = max(map(len, attrs))
        if any(len(a) != width for a in attrs):
            attrs = [a if len(a) == width else a + [None] * (width - len(a)) for a in attrs]
        for t, column_t in enumerate(zip(*attrs)):
            values = [v for v in column_t if v is not None]
            if not values:
                continue
            rows = None if len(values) == n else [i for i, v in enumerate(column_t) if v is not None]
            if not self._attribute(cols, n, t, rows, values):
                return None
        return _assemble(cols, n, archive, self.linenos)

    @staticmethod
    def _attribute(cols: dict, n: int, t: int, rows: list[int] | None, values: list[str]) -> bool:
        """The columns of attribute type ``t`` (``rows``: where present, None = everywhere);
        False if a value needs the reference path."""
        if t in (INET_DIAG_CONG, INET_DIAG_SOCKOPT):
            texts: list[str | None] = []
            for v in values:
                text = _TEXT_MEMO.get((t, v), _UNSEEN)
                if text is _UNSEEN:
                    try:
                        value = binascii.a2b_base64(v, strict_mode=True)
                    except (TypeError, ValueError):
                        return False
                    if t == INET_DIAG_CONG:
                        if not value:
                            return False
                        text = _cong(value)
                    else:
                        st = _SCALARS[t][1]
                        text = ("|".join(sockopt_names(st.unpack_from(value)[0]))
                                if len(value) >= st.size else None)  # too short: absent
                    if len(_TEXT_MEMO) > 4096:
                        _TEXT_MEMO.clear()
                    _TEXT_MEMO[(t, v)] = text
                texts.append(text)  # type: ignore[arg-type]
            name = "cong" if t == INET_DIAG_CONG else _SCALARS[t][0]
            cols[name] = _scatter_objects(n, rows, texts, pa.string())
            return True
        widths = set(map(len, values))
        if len(widths) == 1:
            decoded = _b64_matrix(values)
            if decoded is None:
                return False
            matrix, lengths = decoded
        else:  # values of several lengths (archives of mixed kernels): one matrix per length
            by_width: dict[int, list[int]] = {}
            for i, v in enumerate(values):
                by_width.setdefault(len(v), []).append(i)
            matrix = np.zeros((len(values), max(widths) // 4 * 3), np.uint8)
            lengths = np.zeros(len(values), np.int64)
            for group in by_width.values():
                decoded = _b64_matrix([values[i] for i in group])
                if decoded is None:
                    return False
                idx = np.asarray(group)
                matrix[idx, :decoded[0].shape[1]] = decoded[0]
                lengths[idx] = decoded[1]
        if t in _STRUCTS:
            prefix, layout, dtype = _STRUCTS[t]
            _struct_columns(cols, n, rows, matrix, lengths, prefix, layout, dtype)
        elif t in _SCALARS:
            name, _, dtype = _SCALARS[t]
            _struct_columns(cols, n, rows, matrix, lengths, name, None, dtype)
        return True


_UNSEEN = object()
_TEXT_MEMO: dict[tuple[int, str], str | None] = {}
"""CONG and SOCKOPT text by (type, base64 value): a handful of distinct values per archive."""


def _cong(raw: bytes) -> str:
    """CONG as text; Parquet strings are UTF-8, so undecodable bytes become U+FFFD."""
    return congestion_name(raw).encode("utf-8", "surrogateescape").decode("utf-8", "replace")


_STATE_NAMES = pa.array([state_name(i) for i in range(256)], pa.string())


def _addresses(raw: np.ndarray, offset: int, family: np.ndarray) -> pa.Array:
    """ip_string of each row's 16 address bytes, formatted once per distinct (family, address)."""
    keys = np.ascontiguousarray(np.concatenate([family[:, None], raw[:, offset:offset + 16]], axis=1))
    unique, inverse = np.unique(keys.view(np.dtype((np.void, 17))).ravel(), return_inverse=True)
    texts = [ip_string(u.tobytes()[1:], u.tobytes()[0]) for u in unique]
    return pa.array(texts, pa.string()).take(pa.array(inverse.ravel()))


def _struct_columns(cols: dict, n: int, rows: list[int] | None, matrix: np.ndarray, lengths: np.ndarray,
                    prefix: str, layout: Layout | None, dtype: np.dtype) -> None:
    """Columns of one attribute type from its decoded values (``matrix`` rows, ``lengths``):
    each member is null where the value is absent or too short to hold it (``Layout.decode``'s
    rule; a scalar is one member named ``v``, its column named ``prefix``)."""
    size = dtype.itemsize
    padded = np.zeros((len(matrix), size), np.uint8)
    width = min(size, matrix.shape[1])
    padded[:, :width] = matrix[:, :width]
    decoded = padded.view(dtype).reshape(len(matrix))
    idx = None if rows is None else np.asarray(rows)
    fields = layout.fields if layout is not None else ()
    members = [(f.name, f.offset + struct.calcsize(f.fmt)) for f in fields] or [("v", size)]
    for name, end in members:
        values = decoded[name]
        absent = lengths < end
        parts = layout.bitfields.get(name) if layout is not None else None
        outputs = ([(f"{prefix}_{sub}", ((values >> shift) & ((1 << width) - 1)).astype(np.uint8))
                    for sub, shift, width in parts] if parts else
                   [(f"{prefix}_{name}" if layout is not None else prefix,
                     values.astype(values.dtype.newbyteorder("=")))])
        for col, vals in outputs:
            if idx is None:
                full, mask = vals, absent
            else:
                full = np.zeros(n, vals.dtype)
                full[idx] = vals
                mask = np.ones(n, bool)
                mask[idx] = absent
            cols[col] = pa.array(full, mask=mask if mask.any() else None)


def _scatter_objects(n: int, rows: list[int] | None, values: list, typ: pa.DataType) -> pa.Array:
    if rows is None:
        return pa.array(values, typ)
    full: list = [None] * n
    for i, v in zip(rows, values):
        full[i] = v
    return pa.array(full, typ)


def _assemble(cols: dict[str, pa.Array], n: int, archive: _Archive, linenos: list[int]) -> pa.RecordBatch:
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
    table = pa.RecordBatch.from_pylist(rows, schema=pa.schema([f for f in SCHEMA if f.name in _MODERN_COLUMNS]))
    cols = {name: table.column(name) for name in table.schema.names}
    return _assemble(cols, len(rows), archive, linenos)


_MODERN_COLUMNS = frozenset(column(n) for n in MODERN_HEADER)


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
    block = _Block()

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

    def flush() -> Iterator[pa.RecordBatch]:
        nonlocal block
        if not len(block):
            return
        batch = block.batch(archive)
        if batch is None:  # a value the vectorised path does not take: line by line
            rows = [(row, lineno) for line, lineno in zip(block.lines, block.linenos)
                    if (row := reference(line, lineno)) is not None]
            batch = _reference_batch([r for r, _ in rows], [n for _, n in rows], archive) if rows else None
        block = _Block()
        if batch is not None:
            counts.rows += batch.num_rows
            yield batch

    for first, text in read_text(path, max_line_bytes):
        if text is None:  # the reader has dropped it
            if not skip_bad:
                raise long_line(name, first, max_line_bytes)
            counts.skipped += 1
            continue
        lines = text.split(b"\n")
        lines.pop()
        for lineno, line in enumerate(lines, first):
            if block.add(line, lineno):
                if len(block) >= batch_rows:
                    yield from flush()
                continue
            yield from flush()
            row = reference(line, lineno)
            if row is not None:
                counts.rows += 1
                yield _reference_batch([row], [lineno], archive)
    yield from flush()
