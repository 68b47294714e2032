"""``tcpinfo``: offline analysis of tcp-info archives (export, sql, summary, report).

The subcommands need the ``analysis`` extra (pyarrow, DuckDB, numpy, matplotlib); without it each says so
in one line, naming the install command, and exits 1.  The collector never imports this.
"""
from __future__ import annotations

import argparse
import csv
import importlib
import itertools
import json
import sys
import tempfile
from collections.abc import Iterable, Sequence
from datetime import datetime
from pathlib import Path

from tcpinfo import __version__
from tcpinfo.analysis.errors import EngineError, Usage
from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, ArchiveError, expand_paths
from tcpinfo.csvtool.convert import positive_int

PROG = "tcpinfo"
EXTRA = "pip install 'tcpinfo[analysis]'"
_NEEDS = {"export": ("pyarrow", "numpy"), "sql": ("pyarrow", "numpy", "duckdb"),
          "summary": ("pyarrow", "numpy", "duckdb"), "report": ("pyarrow", "numpy", "duckdb", "matplotlib")}


class MissingExtra(Exception):
    """An analysis dependency is not installed."""


def require(command: str, engine: str = "host") -> None:
    """Imports what ``command`` needs, or raises MissingExtra naming the install command."""
    for module in _NEEDS[command] + (("pyspark",) if engine == "spark" else ()):
        try:
            importlib.import_module(module)
        except ImportError as exc:
            raise MissingExtra(f"{command} needs {module}, which is not installed ({exc}): {EXTRA}") from None


def _input_flags(p: argparse.ArgumentParser, paths: str = "archive files or directories (walked "
                 "recursively), '-' for stdin (zstd or plain)") -> None:
    p.add_argument("paths", nargs="+", metavar="PATH", help=paths)
    p.add_argument("--skip-bad", action="store_true",
                   help="skip lines that cannot be decoded and report how many on stderr")
    p.add_argument("--max-line-bytes", type=positive_int, default=MAX_LINE_BYTES, metavar="N",
                   help=f"a longer line is bad input (default {MAX_LINE_BYTES})")
    p.add_argument("--progress", action=argparse.BooleanOptionalAction, default=None,
                   help="progress bar on stderr (default: when stderr is a terminal)")


def _engine_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--engine", choices=("host", "spark"), default="host",
                   help="host: this process (default); spark: a PySpark job, one task per group of files")
    p.add_argument("--master", metavar="URL", default=None,
                   help="Spark master (--engine spark; default: spark-submit's, else local[*])")


def _output_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--format", choices=("table", "csv", "json"), default=None,
                   help="table on a terminal, CSV when piped (default); json: one object per line")


