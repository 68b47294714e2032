"""``tcpinfo export``: archives -> a Hive-partitioned Parquet dataset, streaming.

The rows come from the per-archive pure functions (``snapshots.archive_batches``,
``mlab.archive_batches``); this module only walks the inputs, splits batches by partition and
writes each partition's files, so a distributed engine runs the same ``write_group`` per group of
files (``analysis.spark``) and writes the same dataset.  The dataset is a directory or an object
store URL (``s3://bucket/prefix``: pyarrow's filesystems).  Memory holds the batch being converted
(``snapshots.BATCH_ROWS``), the batches queued for row groups (``ROW_GROUP_BYTES`` at most) and at
most ``MAX_OPEN`` writers, whatever the input size (the mlab shape also holds one archive).
"""
from __future__ import annotations

import os
import sys
import time
import urllib.parse
from collections import OrderedDict
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from tcpinfo.analysis import mlab, snapshots
from tcpinfo.analysis.snapshots import Counts, host_of
from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN

MAX_OPEN = 64
"""Partition files open at once; the least recently written is closed beyond it."""
HIVE_NULL = "__HIVE_DEFAULT_PARTITION__"
COMPRESSION = "zstd"
"""The default codec: zstd's files are a quarter smaller than lz4's and snappy's.  Alone, lz4
writes 20% faster, but within the whole export that is inside the machine's noise
(``--compression``; docs/benchmarks.md)."""
ROW_GROUP_ROWS = 32_768
ROW_GROUP_BYTES = 24 << 20
"""A row group holds up to this many rows or bytes of Arrow data (whichever comes first), and
batches wait for it in memory, up to that many bytes across all partitions.  Groups larger than
one 8,192-row batch write faster (fewer column chunks, each with its headers and statistics):
65,536 rows wrote 25% faster but took peak RSS to 202 MiB; 32,768 keeps it near 170 MiB (see
docs/benchmarks.md)."""
SNAPSHOT_STATISTICS = ["timestamp", "uuid", "host", "date", "archive_start_time", "source_file",
                       "idm_src", "idm_dst", "idm_sport", "idm_dport", "idm_cookie"]
"""Columns with min/max statistics: those a query selects rows by (time, connection, host,
endpoints), which lets DuckDB and Spark skip row groups.  Statistics on the ~110 tcp_info
counters cost 10-25% of the write time and filter nothing (every group spans their range)."""


def hosts_in_names(paths: list[str]) -> set[str]:
    """Hosts named by archive file names (``<uuid>.<seq>.jsonl[.zst]``); unknown ones left out."""
    return {h for p in paths if p != STDIN and (h := host_of(os.path.basename(p).split(".", 1)[0]))}


def partition_columns(partition: str, paths: list[str]) -> list[str]:
    """``date``, plus ``host`` when asked or (``auto``) when the file names show several hosts."""
    if partition == "date" or (partition == "auto" and len(hosts_in_names(paths)) < 2):
        return ["date"]
    return ["date", "host"]


def _segment(name: str, value: object) -> str:
    if value is None:
        return f"{name}={HIVE_NULL}"
    return f"{name}={urllib.parse.quote(str(value), safe='')}"


def is_url(location: str) -> bool:
    """Whether a dataset location is a URL pyarrow's filesystems resolve (``s3://...``), not a path."""
    return "://" in location


def filesystem(out: str) -> tuple[pafs.FileSystem, str]:
    """The filesystem and path of a dataset location: a local directory, or a URL pyarrow knows
    (``s3://bucket/prefix``, credentials and endpoint from the environment as for the AWS CLI, or
    URL options such as ``?endpoint_override=host:port&scheme=http``)."""
    if is_url(out):
        fs, path = pafs.FileSystem.from_uri(out)
        return fs, path.rstrip("/")
    return pafs.LocalFileSystem(), os.path.abspath(out)


def entries(fs: pafs.FileSystem, root: str) -> list[pafs.FileInfo]:
    """What ``root`` holds (nothing if it does not exist)."""
    return fs.get_file_info(pafs.FileSelector(root, allow_not_found=True))


@dataclass
class _Queue:
    """A partition's batches waiting for its next row group."""

    batches: list[pa.RecordBatch] = field(default_factory=list)
    rows: int = 0
    nbytes: int = 0

    def add(self, batch: pa.RecordBatch) -> None:
        self.batches.append(batch)
        self.rows += batch.num_rows
        self.nbytes += batch.nbytes


