"""Streaming reader of archive files: plain JSON lines or zstd (any number of frames).

Archives can be far larger than memory, and a small file can decompress to gigabytes (one zstd
frame of repeated records, or of zeros), so everything here is bounded: zstd output comes a
bounded number of blocks at a time (see ``_zstd_chunks``), and a line longer than
``max_line_bytes`` is reported (and then skipped without being held) instead of accumulated.
A truncated final frame (a crashed writer) is reported instead of silently ending the file early.
Every error names the file and the line it was reading.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

STDIN = "-"
ZSTD_MAGIC = 0xFD2FB528
SKIPPABLE_MAGIC = 0x184D2A50
"""Skippable frames are 0x184D2A50-0x184D2A5F: a 4-byte length, then data no decoder reads."""
BLOCK_MAX = 128 * 1024
"""The most one zstd block can regenerate (RFC 8878 Block_Maximum_Size)."""
STEP = 1 << 18
"""Text per step: plain bytes per read, and the zstd output that ends a batch of blocks (a batch
regenerates at most STEP + BLOCK_MAX bytes).  Big enough that the C row converter gets runs of
hundreds of lines, small enough that a step's text stays in a core's cache (1 MiB steps made
csvtool ~5% slower) and memory stays flat."""
READ = 1 << 17
"""Compressed bytes per read."""
MAX_LINE_BYTES = 1 << 20
"""Default longest line (without its newline); real records are 1-2 KB."""
ARCHIVE_SUFFIXES = (".jsonl", ".jsonl.zst", ".zst")
TRUNCATED = "truncated zstd frame (unexpected end of file)"


class ArchiveError(Exception):
    """A problem in one input, located by file name and 1-based line number (0 = the whole file)."""

    def __init__(self, name: str, line: int, message: str) -> None:
        super().__init__(f"{name}:{line}: {message}" if line else f"{name}: {message}")
        self.name, self.line, self.message = name, line, message


def _is_zstd(magic: bytes) -> bool:
    """Whether the first four bytes of a file open a zstd frame or a skippable frame."""
    if len(magic) < 4:
        return False
    value = int.from_bytes(magic[:4], "little")
    return value == ZSTD_MAGIC or value & ~0xF == SKIPPABLE_MAGIC


class _Truncated(zstandard.ZstdError):
    """The input ended inside a frame."""


class _Input:
    """The compressed stream as a window the frame walker moves through: it reads headers and
    steps over them and over block bodies (``take``), and hands everything stepped over since the
    last ``batch`` to libzstd as one view of the window.  Bytes are not copied after the read that
    brings them in, except a batch cut by the end of a window (moved to the front of the next)."""

    def __init__(self, stream: BinaryIO, first: bytes) -> None:
        self._stream = stream
        self._buf = memoryview(first)
        self._pos = self._start = 0   # where the walker is; where the current batch starts

    def peek(self, n: int) -> memoryview:
        """Up to ``n`` bytes from the walker's position (fewer only where the input ends)."""
        if self._pos + n > len(self._buf):
            self._refill(self._pos - self._start + n)
        return self._buf[self._pos:self._pos + n]

    def take(self, n: int) -> memoryview:
        """Steps over the next ``n`` bytes and returns them; _Truncated if the input ends first."""
        out = self.peek(n)
        if len(out) < n:
            raise _Truncated(TRUNCATED)
        self._pos += n
        return out

    def batch(self) -> memoryview:
        """Everything stepped over since the last batch."""
        out = self._buf[self._start:self._pos]
        self._start = self._pos
        return out

    def skip(self, n: int) -> None:
        """Steps over ``n`` bytes, keeping none (a skippable frame may be gigabytes)."""
        self.batch()
        while n:
            step = len(self.peek(min(n, READ)))
            if not step:
                raise _Truncated("truncated skippable frame (unexpected end of file)")
            self._pos = self._start = self._pos + step
            n -= step

    def _refill(self, want: int) -> None:
        """A new window holding the current batch and at least ``want`` bytes from its start."""
        keep = self._buf[self._start:]
        window = bytearray(max(want, len(keep) + READ))
        window[:len(keep)] = keep
        view, have = memoryview(window), len(keep)
        # open(..., "rb") and sys.stdin.buffer have readinto; typing.BinaryIO does not say so
        while have < want and (got := self._stream.readinto(view[have:])):  # type: ignore[attr-defined]
            have += got
        self._buf = view[:have]
        self._pos -= self._start
        self._start = 0


