"""inet_diag messages (UPSTREAM.md §6.1, §6.3): the 72-byte header, attributes, addresses.

This is the one Python statement of the message layout: the header's field offsets (`IDM`) and the
attribute types (`INET_DIAG_*`).  The C core reads the same fields with the kernel header's
`offsetof`, and a test checks that the two agree.  ``split_message`` is what the daemon archives
(raw bytes, upstream's slot rules); the decoders turn those raw bytes into named fields for
csvtool, analysis and tests.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

from tcpinfo.kernel.tcp import TCP_INFO, Layout, pad

IDM_LEN = 72
"""sizeof(struct inet_diag_msg)."""
_IDM_FIELDS = (
    # struct inet_diag_msg (include/uapi/linux/inet_diag.h): name, offset, struct code, byte order.
    # The socket id's ports and addresses are in network order, the rest in host order.
    ("family", 0, "B", "<"), ("state", 1, "B", "<"), ("timer", 2, "B", "<"),
    ("retrans", 3, "B", "<"), ("sport", 4, "H", ">"), ("dport", 6, "H", ">"),
    ("src", 8, "16s", ">"), ("dst", 24, "16s", ">"), ("interface", 40, "I", "<"),
    ("cookie", 44, "Q", "<"), ("expires", 52, "I", "<"), ("rqueue", 56, "I", "<"),
    ("wqueue", 60, "I", "<"), ("uid", 64, "I", "<"), ("inode", 68, "I", "<"),
)
IDM: dict[str, int] = {name: offset for name, offset, _, _ in _IDM_FIELDS}
"""Offset of each inet_diag_msg field, by name."""


def idm_struct(*names: str, order: str | None = None) -> struct.Struct:
    """A Struct reading these header fields (in offset order) with ``unpack_from(message)``;
    ``order`` overrides their byte order (upstream reads idiag_if big-endian)."""
    fields = sorted((f for f in _IDM_FIELDS if f[0] in names), key=lambda f: f[1])
    if len(fields) != len(names) or len({order or f[3] for f in fields}) != 1:
        raise ValueError(f"not distinct header fields of one byte order: {names}")
    fmt, pos = order or fields[0][3], 0
    for _, offset, code, _ in fields:
        fmt += pad(offset - pos) + code
        pos = offset + struct.calcsize(code)
    return struct.Struct(fmt)

MAX_ATTR_TYPE = 38
"""Upstream keeps attribute types up to 2 × its (stale) INET_DIAG_MAX of 19 and drops the rest."""

AF_INET = 2
AF_INET6 = 10
FAMILY_LABELS = {AF_INET: "ipv4", AF_INET6: "ipv6"}
"""Address family names as metric label values (upstream's ``af`` label)."""

_RTA_HDR = struct.Struct("<HH")


def split_message(payload: bytes) -> tuple[bytes, list[bytes | None]]:
    """Split an inet_diag payload into the raw 72-byte IDM and the attribute slot list.

    Slot i holds the value of attribute type i (header and padding stripped) or None. The list is
    sized max kept type + 1 (``[None]`` when there are none); types above 38 are dropped and a
    repeated type keeps its last value, exactly as upstream archives them.
    """
    n = len(payload)
    if n < IDM_LEN:
        raise ValueError(f"inet_diag message too short: {n} bytes < {IDM_LEN}")
    slots: list[bytes | None] = [None] * (MAX_ATTR_TYPE + 1)
    top = -1
    pos = IDM_LEN
    unpack = _RTA_HDR.unpack_from
    while n - pos >= 4:
        rta_len, rta_type = unpack(payload, pos)
        if rta_len < 4 or rta_len > n - pos:
            raise ValueError(f"invalid argument: bad rtattr length {rta_len} at offset {pos}")
        if rta_type <= MAX_ATTR_TYPE:
            slots[rta_type] = payload[pos + 4 : pos + rta_len]
            if rta_type > top:
                top = rta_type
        pos += (rta_len + 3) & ~3
    del slots[max(top, 0) + 1 :]
    return payload[:IDM_LEN], slots


def attribute_span(payload: bytes, rta_type: int) -> tuple[int, int]:
    """Offset and length of the first ``rta_type`` attribute's value in an inet_diag payload,
    or (-1, 0) if it has none: one pass that stops there, without copying any value, for code
    that reads a few fields of one attribute per message.  ValueError on a bad rtattr length."""
    n = len(payload)
    pos = IDM_LEN
    unpack = _RTA_HDR.unpack_from
    while n - pos >= 4:
        rta_len, kind = unpack(payload, pos)
        if rta_len < 4 or rta_len > n - pos:
            raise ValueError(f"invalid argument: bad rtattr length {rta_len} at offset {pos}")
        if kind == rta_type:
            return pos + 4, rta_len - 4
        pos += (rta_len + 3) & ~3
    return -1, 0


def _ipv6_string(addr: bytes) -> str:
    """RFC 5952 text as Go prints it: the first longest run of two or more zero groups becomes ``::``."""
    groups = struct.unpack(">8H", addr)
    best_start, best_len, run_start = -1, 0, -1
    for i, g in enumerate(groups + (1,)):
        if g == 0 and i < 8:
            if run_start < 0:
                run_start = i
        elif run_start >= 0:
            if i - run_start > best_len:
                best_start, best_len = run_start, i - run_start
            run_start = -1
    if best_len < 2:
        return ":".join(f"{g:x}" for g in groups)
    head = ":".join(f"{g:x}" for g in groups[:best_start])
    tail = ":".join(f"{g:x}" for g in groups[best_start + best_len :])
    return f"{head}::{tail}"


V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def ip_string(addr16: bytes, family: int) -> str:
    """Go ``net.IP.String()`` of a 16-byte inet_diag address, interpreted by the socket family.

    AF_INET uses the first 4 bytes; AF_INET6 prints v4-mapped addresses as a dotted quad and the
    rest compressed.  Upstream guessed the family from zero bytes instead, which misreads IPv6
    addresses such as ``::`` or ``2001:db8::``; any other family falls back to that guess.
    """
    if family == AF_INET6 or (family != AF_INET and any(addr16[4:16])):
        if addr16[:12] == V4_MAPPED_PREFIX:
            return "%d.%d.%d.%d" % tuple(addr16[12:16])
        return _ipv6_string(addr16)
    return "%d.%d.%d.%d" % tuple(addr16[:4])


class InetDiagMsg(NamedTuple):
    """struct inet_diag_msg, decoded.  ``interface`` is the real (host-order) ifindex;
    ``interface_be`` is the same bytes read big-endian, which is what upstream prints."""

    family: int
    state: int
    timer: int
    retrans: int
    sport: int
    dport: int
    src: str
    dst: str
    interface: int
    interface_be: int
    cookie: int
    expires: int
    rqueue: int
    wqueue: int
    uid: int
    inode: int


IDM_HOST = idm_struct("family", "state", "timer", "retrans", "interface", "cookie", "expires",
                      "rqueue", "wqueue", "uid", "inode")
"""The host-order fields, in offset order."""
IDM_NET = idm_struct("sport", "dport", "src", "dst", "interface", order=">")
"""The network-order fields, and idiag_if read big-endian as upstream prints it."""


def decode_idm(raw: bytes) -> InetDiagMsg:
    """Decode the 72-byte inet_diag_msg (longer input: the rest is ignored)."""
    if len(raw) < IDM_LEN:
        raise ValueError(f"RawIDM too short: {len(raw)} bytes < {IDM_LEN}")
    family, state, timer, retrans, ifindex, cookie, expires, rq, wq, uid, inode = IDM_HOST.unpack_from(raw)
    sport, dport, src, dst, if_be = IDM_NET.unpack_from(raw)
    return InetDiagMsg(family, state, timer, retrans, sport, dport, ip_string(src, family),
                       ip_string(dst, family), ifindex, if_be, cookie, expires, rq, wq, uid, inode)


# INET_DIAG_* attribute types (include/uapi/linux/inet_diag.h).
INET_DIAG_MEMINFO = 1
INET_DIAG_INFO = 2
INET_DIAG_VEGASINFO = 3
INET_DIAG_CONG = 4
INET_DIAG_TOS = 5
INET_DIAG_TCLASS = 6
INET_DIAG_SKMEMINFO = 7
INET_DIAG_SHUTDOWN = 8
INET_DIAG_DCTCPINFO = 9
INET_DIAG_PROTOCOL = 10
INET_DIAG_SKV6ONLY = 11
INET_DIAG_MARK = 15
INET_DIAG_BBRINFO = 16
INET_DIAG_CLASS_ID = 17
INET_DIAG_CGROUP_ID = 21
INET_DIAG_SOCKOPT = 22

MEMINFO = Layout("""
rmem Rmem I I
wmem Wmem I I
fmem Fmem I I
tmem Tmem I I
""")
SKMEMINFO = Layout("""
rmem_alloc RmemAlloc I I
rcvbuf Rcvbuf I I
wmem_alloc WmemAlloc I I
sndbuf Sndbug I I
fwd_alloc FwdAlloc I I
wmem_queued WmemQueued I I
optmem Optmem I I
backlog Backlog I I
drops Drops I I
""")
"""SK_MEMINFO_*; upstream's CSV misspells sndbuf as ``Sndbug``."""
VEGASINFO = Layout("""
enabled Enabled I I
rttcnt RTTCount I I
rtt RTT I I
minrtt MinRTT I I
""")
DCTCPINFO = Layout("""
enabled Enabled H H
ce_state CEState H H
alpha Alpha I I
ab_ecn ABEcn I I
ab_tot ABTot I I
""")
BBRINFO = Layout("""
bw BW Q q
min_rtt MinRTT I I
pacing_gain PacingGain I I
cwnd_gain CwndGain I I
""", go_size=24)
"""tcp_bbr_info: bw_lo and bw_hi read together as one little-endian u64.  Go pads its struct
to 24 bytes, so the kernel's 20 still count as fully parsed upstream."""

STRUCT_ATTRIBUTES: dict[int, tuple[str, Layout]] = {
    INET_DIAG_MEMINFO: ("meminfo", MEMINFO),
    INET_DIAG_INFO: ("tcp", TCP_INFO),
    INET_DIAG_VEGASINFO: ("vegas", VEGASINFO),
    INET_DIAG_SKMEMINFO: ("skmeminfo", SKMEMINFO),
    INET_DIAG_DCTCPINFO: ("dctcp", DCTCPINFO),
    INET_DIAG_BBRINFO: ("bbr", BBRINFO),
}
"""Struct-valued attributes: type -> (column prefix, layout)."""

SCALAR_ATTRIBUTES: dict[int, tuple[str, struct.Struct]] = {
    INET_DIAG_TOS: ("tos", struct.Struct("<B")),
    INET_DIAG_TCLASS: ("tclass", struct.Struct("<B")),
    INET_DIAG_SHUTDOWN: ("shutdown", struct.Struct("<B")),
    INET_DIAG_PROTOCOL: ("protocol", struct.Struct("<B")),
    INET_DIAG_SKV6ONLY: ("v6only", struct.Struct("<B")),
    INET_DIAG_MARK: ("mark", struct.Struct("<I")),
    INET_DIAG_CLASS_ID: ("class_id", struct.Struct("<I")),
    INET_DIAG_CGROUP_ID: ("cgroup_id", struct.Struct("<Q")),
    INET_DIAG_SOCKOPT: ("sockopt", struct.Struct("<H")),
}
"""Integer-valued attributes: type -> (name, format).  A shorter value than the format is absent."""

SOCKOPT_FLAGS: tuple[str, ...] = (
    "recverr", "is_icsk", "freebind", "hdrincl", "mc_loop", "transparent", "mc_all", "nodefrag",
    "bind_address_no_port", "recverr_rfc4884", "defer_connect",
)
"""struct inet_diag_sockopt bit fields, bit 0 first."""


def sockopt_names(flags: int) -> list[str]:
    """Names of the set INET_DIAG_SOCKOPT bits (unknown bits as ``bit<n>``)."""
    return [SOCKOPT_FLAGS[i] if i < len(SOCKOPT_FLAGS) else f"bit{i}"
            for i in range(flags.bit_length()) if flags >> i & 1]


def congestion_name(raw: bytes) -> str:
    """INET_DIAG_CONG: the NUL-terminated algorithm name."""
    return raw.split(b"\0", 1)[0].decode("utf-8", "surrogateescape")


def decode_attributes(attributes: list[bytes | None]) -> dict[str, object]:
    """All known attributes by name: struct members as ``<prefix>.<member>``, scalars by name,
    ``cong`` as text and ``sockopt`` as flag names.  Unknown or too-short values are left out."""
    out: dict[str, object] = {}
    for rta_type, raw in enumerate(attributes):
        if raw is None:
            continue
        if rta_type in STRUCT_ATTRIBUTES:
            prefix, layout = STRUCT_ATTRIBUTES[rta_type]
            for name, value in layout.decode(raw).items():
                out[f"{prefix}.{name}"] = value
        elif rta_type in SCALAR_ATTRIBUTES:
            name, fmt = SCALAR_ATTRIBUTES[rta_type]
            if len(raw) >= fmt.size:
                (value,) = fmt.unpack_from(raw)
                out[name] = "|".join(sockopt_names(value)) if rta_type == INET_DIAG_SOCKOPT else value
        elif rta_type == INET_DIAG_CONG:
            out["cong"] = congestion_name(raw)
    return out
