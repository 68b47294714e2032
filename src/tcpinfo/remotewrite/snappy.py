"""Snappy block format compression in pure Python (what Prometheus remote write requires).

The collector takes no compression library for this (its dependencies are fixed), and remote-write
bodies are made a few times a minute on their own thread, so a compact pure-Python encoder is
enough: greedy LZ77 over 4-byte hashes, one 64 KiB fragment at a time with a fresh table (as
Google's encoder does, so every offset fits two bytes and memory stays bounded), and snappy's own
skip heuristic so incompressible input is stepped over quickly.  A match is extended by comparing
slices of doubling length, so the work per match grows with the logarithm of its length.  The output
is plain block format: the uncompressed length as a varint, then literal and copy elements.
"""
from __future__ import annotations

FRAGMENT = 1 << 16
MAX_INPUT = (1 << 32) - 1      # the length prefix is a 32-bit varint
_MIN_MATCH = 4


def varint(n: int) -> bytes:
    """Unsigned LEB128, as snappy's length prefix and protobuf's varints are written."""
    out = bytearray()
    while n >= 0x80:
        out.append(n & 0x7F | 0x80)
        n >>= 7
    out.append(n)
    return bytes(out)


def _literal(out: bytearray, data: bytes, start: int, end: int) -> None:
    n = end - start - 1
    if n < 60:
        out.append(n << 2)
    elif n < 1 << 8:
        out += bytes((60 << 2, n))
    elif n < 1 << 16:
        out += bytes((61 << 2,)) + n.to_bytes(2, "little")
    else:                      # a fragment is at most 64 KiB, so three bytes always suffice
        out += bytes((62 << 2,)) + n.to_bytes(3, "little")
    out += data[start:end]


def _copy(out: bytearray, offset: int, length: int) -> None:
    """Copy elements for one match: 1-byte-offset form when short and near, else 2-byte."""
    while length >= 68:
        out += bytes((63 << 2 | 2,)) + offset.to_bytes(2, "little")
        length -= 64
    if length > 64:
        out += bytes((59 << 2 | 2,)) + offset.to_bytes(2, "little")
        length -= 60
    if length < 12 and offset < 2048:
        out += bytes(((offset >> 8) << 5 | (length - 4) << 2 | 1, offset & 0xFF))
    else:
        out += bytes(((length - 1) << 2 | 2,)) + offset.to_bytes(2, "little")


def _match_length(data: bytes, earlier: int, here: int, end: int) -> int:
    """How many bytes from ``here`` equal those from ``earlier`` (before ``end``): equal chunks
    of doubling size are skipped, and the first differing byte of the chunk that differs is found
    from the lowest set bit of the two chunks XORed as little-endian integers."""
    k, step, limit = 0, 32, end - here
    while k < limit:
        if step > limit - k:
            step = limit - k
        a = data[earlier + k:earlier + k + step]
        b = data[here + k:here + k + step]
        if a != b:
            x = int.from_bytes(a, "little") ^ int.from_bytes(b, "little")
            return k + ((x & -x).bit_length() - 1) // 8
        k += step
        step *= 2
    return k


def _fragment(out: bytearray, data: bytes, start: int, end: int) -> None:
    table: dict[bytes, int] = {}
    pos = literal = start
    skip = 32
    last = end - _MIN_MATCH
    while pos <= last:
        key = data[pos:pos + 4]
        candidate = table.get(key)
        table[key] = pos
        if candidate is None:
            pos += skip >> 5
            skip += 1
            continue
        length = _MIN_MATCH + _match_length(data, candidate + 4, pos + 4, end)
        if literal < pos:
            _literal(out, data, literal, pos)
        _copy(out, pos - candidate, length)
        pos += length
        literal = pos
        skip = 32
    if literal < end:
        _literal(out, data, literal, end)


def compress(data: bytes) -> bytes:
    """Snappy block format of ``data`` (at most 4 GiB - 1)."""
    if len(data) > MAX_INPUT:
        raise ValueError(f"snappy block input of {len(data)} bytes exceeds {MAX_INPUT}")
    out = bytearray(varint(len(data)))
    for start in range(0, len(data), FRAGMENT):
        _fragment(out, data, start, min(start + FRAGMENT, len(data)))
    return bytes(out)
