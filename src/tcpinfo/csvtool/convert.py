"""csvtool's driver: files in, rows out, in bounded memory; bad input named by file and line.

Each block of input goes to the converter's fast path (upstream's schema: C); the lines it leaves go
through the converter's ``row`` one at a time, which is where bad input is reported.
"""
from __future__ import annotations

import argparse
from typing import BinaryIO

from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, read_text
from tcpinfo.csvtool.modern import ModernConverter
from tcpinfo.csvtool.upstream import UpstreamConverter


class BadInput(Exception):
    """Stops a conversion (csvtool's, or tcpinfo export's); the message is one line naming file
    and line."""


def long_line(name: str, lineno: int, max_line_bytes: int) -> BadInput:
    """The error for a line the reader dropped because it was longer than ``max_line_bytes``."""
    return BadInput(f"{name}:{lineno}: line longer than {max_line_bytes} bytes (--max-line-bytes)")


def positive_int(text: str) -> int:
    """argparse type of the converters' ``--max-line-bytes``: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: want a positive integer")
    return value


def convert(paths: list[str], out: BinaryIO, *, schema: str = "upstream", json_lines: bool = False,
            skip_bad: bool = False, max_line_bytes: int = MAX_LINE_BYTES) -> tuple[int, int]:
    """Stream every line of ``paths`` to ``out``; returns (rows written, bad lines skipped).

    Raises BadInput (or ArchiveError for unreadable/corrupt files) on the first bad line unless
    ``skip_bad``; the rows before it are written.  Input is read a block at a time and a line
    longer than ``max_line_bytes`` is bad input, never held, so memory stays flat whatever the
    input (even a small zstd file that expands to gigabytes without a newline).
    """
    converter: UpstreamConverter | ModernConverter = (
        UpstreamConverter() if schema == "upstream" and not json_lines else ModernConverter(json_lines))
    header = converter.header()
    if header is not None:
        out.write((header + "\n").encode())
    written = skipped = 0
    for path in paths:
        converter.start_file()
        w, s = convert_file(converter, path, out, skip_bad, max_line_bytes)
        written, skipped = written + w, skipped + s
    return written, skipped


def convert_file(converter: UpstreamConverter | ModernConverter, path: str, out: BinaryIO,
                 skip_bad: bool, max_line_bytes: int = MAX_LINE_BYTES) -> tuple[int, int]:
    """One file through ``converter``; returns (rows written, bad lines skipped).

    Each block goes to the converter's fast path; the lines it leaves go through ``row`` one at a
    time, which is where bad input is reported with its line number.
    """
    name = "<stdin>" if path == STDIN else path
    written = skipped = 0
    for lineno, text, _ in read_text(path, max_line_bytes):
        if text is None:  # the reader has already dropped it
            if not skip_bad:
                raise long_line(name, lineno, max_line_bytes)
            skipped += 1
            continue
        pos = 0
        while True:
            pos, rows = converter.write_rows(text, pos, out)
            written += rows
            lineno += rows
            if pos == len(text):
                break
            end = text.index(b"\n", pos)
            try:
                row = converter.row(text[pos:end])
            except (ValueError, OverflowError) as exc:
                if not skip_bad:
                    raise BadInput(f"{name}:{lineno}: {exc}") from None
                skipped += 1
            else:
                if row is not None:
                    out.write((row + "\n").encode("utf-8", "surrogateescape"))
                    written += 1
            pos = end + 1
            lineno += 1
    return written, skipped
