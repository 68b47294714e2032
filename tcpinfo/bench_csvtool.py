"""csvtool throughput: rows per second converting a large archive in the default (upstream) schema.

The archive is built from the shared testdata's records, re-encoded with a distinct timestamp,
IDM ``expires`` and tcp_info ``last_data_sent`` per record, so that every row really is decoded and
formatted (as in a real archive) rather than served from csvtool's memo tables.
"""
from __future__ import annotations

import io
import os
import struct
import sys
import tempfile
import time
from pathlib import Path

import zstandard

from .archive import read_archive
from .csvtool import convert
from .inetdiag import INET_DIAG_INFO
from .record import decode_line, encode_record



def testdata_dir() -> Path:
    """The shared testdata: $TCPINFO_TESTDATA, or shared/ beside a source checkout or the cwd."""
    candidates = [Path(os.environ["TCPINFO_TESTDATA"])] if "TCPINFO_TESTDATA" in os.environ else []
    candidates += [Path(__file__).resolve().parents[2] / "shared" / "testdata",
                   Path.cwd().parent / "shared" / "testdata", Path.cwd() / "shared" / "testdata"]
    for path in candidates:
        if any(path.glob("*/*.jsonl.zst")):
            return path
    raise FileNotFoundError("no shared testdata found: set TCPINFO_TESTDATA to shared/testdata")
_U32 = struct.Struct("<I")
_EXPIRES_OFFSET = 52
_LAST_DATA_SENT_OFFSET = 44


def sample_records() -> list:
    """Every data record of the shared testdata archives, decoded."""
    records = []
    for path in sorted(testdata_dir().glob("*/*.jsonl.zst")):
        for _, line in read_archive(str(path)):
            decoded = decode_line(line)
            if decoded.raw_idm is not None:
                records.append(decoded)
    return records


def _patched(raw: bytes, offset: int, value: int) -> bytes:
    buf = bytearray(raw)
    _U32.pack_into(buf, offset, value & 0xFFFFFFFF)
    return bytes(buf)


def write_archive(path: Path, n_records: int, start_ns: int = 1_700_000_000 * 10**9) -> None:
    """Write ``n_records`` distinct records (10 ms apart) as one zstd stream, in bounded memory."""
    records = sample_records()
    cctx = zstandard.ZstdCompressor(level=3)
    with open(path, "wb") as fh, cctx.stream_writer(fh) as out:
        for i in range(n_records):
            rec = records[i % len(records)]
            attrs = list(rec.attributes or [None])
            if len(attrs) > INET_DIAG_INFO and attrs[INET_DIAG_INFO]:
                attrs[INET_DIAG_INFO] = _patched(attrs[INET_DIAG_INFO], _LAST_DATA_SENT_OFFSET, i)
            out.write(encode_record(start_ns + i * 10_000_000, _patched(rec.raw_idm, _EXPIRES_OFFSET, i), attrs))


def run(n_records: int = 200_000) -> dict:
    """Build an archive of ``n_records`` in a temp dir, convert it in-process, time the conversion."""
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "bench.jsonl.zst"
        write_archive(path, n_records)
        sink = io.BytesIO()
        start = time.perf_counter()
        rows, _ = convert([str(path)], sink)
        seconds = time.perf_counter() - start
    return {"rows": rows, "seconds": round(seconds, 3), "rows_per_s": round(rows / seconds)}


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
