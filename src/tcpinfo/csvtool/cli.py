"""csvtool: convert tcp-info archives to CSV (UPSTREAM.md §7), streaming, with a modern schema.

The default output is byte-identical to upstream's ``csvtool`` (see ``upstream``, which does most of
its work in C).  ``--schema modern`` and ``--json`` give correct names and values instead (see
``modern``): every field the kernel sent and nothing it did not, a UUID column and no metadata row.
"""
from __future__ import annotations

import argparse
import sys

from tcpinfo import __version__
from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, ArchiveError, expand_paths
from tcpinfo.csvtool.convert import BadInput, convert, positive_int


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
