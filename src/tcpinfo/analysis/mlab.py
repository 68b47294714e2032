"""One archive -> one row in M-Lab's published tcpinfo row shape (BigQuery), so their SQL runs.

Origin of the names: M-Lab's published schema (m-lab/website ``_includes/schema_tcprow.md``, the
parser in m-lab/etl), as the project's spec MLAB-ROW.md lists it; docs/mlab-row.md keeps the facts
this module follows.  The names below are theirs, verbatim: they are the contract.  Types are
BigQuery's (INTEGER = int64, TIMESTAMP = microseconds UTC, which ``bq load`` takes from Parquet).

Values are the Go view M-Lab's parser reads, which is exactly what upstream's csvtool prints (its
quirks included: ``WScale`` and ``AppLimited`` are the packed bytes, u64 counters are int64, a
short struct is zero-padded, an absent scalar is 0, an absent struct null).  So the rows come from
``upstream_csv``'s converter (its C loop) and are re-typed from its CSV text by pyarrow: one
implementation of the Go view.
"""
from __future__ import annotations

import io
from collections.abc import Iterator

import orjson
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv

from tcpinfo import __version__
from tcpinfo.analysis.snapshots import Counts
from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, read_text
from tcpinfo.archive.record import parse_time
from tcpinfo.csvtool.convert import BadInput, long_line
from tcpinfo.csvtool.upstream import GROUPS, METADATA_TIME, UPSTREAM_HEADER, UpstreamConverter

TIMESTAMP = pa.timestamp("us", tz="UTC")
INT = pa.int64()
STR = pa.string()


def _record(names: str, typ: pa.DataType = INT) -> list[pa.Field]:
    return [pa.field(n, typ) for n in names.split()]


TCPINFO_NAMES = """State CAState Retransmits Probes Backoff Options WScale AppLimited RTO ATO SndMSS
RcvMSS Unacked Sacked Lost Retrans Fackets LastDataSent LastAckSent LastDataRecv LastAckRecv PMTU
RcvSsThresh RTT RTTVar SndSsThresh SndCwnd AdvMSS Reordering RcvRTT RcvSpace TotalRetrans PacingRate
MaxPacingRate BytesAcked BytesReceived SegsOut SegsIn NotsentBytes MinRTT DataSegsIn DataSegsOut
DeliveryRate BusyTime RWndLimited SndBufLimited Delivered DeliveredCE BytesSent BytesRetrans DSackDups
ReordSeen"""
RECORDS = {  # CSV group prefix -> (Snapshot field, member names in kernel order)
    "TCP": ("TCPInfo", TCPINFO_NAMES),
    "MemInfo": ("MemInfo", "Rmem Wmem Fmem Tmem"),
    "SKMemInfo": ("SocketMem", "RmemAlloc Rcvbuf WmemAlloc Sndbuf FwdAlloc WmemQueued Optmem Backlog Drops"),
    "Vegas": ("VegasInfo", "Enabled RTTCount RTT MinRTT"),
    "DCTCP": ("DCTCPInfo", "Enabled CEState Alpha ABEcn ABTot"),
    "BBR": ("BBRInfo", "BW MinRTT PacingGain CwndGain"),
}
IDM_NAMES = "IDiagFamily IDiagState IDiagTimer IDiagRetrans IDiagExpires IDiagRqueue IDiagWqueue IDiagUID IDiagInode"
_IDM_CSV = ["IDM.Family", "IDM.State", "IDM.Timer", "IDM.Retrans", "IDM.Expires", "IDM.Rqueue",
            "IDM.Wqueue", "IDM.UID", "IDM.Inode"]
_SCALARS = ["TOS", "TClass", "ClassID", "Shutdown", "Protocol", "Mark"]

SNAPSHOT = pa.struct(
    [pa.field("Timestamp", TIMESTAMP), pa.field("Observed", INT), pa.field("NotFullyParsed", INT),
     pa.field("InetDiagMsg", pa.struct(_record(IDM_NAMES))), pa.field("CongestionAlgorithm", STR)]
    + _record(" ".join(_SCALARS))
    + [pa.field(field, pa.struct(_record(names))) for field, names in RECORDS.values()]
)
_GEO = pa.struct(_record("continent_code country_code country_code3 country_name region", STR)
                 + _record("metro_code area_code") + _record("city postal_code", STR)
                 + _record("latitude longitude", pa.float64()) + _record("radius"))