def _frame_batches(src: _Input) -> Iterator[memoryview]:
    """One zstd frame's compressed bytes (``src`` is at its magic number), cut into batches of
    whole blocks that regenerate (and hold) at most STEP + BLOCK_MAX bytes each: the first starts
    with the frame header, the last ends with the checksum.

    Only the sizes in the headers are read here (RFC 8878 §3.1.1); libzstd checks everything
    else.  If the input ends inside the frame, the whole blocks before the cut are yielded, then
    _Truncated is raised.
    """
    descriptor = src.take(5)[4]
    single_segment = descriptor >> 5 & 1
    src.take((1 - single_segment) + (0, 1, 2, 4)[descriptor & 3] + (single_segment, 2, 4, 8)[descriptor >> 6])
    weight = 0  # bounds both the compressed bytes in the batch and the text they regenerate
    try:
        while True:
            value = int.from_bytes(src.take(3), "little")
            kind, size = value >> 1 & 3, value >> 3
            if kind == 3:
                raise zstandard.ZstdError("corrupt zstd block (reserved block type)")
            src.take(1 if kind == 1 else size)  # RLE: one byte, `size` times
            weight += 3 + (BLOCK_MAX if kind == 2 else size)  # empty blocks weigh their header
            if value & 1:  # the last block
                if descriptor & 4:
                    src.take(4)
                yield src.batch()
                return
            if weight >= STEP:
                yield src.batch()
                weight = 0
    except _Truncated:
        yield src.batch()  # the whole blocks before the cut are still decoded
        raise


def _zstd_chunks(first: bytes, stream: BinaryIO) -> Iterator[bytes]:
    """Decompressed text of a zstd stream of any number of frames (and skippable frames), at
    most STEP + BLOCK_MAX bytes at a time; ZstdError on corrupt data, garbage between or after
    frames, or a frame cut short.

    ``decompressobj().decompress`` returns everything its input regenerates, and
    ``stream_reader`` ignores a truncated last frame, so the frame format is walked here and
    whole blocks are fed a batch at a time: output per step is bounded, and whether the input
    ended mid-frame is known exactly.
    """
    src = _Input(stream, first)
    dctx = zstandard.ZstdDecompressor()
    while True:
        magic = src.peek(4)
        if not magic:
            return
        if len(magic) < 4:
            raise _Truncated(TRUNCATED)
        value = int.from_bytes(magic, "little")
        if value & ~0xF == SKIPPABLE_MAGIC:
            src.skip(int.from_bytes(src.take(8)[4:], "little"))
            continue
        if value != ZSTD_MAGIC:
            raise zstandard.ZstdError(f"not a zstd frame: {magic.hex()} (garbage after the last frame?)")
        dobj = dctx.decompressobj()
        for batch in _frame_batches(src):
            out = dobj.decompress(batch)
            if out:
                yield out
        if not dobj.eof:
            raise zstandard.ZstdError("corrupt zstd frame (it did not end after its last block)")


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Raw chunks of the stream, decompressed when it starts with a zstd (or skippable) frame."""
    first = stream.read(READ)
    while len(first) < 4 and (more := stream.read(READ)):  # a pipe may return less
        first += more
    if _is_zstd(first):
        yield from _zstd_chunks(first, stream)
        return
    if first:
        yield first
    while chunk := stream.read(STEP):
        yield chunk


def _has_long_line(text: bytes, limit: int) -> bool:
    """Whether ``text`` may hold a line longer than ``limit``: one ``find`` per ``limit // 2``
    bytes rather than one per line.  A run of more than ``limit`` bytes without a newline covers a
    whole aligned window of ``limit // 2 + 1`` bytes, so a window without one is a candidate."""
    width = limit // 2 + 1
    return any(text.find(b"\n", start, start + width) < 0 for start in range(0, len(text) - width + 1, width))