class PartitionedWriter:
    """Parquet files under ``root/<col>=<value>/<prefix>-NNNNN.parquet``, one open writer per
    partition (capped)."""

    def __init__(self, fs: pafs.FileSystem, root: str, schema: pa.Schema, by: list[str], prefix: str = "part",
                 statistics: bool | list[str] = True, compression: str = COMPRESSION) -> None:
        self.fs, self.root, self.by, self.prefix, self.compression = fs, root, by, prefix, compression
        self.file_schema = pa.schema([f for f in schema if f.name not in by])
        # dictionary-encode the strings only: integer dictionaries of ever-changing counters
        # cost twice the write time and made the files 40% larger (zstd does better alone)
        self.dictionary = [f.name for f in self.file_schema if pa.types.is_string(f.type)]
        self.statistics = statistics if isinstance(statistics, bool) else [c for c in statistics if c not in by]
        self._open: OrderedDict[tuple, pq.ParquetWriter] = OrderedDict()
        self._parts: dict[tuple, int] = {}
        self._queues: dict[tuple, _Queue] = {}
        self.files = 0

    def write(self, batch: pa.RecordBatch) -> None:
        keys = [batch.column(c) for c in self.by]
        if all(k.null_count in (0, len(k)) and len(pc.unique(k)) == 1 for k in keys):
            self._write(tuple(k[0].as_py() for k in keys), batch)
            return
        table = pa.Table.from_batches([batch])
        groups = table.group_by(self.by, use_threads=False).aggregate([])
        for key in groups.to_pylist():
            mask = None
            for c in self.by:
                cond = (pc.is_null(table[c]) if key[c] is None
                        else pc.equal(table[c], pa.scalar(key[c], table.schema.field(c).type)))
                mask = cond if mask is None else pc.and_(mask, cond)
            for part in table.filter(mask).to_batches():
                self._write(tuple(key[c] for c in self.by), part)

    def _write(self, key: tuple, batch: pa.RecordBatch) -> None:
        """Queues the batch for its partition's next row group; writes the row group when it is
        full, and the largest queue when the queues hold more than ROW_GROUP_BYTES."""
        self._touch(key)
        queue = self._queues.setdefault(key, _Queue())
        queue.add(batch.drop_columns(self.by) if self.by else batch)
        if queue.rows >= ROW_GROUP_ROWS or queue.nbytes >= ROW_GROUP_BYTES:
            self._flush(key)
        while sum(q.nbytes for q in self._queues.values()) > ROW_GROUP_BYTES:
            self._flush(max(self._queues, key=lambda k: self._queues[k].nbytes))

    def _flush(self, key: tuple) -> None:
        """Writes the partition's queued batches as one row group."""
        queue = self._queues.pop(key, None)
        if queue and queue.batches:
            table = pa.Table.from_batches(queue.batches)
            self._open[key].write_table(table, row_group_size=table.num_rows)   # one group, not a remainder

    def _touch(self, key: tuple) -> None:
        """Opens the partition's file if it has none (closing the least recently used beyond
        MAX_OPEN), and marks it the most recently used."""
        writer = self._open.get(key)
        if writer is None:
            if len(self._open) >= MAX_OPEN:
                self._close_oldest()
            n = self._parts.get(key, 0)
            self._parts[key] = n + 1
            directory = "/".join([self.root, *(_segment(c, v) for c, v in zip(self.by, key))])
            self.fs.create_dir(directory, recursive=True)
            writer = pq.ParquetWriter(f"{directory}/{self.prefix}-{n:05d}.parquet", self.file_schema,
                                      filesystem=self.fs, compression=self.compression,
                                      use_dictionary=self.dictionary, write_statistics=self.statistics)
            self.files += 1
            self._open[key] = writer
        else:
            self._open.move_to_end(key)

    def _close_oldest(self) -> None:
        key = next(iter(self._open))
        try:
            self._flush(key)
        finally:
            self._open.pop(key).close()

    def close(self) -> None:
        """Writes what is queued and finishes every file (also after an error: every row
        converted before it is in a readable file)."""
        while self._open:
            self._close_oldest()


