"""``tcpinfo sql`` and ``tcpinfo summary``: DuckDB over archives or an exported dataset.

The rows are a view named ``snapshots`` (the snapshots shape of ``tcpinfo export``).  Archives
are first exported to a temporary dataset, so a query may read the table any number of times and
memory stays bounded; a dataset (a directory holding ``*.parquet``, Parquet files, or an
``s3://`` URL, read through pyarrow) is read in place.  The summary is ``health.connection``'s
aggregates as SQL, then its ``summarize`` per connection: the same code as the collector's live
answer.
"""
from __future__ import annotations

import contextlib
import tempfile
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path

import duckdb
import pyarrow as pa
import pyarrow.dataset as ds
import pyarrow.parquet as pq
from pyarrow.fs import FileSelector

from tcpinfo.analysis.errors import Usage
from tcpinfo.analysis.export import HIVE_NULL, export, filesystem, is_url
from tcpinfo.analysis.snapshots import SCHEMA, Counts
from tcpinfo.archive.reader import MAX_LINE_BYTES
from tcpinfo.health.connection import Summary, aggregate_sql, spark_pick, summarize

CONNECTION_KEY = ("coalesce(nullif(uuid, ''), source_file || '#' || CAST(idm_cookie AS STRING))")
"""One connection: its UUID, or for an archive without a header (no UUID) file and cookie (SQL
that DuckDB and Spark both read)."""
SNAPSHOT_ORDER = "coalesce(archive_sequence, 0) * 4294967296 + source_line"
"""A connection's snapshots in archive order (sequence files in turn, lines within each)."""


def is_dataset(path: str) -> bool:
    """Whether ``path`` is an exported dataset: Parquet files, a directory holding them, or an
    object store URL (``s3://bucket/prefix``: archives are read from files only)."""
    if is_url(path):
        return True
    p = Path(path)
    return (p.is_file() and p.suffix == ".parquet") or (p.is_dir() and any(p.rglob("*.parquet")))


def _store_dataset(url: str) -> ds.Dataset:
    """An exported dataset in an object store, read through pyarrow's filesystem (DuckDB's own
    S3 support is an extension it would download): its partitions typed as DuckDB's
    ``hive_partitioning`` types them."""
    fs, root = filesystem(url)
    try:
        files = sorted(f.path for f in fs.get_file_info(FileSelector(root, recursive=True, allow_not_found=True))
                       if f.path.endswith(".parquet"))
    except OSError as exc:
        raise Usage(f"{url}: {str(exc).splitlines()[0]}") from None
    if not files:
        raise Usage(f"{url}: no Parquet files there (give a dataset that tcpinfo export wrote)")
    keys = [pa.field("date", pa.date32())]
    if any("/host=" in f for f in files):
        keys.append(pa.field("host", pa.string()))
    return ds.dataset(files, filesystem=fs, format="parquet", partition_base_dir=root,
                      partitioning=ds.HivePartitioning(pa.schema(keys), null_fallback=HIVE_NULL))


def _parquet_glob(path: str) -> str:
    p = Path(path)
    return str(p) if p.is_file() else str(p / "**" / "*.parquet")


@contextlib.contextmanager
def connect(paths: list[str], archives: list[str], counts: Counts | None = None, *, skip_bad: bool = False,
            max_line_bytes: int = MAX_LINE_BYTES, progress: bool = False) -> Iterator[duckdb.DuckDBPyConnection]:
    """A DuckDB connection with the view ``snapshots`` over ``paths`` (datasets) or
    ``archives`` (converted first, adding to ``counts``); one of the two is empty."""
    with tempfile.TemporaryDirectory(prefix="tcpinfo-sql-") as tmp:
        if archives:
            done, _ = export(archives, Path(tmp), skip_bad=skip_bad, max_line_bytes=max_line_bytes,
                             progress=progress, partition="date")
            if counts is not None:
                counts.rows, counts.skipped = counts.rows + done.rows, counts.skipped + done.skipped
            # an empty file keeps the columns when there are no rows
            empty = Path(tmp) / f"date={HIVE_NULL}"
            empty.mkdir(exist_ok=True)
            pq.write_table(SCHEMA.empty_table().drop_columns(["date"]), empty / "empty.parquet")
            globs = [str(Path(tmp) / "**" / "*.parquet")]
        else:
            globs = [_parquet_glob(p) for p in paths if not is_url(p)]
        con = duckdb.connect(":memory:", config={"threads": 2})
        try:
            sources = []
            if globs:
                files = ", ".join("'" + g.replace("'", "''") + "'" for g in globs)  # views take no parameters
                sources.append(f"SELECT * FROM read_parquet([{files}], hive_partitioning = true, "
                               "union_by_name = true)")
            for i, url in enumerate(p for p in paths if is_url(p)):
                con.register(f"store_{i}", _store_dataset(url))
                sources.append(f"SELECT * FROM store_{i}")
            con.execute("CREATE VIEW snapshots AS " + " UNION ALL BY NAME ".join(sources))
            columns = {row[0] for row in con.execute("DESCRIBE snapshots").fetchall()}
            if "Snapshots" in columns:
                raise Usage("this dataset has M-Lab's row shape: query it with read_parquet(); "
                            "`tcpinfo sql` reads the snapshots shape (tcpinfo export --shape snapshots)")
            yield con
        finally:
            con.close()


def summary_sql(spark: bool = False) -> str:
    """One row per connection: its key, first time, and every health aggregate; in DuckDB's
    dialect, or Spark SQL's (which reads the nanosecond timestamps as Unix-ns integers)."""
    if spark:
        select = aggregate_sql(lambda field: "`" + field.replace(".", "_") + "`", order=SNAPSHOT_ORDER,
                               time="timestamp", pick=spark_pick)
    else:
        select = aggregate_sql(order=SNAPSHOT_ORDER)
    return (f"SELECT {CONNECTION_KEY} AS connection,\n  " + ",\n  ".join(select) + "\nFROM snapshots\n"
            "GROUP BY connection ORDER BY first_ns NULLS LAST, connection")


SUMMARY_COLUMNS = ["connection", "start"] + list(Summary.__dataclass_fields__)


def summaries(con: duckdb.DuckDBPyConnection) -> Iterator[dict[str, object]]:
    """Each connection's summary as a flat dict (``SUMMARY_COLUMNS``), earliest first."""
    cursor = con.execute(summary_sql())
    names = [d[0] for d in cursor.description]
    while rows := cursor.fetchmany(1024):
        for row in rows:
            yield summary_row(dict(zip(names, row)))


def summary_row(values: dict[str, object]) -> dict[str, object]:
    """One row of ``summary_sql`` (whichever engine ran it) as ``SUMMARY_COLUMNS``."""
    first = values["first_ns"]
    start = (None if not isinstance(first, int) else
             datetime.fromtimestamp(first // 10**9, UTC).strftime("%Y-%m-%dT%H:%M:%S") + f".{first % 10**9:09d}Z")
    return {"connection": values["connection"], "start": start, **summarize(values).as_dict()}
