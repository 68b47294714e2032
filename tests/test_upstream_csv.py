"""Upstream's schema in-process: the C loop and the Python reference converter print the same rows."""
from __future__ import annotations

import base64
import io
import json
import random
from pathlib import Path

import orjson
import pytest

from helpers.csvtool import expected_csv
from helpers.paths import ARCHIVES
from tcpinfo.archive.reader import read_archive
from tcpinfo.archive.record import ZERO_TIME, ZERO_TIME_NS, format_time
from tcpinfo.csvtool.convert import convert_file
from tcpinfo.csvtool.upstream import GROUPS, UpstreamConverter
from tcpinfo.kernel.inetdiag import INET_DIAG_CONG, MAX_ATTR_TYPE


def line(ts: str, idm: bytes, attrs: list[bytes | None] | None) -> bytes:
    """An archive line in the shape Go's encoder writes."""
    obj: dict[str, object] = {"Timestamp": ts, "RawIDM": base64.b64encode(idm).decode()}
    if attrs is not None:
        obj["Attributes"] = [None if a is None else base64.b64encode(a).decode() for a in attrs]
    return orjson.dumps(obj)


def c_row(converter: UpstreamConverter, data: bytes) -> bytes | None:
    """The C loop's row for one line, or None if it declined the line."""
    out = io.BytesIO()
    pos, rows = converter.write_rows(data + b"\n", 0, out)
    assert (pos, rows) in ((0, 0), (len(data) + 1, 1))
    return out.getvalue() if rows else None


def python_row(converter: UpstreamConverter, data: bytes) -> bytes | None:
    """The reference converter's row, or None if it rejects the line."""
    try:
        return (converter.row(data) + "\n").encode("utf-8", "surrogateescape")
    except ValueError:
        return None


@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: p.name)
def test_reference_converter_alone_is_byte_identical_to_upstream(archive: Path) -> None:
    converter = UpstreamConverter()
    rows = [converter.row(data) + "\n" for _, data in read_archive(str(archive))]
    assert "".join(rows).encode() == expected_csv(archive).split(b"\n", 1)[1]


def test_small_output_buffer_grows_and_resumes_without_losing_rows() -> None:
    converter = UpstreamConverter(out_size=100)  # less than one row's worst case
    out = io.BytesIO()
    convert_file(converter, str(ARCHIVES[0]), out, skip_bad=False)
    assert out.getvalue() == expected_csv(ARCHIVES[0]).split(b"\n", 1)[1]


# --- generated lines: every corner the C loop must either print like Python or decline ----------

def _timestamp(rng: random.Random) -> str:
    """RFC 3339 text: half as Go prints it, half of odd dates, fractions and offsets."""
    if rng.random() < 0.05:
        return ZERO_TIME
    if rng.random() < 0.5:
        return format_time(rng.randrange(ZERO_TIME_NS, 253402300800 * 10**9), rng.choice([0, 0, 19800, -14400]))
    year = rng.choice([1, 1, 4, 1900, 2000, 2019, 2024, 9999, 0])
    month, day = rng.choice([(1, 1), (2, 28), (2, 29), (2, 30), (12, 31), (4, 31), (13, 1), (6, 0)])
    hh, mm, ss = rng.choice([0, 9, 23, 24]), rng.choice([0, 59, 60]), rng.choice([0, 30, 59, 60])
    fraction = rng.choice(["", ".", ".5", ".50", ".123456789", ".1234567890", ".000000001", ".000"])
    suffix = rng.choice(["Z", "Z", "+00:00", "-00:00", "+05:30", "-04:00", "+23:59", "+24:00", "+01:60", "z"])
    return f"{year:04d}-{month:02d}-{day:02d}T{hh:02d}:{mm:02d}:{ss:02d}{fraction}{suffix}"


def _address(rng: random.Random) -> bytes:
    shape = rng.randrange(5)
    if shape == 0:
        return bytes(16)
    if shape == 1:  # IPv4 in the first four bytes
        return rng.randbytes(4) + bytes(12)
    if shape == 2:  # v4-mapped
        return bytes(10) + b"\xff\xff" + rng.randbytes(4)
    if shape == 3:  # zero runs of every length and position
        return b"".join(rng.choice([b"\0\0", rng.randbytes(2)]) for _ in range(8))
    return rng.randbytes(16)


def _idm(rng: random.Random) -> bytes:
    family = rng.choice([2, 10, 10, 0, 44]).to_bytes(1, "little")
    size = rng.choice([72] * 8 + [80, 71])
    head = family + rng.randbytes(7) + _address(rng) + _address(rng) + rng.randbytes(32)
    return (head + rng.randbytes(8))[:size]


_CONG_NAMES = [b"cubic\0", b"bbr\0", b"cubic\0", b"bbr\0", b"x", b"\0", b"", b"a,b\0", b'q"\0', b" sp\0",
               b"\\.\0", b"r\xc3\xa9no\0", b"dctcp", b"nul\0in\0"]


def _value(rng: random.Random, attr_type: int) -> bytes:
    if attr_type == INET_DIAG_CONG:
        return rng.choice(_CONG_NAMES)
    group = next((g for g in GROUPS if g.type == attr_type), None)
    sizes = [0, 1, 3, 4, 5, 8]
    if group is not None and group.layout is not None:
        go = group.layout.go_struct.size
        sizes += [go - 1, go, go + 4, group.layout.size, group.layout.size + 16]
    # Bytes of 0x00 and 0xFF often, so signed members hit -1 and the extremes.
    return bytes(rng.choice([0, 0xFF, rng.randrange(256)]) for _ in range(rng.choice(sizes)))


def _attributes(rng: random.Random) -> list[bytes | None] | None:
    if rng.random() < 0.1:
        return rng.choice([None, []])
    count = rng.choice([3, 9, 17, MAX_ATTR_TYPE + 1, 45])
    return [_value(rng, t) if rng.random() < 0.6 else None for t in range(count)]


def test_c_loop_prints_every_line_it_takes_exactly_as_the_reference_converter() -> None:
    rng = random.Random(7)
    converter = UpstreamConverter()
    taken = 0
    for _ in range(20_000):
        data = line(_timestamp(rng), _idm(rng), _attributes(rng))
        c, py = c_row(converter, data), python_row(converter, data)
        if c is not None:
            taken += 1
            assert c == py, data
    assert taken > 2_000  # the C loop is really exercised, not just declining


def test_lines_in_other_json_shapes_give_the_same_rows_through_python() -> None:
    converter = UpstreamConverter()
    for _, data in list(read_archive(str(ARCHIVES[0])))[1:50]:
        canonical = c_row(converter, data)
        assert canonical is not None
        obj = orjson.loads(data)
        reordered = {"Attributes": obj["Attributes"], "RawIDM": obj["RawIDM"], "Timestamp": obj["Timestamp"]}
        key = b'"RawIDM":"'
        at = data.index(key) + len(key)
        escaped = data[:at] + b"\\u%04x" % data[at] + data[at + 1:]  # the same string, one escape
        for variant in (json.dumps(obj).encode(), orjson.dumps(reordered), data + b" ", escaped):
            assert c_row(converter, variant) is None
            assert python_row(converter, variant) == canonical
