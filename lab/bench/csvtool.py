"""csvtool throughput: rows per second converting a large archive in the default (upstream) schema.

The archive replays the records of the repository's tests/testdata with what really moves between
two polls of a busy connection rewritten in every record: the timestamp, the IDM timer and queues, tcp_info's
timers, rtt/rttvar, cwnd, unacked, pacing and delivery rates, byte and segment counters, busy time,
MEMINFO and SKMEMINFO, and BBR's bandwidth and min_rtt.  The low bits of each (enough for a
realistic magnitude) come from a fixed pseudo-random window picked by the record number, so the
archive is deterministic, no two of the first million rows share their tcp_info or memory
attributes, and every row is really decoded and formatted (as in a real archive) rather than
served from csvtool's memo tables.
"""
from __future__ import annotations

import io
import random
import sys
import tempfile
import time
from collections.abc import Iterable
from pathlib import Path

import zstandard

from lab import CHECKOUT
from tcpinfo.archive.reader import read_archive
from tcpinfo.archive.record import decode_line, encode_record
from tcpinfo.csvtool.convert import convert
from tcpinfo.kernel.inetdiag import (
    BBRINFO,
    INET_DIAG_BBRINFO,
    INET_DIAG_INFO,
    INET_DIAG_MEMINFO,
    INET_DIAG_SKMEMINFO,
    MEMINFO,
    SKMEMINFO,
)
from tcpinfo.kernel.tcp import TCP_INFO, Layout


def testdata_dir() -> Path:
    """The checkout's tests/testdata, which the lab always sits beside."""
    path = CHECKOUT / "tests" / "testdata"
    if not any(path.glob("*/*.jsonl.zst")):
        raise FileNotFoundError(f"no test data (*/*.jsonl.zst) in {path}")
    return path


def sample_records() -> list:
    """Every data record of the test data archives, decoded."""
    records = []
    for path in sorted(testdata_dir().glob("*/*.jsonl.zst")):
        for _, line in read_archive(str(path)):
            decoded = decode_line(line)
            if decoded.raw_idm is not None:
                records.append(decoded)
    return records


_IDM_MOVING = ((52, 10), (56, 17), (60, 20))
"""inet_diag_msg members that move, as (offset, low bits that change): expires, rqueue, wqueue."""
_MOVING: dict[int, tuple[Layout, tuple[tuple[str, int], ...]]] = {
    INET_DIAG_INFO: (TCP_INFO, (
        ("unacked", 10), ("last_data_sent", 14), ("last_ack_recv", 14), ("rtt", 18), ("rttvar", 17),
        ("snd_cwnd", 12), ("pacing_rate", 33), ("bytes_acked", 33), ("bytes_received", 30),
        ("segs_out", 23), ("segs_in", 23), ("notsent_bytes", 20), ("data_segs_in", 23),
        ("data_segs_out", 23), ("delivery_rate", 30), ("busy_time", 30), ("delivered", 23),
        ("bytes_sent", 33))),
    INET_DIAG_MEMINFO: (MEMINFO, (("rmem", 20), ("wmem", 20), ("fmem", 20), ("tmem", 20))),
    INET_DIAG_SKMEMINFO: (SKMEMINFO, (("rmem_alloc", 20), ("wmem_alloc", 20), ("fwd_alloc", 20),
                                      ("wmem_queued", 20))),
    INET_DIAG_BBRINFO: (BBRINFO, (("bw", 30), ("min_rtt", 17))),
}
"""Attribute type -> (layout, (member, low bits that change)): what a busy connection moves.
The bit counts give realistic magnitudes (rtt up to ~260 ms, byte counters up to ~8 GB)."""
_NOISE = random.Random(20240601).randbytes(1 << 20)
"""Fixed pseudo-random bytes; record i reads its own window, so the archive is deterministic."""


def _mask(members: Iterable[tuple[int, int]]) -> int:
    """A little-endian bit mask covering the low ``bits`` of each member at ``offset``."""
    return sum(((1 << bits) - 1) << (8 * offset) for offset, bits in members)


def _masks() -> dict[int, int]:
    """Attribute type -> mask of its moving members."""
    out = {}
    for attr_type, (layout, members) in _MOVING.items():
        offsets = {f.name: f.offset for f in layout.fields}
        out[attr_type] = _mask((offsets[name], bits) for name, bits in members)
    return out


def _vary(raw: bytes, mask: int, noise: memoryview) -> bytes:
    """``raw`` with the masked bits replaced by noise (XOR), members past its end untouched.
    Big-integer arithmetic moves every member at once, far faster than one pack per member."""
    n = len(raw)
    flips = int.from_bytes(noise[:n], "little") & mask
    return (int.from_bytes(raw, "little") ^ flips).to_bytes(n, "little")


def write_archive(path: Path, n_records: int, start_ns: int = 1_700_000_000 * 10**9) -> None:
    """Write ``n_records`` distinct records (10 ms apart) as one zstd stream, in bounded memory."""
    records = sample_records()
    masks = _masks()
    idm_mask = _mask(_IDM_MOVING)
    noise = memoryview(_NOISE)
    windows = len(_NOISE) - 1024
    cctx = zstandard.ZstdCompressor(level=3)
    with open(path, "wb") as fh, cctx.stream_writer(fh) as out:
        for i in range(n_records):
            rec = records[i % len(records)]
            window = noise[i * 389 % windows:]
            attrs = [_vary(a, masks[t], window) if a and t in masks else a
                     for t, a in enumerate(rec.attributes or [None])]
            out.write(encode_record(start_ns + i * 10_000_000, _vary(rec.raw_idm, idm_mask, window[512:]),
                                    attrs))


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