class Progress:
    """A one-line progress report on stderr, at most five updates a second; silent if off."""

    def __init__(self, enabled: bool, paths: list[str]) -> None:
        self.enabled = enabled
        self.sizes = {p: (os.path.getsize(p) if p != STDIN and os.path.isfile(p) else 0) for p in paths}
        self.total = sum(self.sizes.values())
        self.files_done = self.bytes_done = 0
        self.start = self._last = time.monotonic()

    def update(self, counts: Counts, force: bool = False) -> None:
        share = self.bytes_done / self.total if self.total else 0.0
        self._draw(share, lambda rate: f"{self.files_done}/{len(self.sizes)} files  {counts.rows:,} rows  "
                                       f"{rate(counts.rows):,.0f} rows/s", force)

    def items(self, done: int, total: int, unit: str) -> None:
        """Progress through ``total`` things other than files (a report's connections)."""
        self._draw(done / total if total else 1.0, lambda rate: f"{done}/{total} {unit}", done == total)

    def _draw(self, share: float, text: Callable[[Callable[[int], float]], str], force: bool) -> None:
        """The bar and ``text(rate)`` (``rate(n)``: n per second since the start), at most
        five times a second unless ``force``."""
        now = time.monotonic()
        if not self.enabled or (not force and now - self._last < 0.2):
            return
        self._last = now
        bar = "#" * int(share * 30)
        sys.stderr.write(f"\r[{bar:<30}] {100 * share:5.1f}%  {text(lambda n: n / max(now - self.start, 1e-9))} ")
        sys.stderr.flush()

    def file_done(self, path: str, counts: Counts) -> None:
        self.files_done += 1
        self.bytes_done += self.sizes.get(path, 0)
        self.update(counts)

    def finish(self, counts: Counts) -> None:
        if self.enabled:
            self.update(counts, force=True)
            sys.stderr.write("\n")


def batches(paths: list[str], shape: str, counts: Counts, progress: Progress | None = None, *,
            skip_bad: bool = False, max_line_bytes: int = MAX_LINE_BYTES,
            parse_time_ns: int | None = None) -> Iterator[pa.RecordBatch]:
    """Every archive's batches in turn (``snapshots`` or ``mlab`` shape)."""
    for path in paths:
        if shape == "mlab":
            yield from mlab.archive_batches(path, counts, skip_bad=skip_bad, max_line_bytes=max_line_bytes,
                                            parse_time_ns=parse_time_ns or time.time_ns())
        else:
            for batch in snapshots.archive_batches(path, counts, skip_bad=skip_bad, max_line_bytes=max_line_bytes):
                yield batch
                if progress:
                    progress.update(counts)
        if progress:
            progress.file_done(path, counts)


def schema_of(shape: str) -> pa.Schema:
    return mlab.SCHEMA if shape == "mlab" else snapshots.SCHEMA


def clear(fs: pafs.FileSystem, root: str) -> None:
    """Removes a previous export's files (``*.parquet`` and the partition directories)."""
    for entry in entries(fs, root):
        if entry.type == pafs.FileType.Directory and "=" in entry.base_name:
            fs.delete_dir(entry.path)
        elif entry.type == pafs.FileType.File and entry.base_name.endswith(".parquet"):
            fs.delete_file(entry.path)


def partition_by(shape: str, partition: str, paths: list[str]) -> list[str]:
    """The partition columns of an export of ``paths`` (M-Lab's row has no host)."""
    return ["date"] if shape == "mlab" else partition_columns(partition, paths)


def write_group(paths: list[str], fs: pafs.FileSystem, root: str, *, shape: str, by: list[str],
                prefix: str = "part", counts: Counts | None = None, report: Progress | None = None,
                skip_bad: bool = False, max_line_bytes: int = MAX_LINE_BYTES,
                parse_time_ns: int | None = None, compression: str = COMPRESSION) -> int:
    """Converts ``paths`` into files named ``<prefix>-NNNNN.parquet`` under ``root``'s
    partitions; returns how many files.  The same input and prefix write the same files, so a
    retried task of a distributed job overwrites what a failed attempt left.  BadInput /
    ArchiveError stop it after closing every file: the rows before the bad line are kept."""
    counts = counts if counts is not None else Counts()
    writer = PartitionedWriter(fs, root, schema_of(shape), by, prefix,
                               statistics=True if shape == "mlab" else SNAPSHOT_STATISTICS, compression=compression)
    try:
        for batch in batches(paths, shape, counts, report, skip_bad=skip_bad, max_line_bytes=max_line_bytes,
                             parse_time_ns=parse_time_ns):
            writer.write(batch)
    finally:
        writer.close()
    return writer.files


def export(paths: list[str], out: Path | str, *, shape: str = "snapshots", partition: str = "auto",
           skip_bad: bool = False, max_line_bytes: int = MAX_LINE_BYTES, progress: bool = False,
           parse_time_ns: int | None = None, compression: str = COMPRESSION) -> tuple[Counts, int]:
    """Writes the dataset in this process; returns (counts, files written)."""
    fs, root = filesystem(str(out))
    counts = Counts()
    report = Progress(progress, paths)
    try:
        files = write_group(paths, fs, root, shape=shape, by=partition_by(shape, partition, paths),
                            counts=counts, report=report, skip_bad=skip_bad, max_line_bytes=max_line_bytes,
                            parse_time_ns=parse_time_ns, compression=compression)
    finally:
        report.finish(counts)
    return counts, files
