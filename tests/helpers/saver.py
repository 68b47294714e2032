"""Archive files as the saver writes them: records that tell themselves apart, frames, names."""
from __future__ import annotations

import calendar
from pathlib import Path

import zstandard

from tcpinfo.archive.record import decode_line, encode_record

PREFIX = "host_1700000000"
S = 1_000_000_000
T0 = calendar.timegm((2026, 3, 1, 23, 55, 0)) * S   # five minutes before midnight UTC


def line(ts_ns: int, n: int, pad: bytes = b"") -> bytes:
    """A record whose IDM carries `n`, so tests can tell records apart."""
    return encode_record(ts_ns, n.to_bytes(72, "little"), [None, pad])


def frames(path: Path) -> list[bytes]:
    """The decompressed content of each zstd frame of a file, checking every frame's checksum flag."""
    data, out = path.read_bytes(), []
    while data:
        assert zstandard.get_frame_parameters(data).has_checksum
        dobj = zstandard.ZstdDecompressor().decompressobj()
        out.append(dobj.decompress(data))
        data = dobj.unused_data
    return out


def numbers(path: Path) -> list[int]:
    """The `n` of every record in a file (its header left out)."""
    lines = b"".join(frames(path)).splitlines()
    assert decode_line(lines[0]).metadata is not None
    return [int.from_bytes(decode_line(x).raw_idm, "little") for x in lines[1:]]


def files(root: Path) -> list[str]:
    return sorted(str(p.relative_to(root)) for p in root.rglob("*.zst"))