def parser() -> argparse.ArgumentParser:
    ap = argparse.ArgumentParser(prog=PROG, description="Offline analysis of tcp-info archives "
                                 "(needs the analysis extra: " + EXTRA + ").")
    ap.add_argument("-version", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="command", required=True, metavar="COMMAND")
    e = sub.add_parser("export", help="archives to a Parquet dataset",
                       description="Convert archives to a Hive-partitioned Parquet dataset in DIR.")
    _input_flags(e)
    e.add_argument("-o", "--output", required=True, metavar="DIR",
                   help="dataset directory (created), or an object store URL (s3://bucket/prefix)")
    e.add_argument("--shape", choices=("snapshots", "mlab"), default="snapshots",
                   help="snapshots: one flat row per snapshot (default); mlab: one row per archive "
                        "in M-Lab's published row shape")
    e.add_argument("--partition", choices=("auto", "date", "host"), default="auto",
                   help="date=.../ directories, and host=.../ under them with 'host' or, with 'auto', "
                        "when the file names show several hosts (snapshots shape only)")
    e.add_argument("--compression", choices=("zstd", "lz4", "snappy", "gzip", "none"), default="zstd",
                   help="Parquet codec (default zstd: the smallest files; lz4 and snappy files are "
                        "~35%% larger)")
    e.add_argument("--overwrite", action="store_true",
                   help="replace a previous export in DIR (its partitions and .parquet files)")
    _engine_flags(e)
    q = sub.add_parser("sql", help="a DuckDB query over archives or a dataset (table: snapshots)")
    q.add_argument("query", metavar="SQL")
    _input_flags(q)
    _output_flags(q)
    s = sub.add_parser("summary", help="one line per connection: totals, RTT, retransmits, why slow")
    _input_flags(s)
    _output_flags(s)
    _engine_flags(s)
    r = sub.add_parser("report", help="an HTML page of plots and the summary per connection",
                       description="Write one self-contained HTML page (no external resources) with a "
                                   "section per connection: the summary line, RTT, cwnd, delivery rate and "
                                   "bytes over time with retransmits marked, and the limitation shares.")
    _input_flags(r, "archive files or directories, '-' for stdin, or connection UUIDs (their archives "
                    "<UUID>.NNNNN.jsonl[.zst] are found under --search)")
    r.add_argument("-o", "--output", required=True, metavar="FILE.html", help="the page (replaced)")
    r.add_argument("--search", action="append", metavar="DIR",
                   help="where to look for a UUID's archives, recursively (repeatable; default: .)")
    return ap


def _write(rows: Iterable[Sequence[object]], columns: list[str], fmt: str) -> None:
    out = sys.stdout
    if fmt == "json":
        for row in rows:
            out.write(json.dumps(dict(zip(columns, map(_jsonable, row)))) + "\n")
        return
    if fmt == "csv":
        w = csv.writer(out, lineterminator="\n")
        w.writerow(columns)
        for row in rows:
            w.writerow(["" if v is None else _text(v) for v in row])
        return
    rows = iter(rows)
    head = [[_text(v) for v in row] for row in itertools.islice(rows, 1000)]  # widths from these
    widths = [max([len(c)] + [len(r[i]) for r in head]) for i, c in enumerate(columns)]
    out.write("  ".join(c.ljust(w) for c, w in zip(columns, widths)).rstrip() + "\n")
    for r in itertools.chain(head, ([_text(v) for v in row] for row in rows)):
        out.write("  ".join(v.ljust(w) for v, w in zip(r, widths)).rstrip() + "\n")


def _text(v: object) -> str:
    if v is None:
        return ""
    if isinstance(v, datetime):
        return v.isoformat().replace("+00:00", "Z")
    return str(v)


def _jsonable(v: object) -> object:
    if v is None or isinstance(v, (bool, int, float, str)):
        return v
    return _text(v)


def _inputs(paths: list[str]) -> tuple[list[str], list[str]]:
    """(datasets, archives) among ``paths``; mixing them is a usage error."""
    from tcpinfo.analysis.query import is_dataset

    datasets = [p for p in paths if p != STDIN and is_dataset(p)]
    if datasets and len(datasets) != len(paths):
        raise Usage("give either archives or exported datasets, not both")
    return datasets, ([] if datasets else expand_paths(paths))