def _split_long(text: bytes, lineno: int, limit: int) -> Iterator[tuple[int, bytes | None, int]]:
    """``text`` (whole lines) as ``iter_text`` yields it: runs of lines up to ``limit`` bytes, and
    None for each longer one.  One ``find`` per line, each looking at most ``limit`` bytes ahead."""
    start = pos = 0
    while pos < len(text):
        newline = text.find(b"\n", pos, pos + limit + 1)
        if newline >= 0:
            pos = newline + 1
            continue
        if pos > start:
            count = text.count(b"\n", start, pos)
            yield lineno, text[start:pos], count
            lineno += count
        yield lineno, None, 1
        lineno += 1
        pos = start = text.index(b"\n", pos) + 1
    if start < len(text):
        yield lineno, text[start:], text.count(b"\n", start)


def iter_text(stream: BinaryIO, name: str,
              max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, int]]:
    """(number of the first line, whole lines each ending in ``\n``, how many) per decompressed
    chunk, and (line number, None, 1) for a line longer than ``max_line_bytes``, whose bytes are
    dropped as they arrive (never held): the caller reports or skips it.  The count is the one
    the reader keeps its line numbers with, so no caller counts the text again.

    Blocks of text rather than single lines keep per-line Python work off the hot path: csvtool
    hands them to C as they are.  A final line without a newline still counts (one is added), as
    with Go's bufio.Scanner; a trailing ``\r`` is left in place (JSON treats it as whitespace).
    """
    lineno = 1
    tail: list[bytes] = []   # pieces of an unfinished line, joined once it ends (a line spanning
    tail_len = 0             # many chunks stays linear)
    dropping = False         # inside an over-long line, already reported
    try:
        for chunk in _chunks(stream):
            if dropping:
                newline = chunk.find(b"\n")
                if newline < 0:
                    continue
                chunk, dropping = chunk[newline + 1:], False
            end = chunk.rfind(b"\n") + 1
            if end:
                text = b"".join((*tail, chunk[:end])) if tail else chunk[:end]
                if len(text) > max_line_bytes and _has_long_line(text, max_line_bytes):
                    for first, block, count in _split_long(text, lineno, max_line_bytes):
                        yield first, block, count
                        lineno = first + count
                else:
                    count = text.count(b"\n")
                    yield lineno, text, count
                    lineno += count
                tail, tail_len = [], 0
            if end < len(chunk):
                tail.append(chunk[end:] if end else chunk)
                tail_len += len(tail[-1])
                if tail_len > max_line_bytes:
                    yield lineno, None, 1
                    lineno += 1
                    tail, tail_len, dropping = [], 0, True
    except zstandard.ZstdError as exc:
        raise ArchiveError(name, lineno, f"zstd: {exc}") from None
    except OSError as exc:
        raise ArchiveError(name, lineno, f"read error: {exc.strerror or exc}") from None
    if tail:
        yield lineno, b"".join((*tail, b"\n")), 1


def read_text(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes | None, int]]:
    """Text blocks of one archive (see ``iter_text``); ``-`` is standard input.  A missing file
    raises ArchiveError."""
    if path == STDIN:
        yield from iter_text(sys.stdin.buffer, "<stdin>", max_line_bytes)
        return
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise ArchiveError(path, 0, f"cannot open: {exc.strerror or exc}") from None
    with stream:
        yield from iter_text(stream, path, max_line_bytes)


def read_archive(path: str, max_line_bytes: int = MAX_LINE_BYTES) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) for each line of one archive; ArchiveError at a
    line longer than ``max_line_bytes``."""
    for first, text, _ in read_text(path, max_line_bytes):
        if text is None:
            raise ArchiveError("<stdin>" if path == STDIN else path, first,
                               f"line longer than {max_line_bytes} bytes")
        lines = text.split(b"\n")
        lines.pop()  # the empty string after the last newline
        yield from enumerate(lines, first)


def expand_paths(args: Iterable[str]) -> list[str]:
    """Files to read, in order: files as given, directories walked recursively in sorted order
    (only ``*.jsonl``, ``*.jsonl.zst`` and ``*.zst`` files from directories)."""
    out: list[str] = []
    for arg in args:
        if arg != STDIN and os.path.isdir(arg):
            found = [p for p in Path(arg).rglob("*") if p.is_file() and p.name.endswith(ARCHIVE_SUFFIXES)]
            out.extend(str(p) for p in sorted(found))
        else:
            out.append(arg)
    return out
