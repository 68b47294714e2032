"""Decoders of inet_diag_msg, attributes and tcp_info against UPSTREAM.md §4.1, §6 and §12.1."""
from __future__ import annotations

import struct
from collections import Counter

import pytest

from helpers.netlink import raw_netlink_messages
from helpers.paths import NDT, TESTDATA
from tcpinfo.archive.reader import read_archive
from tcpinfo.archive.record import decode_line
from tcpinfo.kernel.inetdiag import (
    AF_INET,
    AF_INET6,
    INET_DIAG_INFO,
    decode_attributes,
    decode_idm,
    ip_string,
    sockopt_names,
    split_message,
)
from tcpinfo.kernel.tcp import TCP_INFO, decode_tcp_info, state_name


@pytest.fixture(scope="module")
def first_ndt_record():
    lines = read_archive(str(NDT))
    next(lines)
    return decode_line(next(lines)[1])


def test_idm_of_spec_example_decodes_to_spec_values(first_ndt_record) -> None:
    idm = decode_idm(first_ndt_record.raw_idm)
    assert idm._asdict() == {
        "family": 10, "state": 1, "timer": 1, "retrans": 0, "sport": 33475, "dport": 49730,
        "src": "63.243.240.101", "dst": "172.251.23.202", "interface": 0, "interface_be": 0,
        "cookie": 0x62D84, "expires": 342, "rqueue": 0, "wqueue": 6118, "uid": 0, "inode": 1445802073,
    }


def test_attributes_of_spec_example_decode_to_spec_values(first_ndt_record) -> None:
    attrs = first_ndt_record.attributes
    assert [i for i, a in enumerate(attrs) if a is not None] == [1, 2, 4, 5, 6, 7, 8]
    assert len(attrs[INET_DIAG_INFO]) == 224
    fields = decode_attributes(attrs)
    expected = {
        "meminfo.rmem": 0, "meminfo.wmem": 9462, "meminfo.fmem": 2826, "meminfo.tmem": 0,
        "cong": "cubic", "tos": 0, "tclass": 0, "shutdown": 0,
        "skmeminfo.rmem_alloc": 0, "skmeminfo.rcvbuf": 359040, "skmeminfo.wmem_alloc": 0,
        "skmeminfo.sndbuf": 46080, "skmeminfo.fwd_alloc": 2826, "skmeminfo.wmem_queued": 9462,
        "skmeminfo.optmem": 0, "skmeminfo.backlog": 0, "skmeminfo.drops": 0,
    }
    assert {k: fields[k] for k in expected} == expected


def test_tcp_info_of_spec_example_decodes_to_spec_values(first_ndt_record) -> None:
    info = decode_tcp_info(first_ndt_record.attributes[INET_DIAG_INFO])
    spec = dict(
        state=1, ca_state=0, retransmits=0, probes=0, backoff=0, options=6, snd_wscale=8, rcv_wscale=7,
        delivery_rate_app_limited=0, rto=517000, ato=40000, snd_mss=1460, rcv_mss=536, unacked=5,
        sacked=0, lost=0, retrans=0, fackets=0, last_data_sent=5, last_ack_sent=0, last_data_recv=8,
        last_ack_recv=8, pmtu=1500, rcv_ssthresh=30272, rtt=172227, rttvar=86113,
        snd_ssthresh=2147483647, snd_cwnd=10, advmss=1460, reordering=3, rcv_rtt=0, rcv_space=29200,
        total_retrans=0, pacing_rate=169543, max_pacing_rate=2**64 - 1, bytes_acked=0, bytes_received=517,
        segs_out=6, segs_in=3, notsent_bytes=0, min_rtt=172227, data_segs_in=1, data_segs_out=5,
        delivery_rate=0, busy_time=5000, rwnd_limited=0, sndbuf_limited=0, delivered=1, delivered_ce=0,
        bytes_sent=6118, bytes_retrans=0, dsack_dups=0, reord_seen=0,
    )
    assert {k: info[k] for k in spec} == spec
    assert "rcv_ooopack" not in info and "snd_wnd" not in info  # 224 bytes: absent, not zero
    go_values, fully_parsed = TCP_INFO.decode_go(first_ndt_record.attributes[INET_DIAG_INFO])
    assert fully_parsed and go_values[TCP_INFO.go_names.index("MaxPacingRate")] == -1
    assert go_values[-2:] == (0, 0)  # upstream zero-pads RcvOooPack/SndWnd


