"""csvtool: convert tcp-info archives to CSV (UPSTREAM.md §7), streaming, with a modern schema.

The default output is byte-identical to upstream's ``csvtool`` (see ``upstream_csv``, which does
most of its work in C).  ``--schema modern`` and ``--json`` give correct names and values instead:
every field the kernel sent and nothing it did not, a UUID column and no metadata row.
"""
from __future__ import annotations

import argparse
import sys
from typing import BinaryIO

import orjson

from . import __version__
from .archive import MAX_LINE_BYTES, STDIN, ArchiveError, expand_paths, read_text
from .modern import MODERN_HEADER, BadInput, long_line, modern_fields, positive_int
from .upstream_csv import UpstreamConverter, go_csv_field


# --- modern schema ---------------------------------------------------------------------------

class ModernConverter:
    """Rows of the modern schema (CSV or JSON lines); the UUID comes from the file's header line."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.uuid = ""

    def header(self) -> str | None:
        return None if self.json_lines else ",".join(MODERN_HEADER)

    def start_file(self) -> None:
        self.uuid = ""

    def write_rows(self, text: bytes, pos: int, out: BinaryIO) -> tuple[int, int]:
        """No fast path: every line goes through ``row``."""
        return pos, 0

    def row(self, line: bytes) -> str | None:
        fields, metadata = modern_fields(line)
        if metadata is not None:
            self.uuid = str(metadata.get("UUID", ""))
        if fields is None:
            return None
        fields = {"uuid": self.uuid, **fields}
        if self.json_lines:
            return orjson.dumps(fields).decode()
        return ",".join(go_csv_field(str(fields.get(col, ""))) for col in MODERN_HEADER)


# --- driver ----------------------------------------------------------------------------------

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
    for lineno, text in read_text(path, max_line_bytes):
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


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="csvtool",
        description="Convert tcp-info archives (JSONL or .zst) to CSV. With no FILE, read plain JSONL "
                    "from stdin (as upstream does); '-' is stdin too (zstd detected by its magic number).",
    )
    p.add_argument("files", nargs="*", metavar="FILE",
                   help="archive files or directories (walked recursively in sorted order)")
    p.add_argument("--schema", choices=("upstream", "modern"), default="upstream",
                   help="upstream: byte-identical to M-Lab's csvtool (default); modern: correct names, "
                        "every kernel field, UUID column, no metadata row")
    p.add_argument("--json", action="store_true", help="write decoded JSON lines (modern field names)")
    p.add_argument("--skip-bad", action="store_true",
                   help="skip lines that cannot be decoded (or are too long) and report how many on stderr")
    p.add_argument("--max-line-bytes", type=positive_int, default=MAX_LINE_BYTES, metavar="N",
                   help=f"a longer line is bad input, dropped unread (default {MAX_LINE_BYTES}; records "
                        "are 1-2 KB): keeps memory bounded on input without newlines")
    p.add_argument("-version", "--version", action="version", version=f"%(prog)s {__version__}")
    return p


def main(argv: list[str] | None = None) -> int:
    """Console entry point: exit 0 on success, 1 on any bad input, always a one-line error."""
    args = _parser().parse_args(argv)
    try:
        paths = expand_paths(args.files) if args.files else [STDIN]
        _, skipped = convert(paths, sys.stdout.buffer, schema=args.schema, json_lines=args.json,
                             skip_bad=args.skip_bad, max_line_bytes=args.max_line_bytes)
        sys.stdout.flush()
    except (BadInput, ArchiveError) as exc:
        print(f"csvtool: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        sys.stderr.close()
        return 1
    except KeyboardInterrupt:
        return 130
    if skipped:
        print(f"csvtool: skipped {skipped} bad line{'s' * (skipped != 1)}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
