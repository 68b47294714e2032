"""The C line encoder writes exactly what the Python reference encoder (and upstream) writes."""
import struct

import pytest

from helpers.netlink import raw_netlink_messages
from helpers.paths import ARCHIVES
from tcpinfo.archive.encode import encode_message
from tcpinfo.archive.reader import read_archive
from tcpinfo.archive.record import decode_line, encode_record
from tcpinfo.kernel.inetdiag import split_message


def payload_of(raw_idm: bytes, attributes: list) -> bytes:
    """Rebuilds a kernel message from an archived record (attributes in slot order)."""
    return raw_idm + b"".join(struct.pack("<HH", len(v) + 4, t) + v + bytes(-len(v) % 4)
                              for t, v in enumerate(attributes) if v is not None)


def test_c_encoder_matches_python_encoder_on_all_420_raw_kernel_messages():
    for i, message in enumerate(raw_netlink_messages()):
        payload = message[16:]
        ts = 1_700_000_000_123_456_789 + i * 1_000
        idm, attributes = split_message(payload)
        line, info = encode_message(ts, payload, payload)
        assert line == encode_record(ts, idm, attributes)
        assert info == attributes[2]


@pytest.mark.parametrize("archive", ARCHIVES, ids=lambda p: p.name)
def test_c_encoder_reproduces_upstreams_archived_lines(archive):
    checked = 0
    for _, line in read_archive(str(archive)):
        rec = decode_line(line)
        if rec.raw_idm is None or rec.offset_s != 0 or rec.ts_ns <= 0:
            continue  # headers, 2019 local-offset stamps and zero times: not what the daemon writes
        payload = payload_of(rec.raw_idm, rec.attributes)
        assert encode_message(rec.ts_ns, payload, payload)[0] == bytes(line).rstrip(b"\n") + b"\n"
        checked += 1
    assert checked or archive.name.startswith(("archiveRecords", "finwait2"))


def test_c_encoder_uses_the_given_header_and_rejects_malformed_messages():
    payload = raw_netlink_messages()[0][16:]
    anonymized = payload[:8] + bytes(32) + payload[40:72]
    line, _ = encode_message(1, anonymized, payload)
    assert line == encode_record(1, anonymized, split_message(payload)[1])
    with pytest.raises(ValueError):
        encode_message(1, payload, payload[:72] + struct.pack("<HH", 2, 1))
