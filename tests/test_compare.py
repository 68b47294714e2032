"""The C core's Compare follows upstream's rules (UPSTREAM.md 3.3) on real kernel messages,
whether the table keeps each connection's last message or only its image (struct image), and
for an image whether the poll tells the change without a walk (the layout is the same) or walks."""
import struct

import pytest

from helpers.netlink import raw_netlink_messages
from tcpinfo.collector.poller import COMPARE_BY, compare

NO_CHANGE, STATE, NO_TCPINFO, NEW_ATTR, LOST_ATTR, ATTR_LEN, COUNTERS, OTHER = 0, 1, 2, 3, 4, 5, 6, 9
INFO, MEMINFO, CONG, TOS = 2, 1, 4, 5


def rtattrs(payload: bytes) -> list[tuple[int, bytes]]:
    out, pos = [], 72
    while pos + 4 <= len(payload):
        length, kind = struct.unpack_from("<HH", payload, pos)
        out.append((kind, payload[pos + 4:pos + length]))
        pos += (length + 3) & ~3
    return out


def build(idm: bytes, attrs: list[tuple[int, bytes]]) -> bytes:
    body = b"".join(struct.pack("<HH", len(v) + 4, t) + v + bytes(-len(v) % 4) for t, v in attrs)
    return idm + body


def edit(payload: bytes, kind: int, offset: int, reorder: bool = False) -> bytes:
    """payload with one byte of attribute `kind` flipped (kind 0: the IDM itself)."""
    idm, attrs = bytearray(payload[:72]), rtattrs(payload)
    if kind == 0:
        idm[offset] ^= 0xFF
    else:
        attrs = [(t, bytes(v[:offset]) + bytes([v[offset] ^ 0xFF]) + v[offset + 1:]) if t == kind
                 else (t, v) for t, v in attrs]
    if reorder:  # same content, other layout: exercises the general (two-parse) path
        attrs = attrs[::-1]
    return build(bytes(idm), attrs)


@pytest.fixture(scope="module")
def message() -> bytes:
    return raw_netlink_messages()[0][16:]


every_table = pytest.mark.parametrize("by", list(COMPARE_BY))


@pytest.mark.parametrize("by,reorder", [(by, False) for by in COMPARE_BY] + [("messages", True)],
                         ids=[f"{by}-same-layout" for by in COMPARE_BY] + ["messages-other-layout"])
@pytest.mark.parametrize("kind,offset,expected", [
    (0, 52, NO_CHANGE),         # IDM expires: ignored
    (0, 1, STATE),              # idiag_state
    (INFO, 10, COUNTERS),       # rto, in tcp_info [0:44)
    (INFO, 45, NO_CHANGE),      # last_data_sent, in the ignored [44:60)
    (INFO, 60, COUNTERS),       # pmtu, first byte of [60:168)
    (INFO, 167, COUNTERS),      # last byte of delivery_rate
    (MEMINFO, 0, OTHER),        # any other attribute byte
])
def test_compare_classifies_a_single_byte_change_like_upstream(message, kind, offset, expected,
                                                               by, reorder):
    """(An image hashes attributes in the kernel's order, which a socket keeps: another
    layout of the same bytes is a change there, an extra record at worst.)"""
    assert compare(edit(message, kind, offset, reorder), message, by) == expected


@every_table
def test_compare_ignores_tcp_info_beyond_byte_168(message, by):
    info = dict(rtattrs(message))[INFO]
    assert len(info) == 168
    longer = build(message[:72], [(t, v + bytes(64) if t == INFO else v) for t, v in rtattrs(message)])
    changed = build(message[:72], [(t, v + b"\x01" * 64 if t == INFO else v) for t, v in rtattrs(message)])
    assert compare(changed, longer, by) == NO_CHANGE


@every_table
def test_compare_reports_attributes_appearing_disappearing_and_resizing(message, by):
    attrs = rtattrs(message)
    without_tos = build(message[:72], [(t, v) for t, v in attrs if t != TOS])
    assert compare(without_tos, message, by) == LOST_ATTR
    assert compare(message, without_tos, by) == NEW_ATTR
    bbr = build(message[:72], [(t, b"bbr\0" if t == CONG else v) for t, v in attrs])
    assert compare(bbr, message, by) == ATTR_LEN


@every_table
def test_compare_records_the_loss_of_tcp_info_once(message, by):
    attrs = rtattrs(message)
    no_info = build(message[:72], [(t, v) for t, v in attrs if t != INFO])
    assert compare(no_info, message, by) == NO_TCPINFO
    assert compare(message, no_info, by) == NO_TCPINFO
    assert compare(no_info, no_info, by) == NO_CHANGE  # upstream: NoTCPInfo on every poll
    bare = message[:72]  # a FIN_WAIT2 time-wait socket: no attributes at all
    assert compare(bare, bare, by) == NO_CHANGE


@every_table
def test_compare_rejects_malformed_messages(message, by):
    with pytest.raises(ValueError):
        compare(message[:40], message, by)
    broken = message[:72] + struct.pack("<HH", 2, 1)  # rta_len < 4
    with pytest.raises(ValueError):
        compare(broken, message, by)
