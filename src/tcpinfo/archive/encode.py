"""Archive lines straight from kernel messages, built in C: the daemon's per-record step.

The reference encoder (``tcpinfo.archive.record.encode_record``) takes decoded attribute slots; the
daemon has the raw netlink message, and building the line from it in C (base64 and upstream's
attribute slots, ``cffi_build/encode.c``) costs about 2 µs with the Python call instead of about 5 µs
for splitting and encoding in Python.
"""
from __future__ import annotations

from tcpinfo.archive.record import timestamp_bytes
from tcpinfo.core.binding import ffi, lib

_line_buf = ffi.new("char[]", 8192)
_info_at = ffi.new("uint32_t[2]")


def encode_message(ts_ns: int, raw_idm: bytes, payload: bytes) -> tuple[bytes, bytes | None]:
    """The daemon's fast path: one data line straight from a kernel message, built in C.

    Same bytes as ``record.encode_record(ts_ns, *split_message(payload))`` but with ``raw_idm`` as the
    header (the anonymized one, or ``payload`` itself).  Also returns the tcp_info attribute
    where the encoder found it (upstream's slot), or None.  ValueError if the payload is malformed.
    """
    global _line_buf
    ts = timestamp_bytes(ts_ns)
    bound = lib.tcpi_encode_bound(len(payload), len(ts))
    if bound > len(_line_buf):
        _line_buf = ffi.new("char[]", bound)
    n = lib.tcpi_encode_record(raw_idm, payload, len(payload), ts, len(ts), _line_buf,
                               len(_line_buf), _info_at, _info_at + 1)
    if n < 0:
        raise ValueError(f"malformed inet_diag message of {len(payload)} bytes")
    off = _info_at[0]
    return ffi.unpack(_line_buf, n), (payload[off:off + _info_at[1]] if off else None)