_NETWORK = pa.struct([pa.field("IPPrefix", STR),
                      pa.field("Systems", pa.list_(pa.struct([pa.field("ASNs", pa.list_(INT))])))])
_ENDPOINT = pa.struct([pa.field("IP", STR), pa.field("Port", INT), pa.field("IATA", STR),
                       pa.field("Geo", _GEO), pa.field("Network", _NETWORK)])
SCHEMA = pa.schema([
    pa.field("UUID", STR), pa.field("TestTime", TIMESTAMP),
    pa.field("ClientASN", INT), pa.field("ServerASN", INT),
    pa.field("ParseInfo", pa.struct([pa.field("TaskFileName", STR), pa.field("ParseTime", TIMESTAMP),
                                     pa.field("ParserVersion", STR), pa.field("Filename", STR)])),
    pa.field("SockID", pa.struct(_record("SPort DPort") + _record("SrcIP DstIP", STR)
                                 + _record("Interface Cookie"))),
    pa.field("Server", _ENDPOINT), pa.field("Client", _ENDPOINT),
    pa.field("FinalSnapshot", SNAPSHOT), pa.field("Snapshots", pa.list_(SNAPSHOT)),
    pa.field("date", pa.date32()),
])
"""M-Lab's row, plus ``date`` (TestTime's UTC date; the Hive partition, as M-Lab partitions)."""

_STRINGS = {"Timestamp", "IDM.SockID.Src", "IDM.SockID.Dst", "IDM.SockID.Cookie", "CongestionAlgorithm"}
_CSV_TYPES = {f"f{i}": (STR if name in _STRINGS else INT) for i, name in enumerate(UPSTREAM_HEADER)}
_GO_ZERO_US = -62135596800 * 10**6
"""Go's zero time.Time (0001-01-01T00:00:00Z) in Unix microseconds."""


def _snapshots(csv_text: bytes) -> pa.StructArray:
    """The Snapshot structs of upstream CSV rows (no header line)."""
    table = pacsv.read_csv(
        io.BytesIO(csv_text),
        read_options=pacsv.ReadOptions(autogenerate_column_names=True, block_size=1 << 22),
        convert_options=pacsv.ConvertOptions(column_types=_CSV_TYPES, strings_can_be_null=False))
    by_index = [table.column(i).combine_chunks() for i in range(len(UPSTREAM_HEADER))]
    col = dict(zip(UPSTREAM_HEADER, by_index))  # (the groups' columns are taken by position)
    times = col["Timestamp"]
    # upstream prints a zero Timestamp as its metadata date; M-Lab's parser keeps Go's zero time
    zero = pc.equal(times, METADATA_TIME)
    ns = pc.if_else(zero, pa.scalar(None, STR), times).cast(pa.timestamp("ns", tz="UTC"))
    times = pc.if_else(zero, pa.scalar(_GO_ZERO_US, TIMESTAMP), ns.cast(TIMESTAMP, safe=False))
    fields = [times, col["Observed"], col["NotFullyParsed"],
              pa.StructArray.from_arrays([col[c] for c in _IDM_CSV], IDM_NAMES.split()),
              col["CongestionAlgorithm"]] + [col[c] for c in _SCALARS]
    start = UPSTREAM_HEADER.index("Mark") + 1
    for g in GROUPS:
        if g.layout is None:
            continue
        field, names = RECORDS[g.prefix]
        members = names.split()
        arrays = by_index[start:start + len(members)]
        fields.append(pa.StructArray.from_arrays(arrays, members, mask=arrays[0].is_null()))
        start += len(g.layout.go_names)
    return pa.StructArray.from_arrays(fields, fields=list(SNAPSHOT))


def _ns(text: object) -> int | None:
    try:
        return parse_time(text)[0] if type(text) is str else None
    except ValueError:
        return None


def _signed64(value: int) -> int:
    return value - (1 << 64) if value >= 1 << 63 else value