def test_all_420_raw_netlink_messages_parse_with_spec_counts() -> None:
    messages = raw_netlink_messages()
    assert len(messages) == 420
    headers = [struct.unpack_from("<IHHII", m) for m in messages]
    assert {(h[1], h[2]) for h in headers} == {(20, 2)}
    by_family = Counter()
    cookies = Counter()
    for header, message in zip(headers, messages):
        idm_raw, attrs = split_message(message[16:])
        idm = decode_idm(idm_raw)
        by_family[(idm.family, header[0])] += 1
        cookies[idm.cookie] += 1
        assert idm.state == 1 and state_name(idm.state) == "ESTABLISHED"
        present = [i for i, a in enumerate(attrs) if a is not None]
        assert present == ([1, 2, 4, 5, 6, 7, 8] if idm.family == AF_INET6 else [1, 2, 4, 5, 7, 8])
        assert len(attrs[INET_DIAG_INFO]) == 168
        assert decode_attributes(attrs)["cong"] == "cubic"
    assert by_family == {(AF_INET6, 356): 375, (AF_INET, 348): 45}
    assert len(cookies) == 140 and set(cookies.values()) == {3}


def test_tcp_info_lengths_decide_which_fields_exist() -> None:
    raw = bytes(range(256)) + bytes(24)
    assert list(decode_tcp_info(raw[:168]))[-1] == "delivery_rate"  # 168 bytes end with it (4.9)
    at_224 = decode_tcp_info(raw[:224])
    assert "reord_seen" in at_224 and "rcv_ooopack" not in at_224
    at_280 = decode_tcp_info(raw)
    assert {"rcv_wnd", "total_rto", "received_ce", "delivered_e1_bytes", "received_ce_bytes",
            "accecn_fail_mode", "accecn_opt_seen"} <= set(at_280)
    assert at_280["total_rto"] == int.from_bytes(raw[240:242], "little")
    assert at_280["accecn_opt_seen"] == int.from_bytes(raw[278:280], "little")
    truncated = decode_tcp_info(raw[:10])  # a field cut in half is absent too
    assert set(truncated) == {"state", "ca_state", "retransmits", "probes", "backoff", "options",
                              "snd_wscale", "rcv_wscale", "delivery_rate_app_limited", "fastopen_client_fail"}
    assert decode_tcp_info(raw + b"\xff" * 8) == at_280  # a future, longer struct: extra bytes ignored


def test_wscale_nibbles_and_app_limited_bits_decode_separately() -> None:
    info = decode_tcp_info(bytes([1, 0, 0, 0, 0, 7, 0x78, 0b101]) + bytes(160))
    assert (info["snd_wscale"], info["rcv_wscale"]) == (8, 7)
    assert (info["delivery_rate_app_limited"], info["fastopen_client_fail"]) == (1, 2)


def test_go_view_flags_tcp_info_longer_than_upstream_struct() -> None:
    assert TCP_INFO.decode_go(bytes(280))[1] is False
    assert TCP_INFO.decode_go(bytes(232))[1] is True


def test_idm_interface_is_host_order_with_upstream_big_endian_reading_kept() -> None:
    raw = bytearray(72)
    raw[40:44] = bytes([0, 0, 2, 1])
    idm = decode_idm(bytes(raw))
    assert idm.interface_be == 513 and idm.interface == 0x01020000


