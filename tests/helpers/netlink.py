"""Real inet_diag messages for tests that need kernel bytes without a kernel: upstream's test data."""
from __future__ import annotations

import struct

import zstandard

from helpers.paths import TESTDATA


def raw_netlink_messages() -> list[bytes]:
    """The 420 inet_diag payloads of mlab/testdata.zst (16-byte nlmsghdr stripped)."""
    with open(TESTDATA / "mlab" / "testdata.zst", "rb") as f:
        raw = zstandard.ZstdDecompressor().stream_reader(f).read()
    messages, pos = [], 0
    while pos < len(raw):
        (length,) = struct.unpack_from("<I", raw, pos)
        messages.append(raw[pos:pos + length])
        pos += (length + 3) & ~3
    return messages
