"""inet_diag messages (UPSTREAM.md §6.1, §6.3): splitting, the 72-byte header, attributes, addresses.

``split_message`` is what the daemon archives (raw bytes, upstream's slot rules); the decoders turn
those raw bytes into named fields for csvtool, analysis and tests.
"""
from __future__ import annotations

import struct

IDM_LEN = 72
MAX_ATTR_TYPE = 38
"""Upstream keeps attribute types up to 2 × its (stale) INET_DIAG_MAX of 19 and drops the rest."""

AF_INET = 2
AF_INET6 = 10

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


_V4_MAPPED_PREFIX = bytes(10) + b"\xff\xff"


def ip_string(addr16: bytes, family: int) -> str:
    """Go ``net.IP.String()`` of a 16-byte inet_diag address, interpreted by the socket family.

    AF_INET uses the first 4 bytes; AF_INET6 prints v4-mapped addresses as a dotted quad and the
    rest compressed.  Upstream guessed the family from zero bytes instead, which misreads IPv6
    addresses such as ``::`` or ``2001:db8::``; any other family falls back to that guess.
    """
    if family == AF_INET6 or (family != AF_INET and any(addr16[4:16])):
        if addr16[:12] == _V4_MAPPED_PREFIX:
            return "%d.%d.%d.%d" % tuple(addr16[12:16])
        return _ipv6_string(addr16)
    return "%d.%d.%d.%d" % tuple(addr16[:4])
