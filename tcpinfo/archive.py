"""Streaming reader of archive files: plain JSON lines or zstd (any number of frames).

Archives can be far larger than memory, so lines are yielded one at a time from fixed-size
chunks.  zstd is decoded in-process frame by frame so that a truncated final frame (a crashed
writer) is reported instead of silently ending the file early.  Every error names the file and
the line it was reading.
"""
from __future__ import annotations

import os
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import BinaryIO

import zstandard

STDIN = "-"
ZSTD_MAGIC = b"\x28\xb5\x2f\xfd"
CHUNK = 1 << 15
"""Compressed bytes read per step (zstd output per step stays around a megabyte)."""
ARCHIVE_SUFFIXES = (".jsonl", ".jsonl.zst", ".zst")


class ArchiveError(Exception):
    """A problem in one input, located by file name and 1-based line number (0 = the whole file)."""

    def __init__(self, name: str, line: int, message: str) -> None:
        super().__init__(f"{name}:{line}: {message}" if line else f"{name}: {message}")
        self.name, self.line, self.message = name, line, message


def _zstd_chunks(first: bytes, stream: BinaryIO) -> Iterator[bytes]:
    """Decompressed chunks of a multi-frame zstd stream; ZstdError if the last frame is cut short."""
    dctx = zstandard.ZstdDecompressor()
    dobj = dctx.decompressobj()
    pending = first
    in_frame = False
    while True:
        if not pending:
            pending = stream.read(CHUNK)
            if not pending:
                break
        in_frame = True
        out = dobj.decompress(pending)
        if out:
            yield out
        if dobj.eof:
            pending = dobj.unused_data
            dobj = dctx.decompressobj()
            in_frame = False
        else:
            pending = b""
    if in_frame:
        raise zstandard.ZstdError("truncated zstd frame (unexpected end of file)")


def _chunks(stream: BinaryIO) -> Iterator[bytes]:
    """Raw chunks of the stream, decompressed when it starts with the zstd magic number."""
    first = stream.read(CHUNK)
    if first.startswith(ZSTD_MAGIC):
        yield from _zstd_chunks(first, stream)
        return
    while first:
        yield first
        first = stream.read(CHUNK)


def iter_text(stream: BinaryIO, name: str) -> Iterator[tuple[int, bytes]]:
    """(number of the first line, whole lines each ending in ``\n``) per decompressed chunk.

    Blocks of text rather than single lines keep per-line Python work off the hot path: csvtool
    hands them to C as they are.  A final line without a newline still counts (one is added), as
    with Go's bufio.Scanner; a trailing ``\r`` is left in place (JSON treats it as whitespace).
    """
    lineno = 1
    tail: list[bytes] = []   # pieces of an unfinished line, joined once it ends (a line spanning
    try:                     # many chunks stays linear)
        for chunk in _chunks(stream):
            end = chunk.rfind(b"\n") + 1
            if not end:
                tail.append(chunk)
                continue
            text = b"".join((*tail, chunk[:end])) if tail else chunk[:end]
            tail = [chunk[end:]] if end < len(chunk) else []
            yield lineno, text
            lineno += text.count(b"\n")
    except zstandard.ZstdError as exc:
        raise ArchiveError(name, lineno, f"zstd: {exc}") from None
    except OSError as exc:
        raise ArchiveError(name, lineno, f"read error: {exc.strerror or exc}") from None
    if tail:
        yield lineno, b"".join((*tail, b"\n"))


def read_text(path: str) -> Iterator[tuple[int, bytes]]:
    """Text blocks of one archive (see ``iter_text``); ``-`` is standard input.  A missing file
    raises ArchiveError."""
    if path == STDIN:
        yield from iter_text(sys.stdin.buffer, "<stdin>")
        return
    try:
        stream = open(path, "rb")
    except OSError as exc:
        raise ArchiveError(path, 0, f"cannot open: {exc.strerror or exc}") from None
    with stream:
        yield from iter_text(stream, path)


def read_archive(path: str) -> Iterator[tuple[int, bytes]]:
    """(line number, line without its newline) for each line of one archive."""
    for first, text in read_text(path):
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