def _run(args: argparse.Namespace) -> int:
    progress = sys.stderr.isatty() if args.progress is None else args.progress
    if args.command == "export":
        from pyarrow.fs import FileType

        from tcpinfo.analysis.export import clear, entries, export, filesystem

        fs, root = filesystem(args.output)
        if fs.get_file_info(root).type == FileType.File:
            raise Usage(f"-o {args.output}: not a directory")
        if entries(fs, root):
            if not args.overwrite:
                raise Usage(f"-o {args.output}: directory is not empty (--overwrite replaces its export)")
            clear(fs, root)
        fs.create_dir(root, recursive=True)
        kw = dict(shape=args.shape, partition=args.partition, skip_bad=args.skip_bad,
                  max_line_bytes=args.max_line_bytes, compression=args.compression)
        if args.engine == "spark":
            from tcpinfo.analysis import spark

            with spark.running(args.master) as session:
                counts, files = spark.export(session, expand_paths(args.paths), args.output, **kw)
        else:
            counts, files = export(expand_paths(args.paths), args.output, progress=progress, **kw)
        print(f"{PROG}: exported {counts.rows} {'rows' if args.shape == 'snapshots' else 'snapshots'} "
              f"to {files} file{'s' * (files != 1)} in {args.output}", file=sys.stderr)
        return _skipped(counts.skipped)
    from tcpinfo.analysis.query import SUMMARY_COLUMNS, connect, summaries
    from tcpinfo.analysis.snapshots import Counts

    if args.command == "report":
        from tcpinfo.analysis.report import report, resolve

        page = Path(args.output)
        if not page.parent.is_dir():
            raise Usage(f"-o {args.output}: directory {page.parent} does not exist")
        counts = Counts()
        n = report(resolve(args.paths, args.search or ["."]), page, counts, skip_bad=args.skip_bad,
                   max_line_bytes=args.max_line_bytes, progress=progress)
        print(f"{PROG}: {n} connection{'s' * (n != 1)} in {args.output}", file=sys.stderr)
        return _skipped(counts.skipped)

    fmt = args.format or ("table" if sys.stdout.isatty() else "csv")
    datasets, archives = _inputs(args.paths)
    counts = Counts()
    if args.command == "summary" and args.engine == "spark":
        from tcpinfo.analysis import spark

        with spark.running(args.master) as session, tempfile.TemporaryDirectory(prefix="tcpinfo-spark-") as tmp:
            if archives:
                counts, _ = spark.export(session, archives, tmp, partition="date", skip_bad=args.skip_bad,
                                         max_line_bytes=args.max_line_bytes)
                datasets = [tmp] if counts.rows else []
            rows = spark.summaries(session, datasets) if datasets else iter(())
            _write(([row[c] for c in SUMMARY_COLUMNS] for row in rows), SUMMARY_COLUMNS, fmt)
        sys.stdout.flush()
        return _skipped(counts.skipped)
    with connect(datasets, archives, counts, skip_bad=args.skip_bad, max_line_bytes=args.max_line_bytes,
                 progress=progress) as con:
        if args.command == "sql":
            import duckdb

            try:
                cursor = con.execute(args.query)
            except duckdb.Error as exc:
                raise QueryError(str(exc).splitlines()[0]) from None
            columns = [d[0] for d in cursor.description] if cursor.description else []
            _write(_fetch(cursor), columns, fmt)
        else:
            _write(([row[c] for c in SUMMARY_COLUMNS] for row in summaries(con)), SUMMARY_COLUMNS, fmt)
    sys.stdout.flush()
    return _skipped(counts.skipped)


def _skipped(n: int) -> int:
    if n:
        print(f"{PROG}: skipped {n} bad line{'s' * (n != 1)}", file=sys.stderr)
    return 0


def _fetch(cursor) -> Iterable[Sequence[object]]:
    while rows := cursor.fetchmany(4096):
        yield from rows


class QueryError(Exception):
    """DuckDB refused the query."""


def main(argv: list[str] | None = None) -> int:
    """Exit 0 on success, 1 on bad input or a missing extra, 2 on bad usage; one-line errors."""
    args = parser().parse_args(argv)
    try:
        require(args.command, getattr(args, "engine", "host"))
        from tcpinfo.csvtool.convert import BadInput
    except MissingExtra as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    try:
        return _run(args)
    except Usage as exc:
        print(f"{PROG} {args.command}: {exc}", file=sys.stderr)
        return 2
    except (BadInput, ArchiveError, QueryError, EngineError) as exc:
        print(f"{PROG}: {exc}", file=sys.stderr)
        return 1
    except BrokenPipeError:
        sys.stderr.close()
        return 1
    except KeyboardInterrupt:
        return 130


if __name__ == "__main__":
    sys.exit(main())