def archive_row(path: str, counts: Counts | None = None, *, parse_time_ns: int, skip_bad: bool = False,
                max_line_bytes: int = MAX_LINE_BYTES, source: str | None = None) -> pa.RecordBatch:
    """The one-row batch (``SCHEMA``) of one archive; ``parse_time_ns`` is ParseInfo.ParseTime.

    Bad input raises ``BadInput`` unless ``skip_bad`` (counted in ``counts.skipped``); an
    unreadable file raises ArchiveError.  Memory holds this archive's snapshots (one row is one
    archive, as in M-Lab's table).
    """
    counts = counts if counts is not None else Counts()
    name = "<stdin>" if path == STDIN else path
    converter = UpstreamConverter()
    out = io.BytesIO()
    metadata: dict = {}
    rows = 0
    for lineno, text, _ in read_text(path, max_line_bytes):
        if text is None:
            if not skip_bad:
                raise long_line(name, lineno, max_line_bytes)
            counts.skipped += 1
            continue
        pos = 0
        while True:
            pos, written = converter.write_rows(text, pos, out)
            rows, lineno = rows + written, lineno + written
            if pos == len(text):
                break
            end = text.index(b"\n", pos)
            line = text[pos:end]
            try:
                row = converter.row(line)
            except (ValueError, OverflowError) as exc:
                if not skip_bad:
                    raise BadInput(f"{name}:{lineno}: {exc}") from None
                counts.skipped += 1
            else:
                obj = orjson.loads(line)  # valid: row() parsed it
                if obj.get("Metadata") is not None and not metadata:
                    metadata = obj["Metadata"]
                if obj.get("RawIDM") is not None:
                    out.write(row.encode("utf-8", "surrogateescape") + b"\n")
                    rows += 1
            pos, lineno = end + 1, lineno + 1
    counts.rows += rows
    snaps = _snapshots(out.getvalue()) if rows else pa.array([], SNAPSHOT)
    start_ns = _ns(metadata.get("StartTime"))
    first_idm = None
    if rows:
        first = out.getvalue().split(b"\n", 1)[0].decode("utf-8", "surrogateescape").split(",")
        cell = dict(zip(UPSTREAM_HEADER, first))
        first_idm = {"SPort": int(cell["IDM.SockID.SPort"]), "DPort": int(cell["IDM.SockID.DPort"]),
                     "SrcIP": cell["IDM.SockID.Src"], "DstIP": cell["IDM.SockID.Dst"],
                     "Interface": int(cell["IDM.SockID.Interface"]),
                     "Cookie": _signed64(int(cell["IDM.SockID.Cookie"], 16))}
    source = source if source is not None else name
    values = {
        "UUID": [str(metadata["UUID"]) if "UUID" in metadata else None],
        "TestTime": [None if start_ns is None else start_ns // 1000],
        "ClientASN": [None], "ServerASN": [None],
        "ParseInfo": [{"TaskFileName": source, "ParseTime": parse_time_ns // 1000,
                       "ParserVersion": f"tcpinfo {__version__}", "Filename": source.rsplit("/", 1)[-1]}],
        "SockID": [first_idm], "Server": [None], "Client": [None],
    }
    arrays = [pa.array(values[f.name], f.type) for f in SCHEMA if f.name in values]
    arrays.append(snaps[len(snaps) - 1:] if rows else pa.nulls(1, SNAPSHOT))
    arrays.append(pa.ListArray.from_arrays(pa.array([0, len(snaps)], pa.int32()), snaps))
    first_time = snaps.field("Timestamp")[0].value if rows else None
    if start_ns is not None:
        arrays.append(arrays[1].cast(pa.date32()))
    elif first_time is not None and first_time != _GO_ZERO_US:
        arrays.append(snaps.field("Timestamp")[:1].cast(pa.date32()))
    else:
        arrays.append(pa.nulls(1, pa.date32()))
    return pa.RecordBatch.from_arrays(arrays, schema=SCHEMA)


def archive_batches(path: str, counts: Counts | None = None, **kw) -> Iterator[pa.RecordBatch]:
    """``archive_row`` as an iterator, the shape the export driver takes."""
    yield archive_row(path, counts, **kw)
