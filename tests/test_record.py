"""ArchivalRecord JSON lines: byte-exact re-encoding of upstream's archives, times, errors."""
from __future__ import annotations

from pathlib import Path

import pytest

from helpers.netlink import raw_netlink_messages
from helpers.paths import ARCHIVES, TESTDATA
from tcpinfo.archive.reader import read_archive
from tcpinfo.archive.record import (
    ZERO_TIME,
    ZERO_TIME_NS,
    decode_line,
    encode_header,
    encode_record,
    format_time,
    parse_time,
)
from tcpinfo.kernel.inetdiag import split_message


def reencode(line: bytes) -> bytes:
    d = decode_line(line)
    if d.metadata is not None:
        meta = dict(d.metadata)
        uuid, seq, start = meta.pop("UUID"), meta.pop("Sequence"), meta.pop("StartTime")
        start_ns, offset = parse_time(start)
        return encode_header(uuid, seq, start_ns, meta, offset_s=offset)
    return encode_record(d.ts_ns, d.raw_idm, d.attributes, offset_s=d.offset_s)


@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: p.name)
def test_decode_then_encode_reproduces_every_archive_line_byte_for_byte(archive: Path) -> None:
    lines = [line for _, line in read_archive(str(archive))]
    assert lines
    for line in lines:
        assert reencode(line) == line + b"\n"


def test_split_raw_netlink_messages_encode_to_the_archived_records() -> None:
    # archiveRecords.jsonl.zst holds the same 420 messages, in order, with zero timestamps.
    archived = [line + b"\n" for _, line in read_archive(str(TESTDATA / "mlab" / "archiveRecords.jsonl.zst"))]
    encoded = [encode_record(ZERO_TIME_NS, *split_message(m[16:])) for m in raw_netlink_messages()]
    assert encoded == archived


def test_header_line_has_upstream_key_order_then_extra_keys() -> None:
    line = encode_header("host_1_00000000000003E8", 183, parse_time("2019-04-01T07:42:37.371Z")[0],
                         {"Kernel": "6.18", "TCPInfoLen": 280})
    assert line == (b'{"Timestamp":"0001-01-01T00:00:00Z","Metadata":{"UUID":"host_1_00000000000003E8",'
                    b'"Sequence":183,"StartTime":"2019-04-01T07:42:37.371Z","Kernel":"6.18","TCPInfoLen":280}}\n')


def test_header_escapes_html_characters_like_go() -> None:
    assert b'"UUID":"a\\u003cb\\u003e\\u0026c"' in encode_header("a<b>&c", 0, 0)


def test_present_empty_attribute_is_empty_string_and_absent_is_null() -> None:
    line = encode_record(0, bytes(72), [None, b"", b"\x00"])
    assert line.endswith(b'"Attributes":[null,"","AA=="]}\n')
    assert decode_line(line).attributes == [None, b"", b"\x00"]


@pytest.mark.parametrize("text", [
    ZERO_TIME, "2019-07-01T00:00:12.092Z", "2019-08-26T19:55:42.754686952-04:00",
    "2026-11-22T03:11:26.77022998Z", "2020-02-29T23:59:59+05:30", "1969-12-31T23:59:59.5Z",
])
def test_format_time_inverts_parse_time_for_go_formatted_times(text: str) -> None:
    assert format_time(*parse_time(text)) == text


def test_format_time_trims_fraction_zeros_and_prints_utc_as_z() -> None:
    assert format_time(1_500_000_000_120_000_000) == "2017-07-14T02:40:00.12Z"
    assert format_time(1_500_000_000 * 10**9) == "2017-07-14T02:40:00Z"
    assert format_time(0, -4 * 3600) == "1969-12-31T20:00:00-04:00"


def test_parse_time_normalises_offsets_to_utc_nanoseconds() -> None:
    assert parse_time("2019-08-26T19:55:42.754686952-04:00") == (1566863742754686952, -14400)
    assert parse_time("2019-08-26T23:55:42.754686952+00:00") == (1566863742754686952, 0)
    assert parse_time(ZERO_TIME) == (ZERO_TIME_NS, 0)


@pytest.mark.parametrize("text", ["", "2019-07-01", "2019-13-01T00:00:00Z", "2019-02-29T00:00:00Z",
                                  "2019-07-01T24:00:00Z", "2019-07-01T00:00:00", "2019-07-01T00:00:00+1:00"])
def test_parse_time_rejects_malformed_timestamps(text: str) -> None:
    with pytest.raises(ValueError):
        parse_time(text)


@pytest.mark.parametrize("line, message", [
    (b"nope", "not JSON"),
    (b"[1]", "expected a JSON object"),
    (b'{"Timestamp":5}', "Timestamp: expected a string"),
    (b'{"RawIDM":7}', "RawIDM: expected a base64 string"),
    (b'{"RawIDM":"@@@@"}', "RawIDM: bad base64"),
    (b'{"Attributes":{}}', "Attributes: expected an array"),
    (b'{"Attributes":[null,1]}', "Attributes[1]: expected a base64 string"),
    (b'{"Metadata":[]}', "Metadata: expected an object"),
])
def test_decode_line_reports_wrong_types_and_bad_base64(line: bytes, message: str) -> None:
    with pytest.raises(ValueError, match=message.replace("[", r"\[")):
        decode_line(line)