def test_idm_cookie_is_little_endian_u64() -> None:
    raw = bytearray(72)
    raw[44:52] = bytes([0xFF, 0, 0, 0, 0, 0, 0, 0xFF])
    assert "%X" % decode_idm(bytes(raw)).cookie == "FF000000000000FF"


def test_idm_shorter_than_72_bytes_is_rejected() -> None:
    with pytest.raises(ValueError, match="too short"):
        decode_idm(bytes(71))


@pytest.mark.parametrize("addr, family, text", [
    (bytes([1] + [0] * 14 + [2]), AF_INET6, "100::2"),
    (bytes([1, 1, 1, 2] + [0] * 12), AF_INET, "1.1.1.2"),
    (bytes(10) + b"\xff\xff" + bytes([63, 243, 240, 101]), AF_INET6, "63.243.240.101"),
    (bytes(16), AF_INET6, "::"),  # upstream's zero-bytes guess printed 0.0.0.0
    (bytes([0x20, 1, 0xd, 0xb8] + [0] * 12), AF_INET6, "2001:db8::"),
    (bytes([0xfd, 0, 1, 0x98] + [0] * 11 + [1]), AF_INET6, "fd00:198::1"),
    (bytes([0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0, 0, 1, 0, 0]), AF_INET6, "1:0:1:0:1:0:1:0"),
    (bytes([0, 1, 0, 0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 1, 0, 1]), AF_INET6, "1::1:0:0:1:1"),
])
def test_ip_string_follows_go_net_ip_string_by_family(addr: bytes, family: int, text: str) -> None:
    assert ip_string(addr, family) == text


def test_split_message_applies_upstream_slot_rules() -> None:
    def rta(t: int, value: bytes) -> bytes:
        return struct.pack("<HH", 4 + len(value), t) + value + bytes(-len(value) % 4)

    idm = bytes(72)
    assert split_message(idm) == (idm, [None])
    _, attrs = split_message(idm + rta(5, b"\x01") + rta(40, b"x") + rta(5, b"\x02") + rta(2, b""))
    assert attrs == [None, None, b"", None, None, b"\x02"]  # >38 dropped, last duplicate wins
    _, attrs = split_message(idm + rta(38, b"abc"))
    assert len(attrs) == 39 and attrs[38] == b"abc"
    with pytest.raises(ValueError):
        split_message(idm + struct.pack("<HH", 3, 1))
    with pytest.raises(ValueError):
        split_message(idm + struct.pack("<HH", 12, 1) + b"\0\0\0\0")
    with pytest.raises(ValueError):
        split_message(bytes(71))


def test_state_names_match_upstream_including_unknown() -> None:
    assert [state_name(i) for i in (1, 5, 10, 11)] == ["ESTABLISHED", "FIN_WAIT2", "LISTEN", "CLOSING"]
    assert state_name(99) == "UNKNOWN_STATE_99"


def test_sockopt_bits_follow_struct_inet_diag_sockopt_order() -> None:
    assert sockopt_names(0b1) == ["recverr"]
    assert sockopt_names(0b10010) == ["is_icsk", "mc_loop"]
    assert sockopt_names(1 << 8 | 1 << 10) == ["bind_address_no_port", "defer_connect"]
    assert sockopt_names(1 << 12) == ["bit12"]


def test_modern_kernel_attributes_decode_cgroup_sockopt_and_full_class_id() -> None:
    archive = next(iter(sorted((TESTDATA / "kernel-6.18").glob("*.jsonl.zst"))))
    lines = read_archive(str(archive))
    next(lines)
    attrs = decode_line(next(lines)[1]).attributes
    assert len(attrs) == 23 and len(attrs[INET_DIAG_INFO]) == 280
    fields = decode_attributes(attrs)
    assert fields["cgroup_id"] == int.from_bytes(attrs[21], "little")
    assert fields["sockopt"] == "|".join(sockopt_names(int.from_bytes(attrs[22], "little")))
    assert fields["class_id"] == int.from_bytes(attrs[17], "little")
    assert "tcp.accecn_opt_seen" in fields
