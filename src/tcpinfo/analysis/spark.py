"""``--engine spark``: the export and the summary as PySpark jobs, for a fleet's archives.

The export is the single-host export cut into tasks: the driver lists the archive files, cuts
them into groups of about equal size, and each task runs ``export.write_group`` (the same row
conversion, ``snapshots``/``mlab``) on its group, writing its own Parquet files
(``part-gNNNNN-NNNNN.parquet``) into the same partitions.  So the dataset has exactly the
single-host export's schema (unsigned integers, nanosecond timestamps: types Spark's own writer
does not have), partitioning and values; only the files are cut differently.  A task's files are
named by its group, so a retried task overwrites what a failed attempt wrote.  Executors must
see the input paths (a shared file system) and the output (the same, or an ``s3://`` URL).

The summary is ``health.connection``'s aggregates in Spark SQL (``query.summary_sql`` with
Spark's ``min_by``/``max_by``) over the dataset as a DataFrame, then ``summarize`` per
connection on the executors: the same code as ``tcpinfo summary`` and the collector.
"""
from __future__ import annotations

import contextlib
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from decimal import Decimal

from py4j.protocol import Py4JError
from pyspark.errors import PySparkException
from pyspark.sql import SparkSession

from tcpinfo.analysis.errors import EngineError
from tcpinfo.analysis.export import COMPRESSION, filesystem, partition_by, write_group
from tcpinfo.analysis.query import summary_row, summary_sql
from tcpinfo.analysis.snapshots import Counts
from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, ArchiveError
from tcpinfo.csvtool.convert import BadInput

LOCAL = "local[*]"
TASKS_PER_CORE = 4
"""Groups per core the job has: small enough groups that a slow one does not hold the job up."""


def session(master: str | None = None) -> SparkSession:
    """The Spark session: ``master`` if given; else the one spark-submit set, or ``local[*]``.

    A local master binds to the loopback address only.  Parquet's nanosecond timestamps are
    read as the long integers they are (Spark's timestamps stop at microseconds).
    """
    submitted = "PYSPARK_GATEWAY_PORT" in os.environ  # the JVM spark-submit started, with its master
    master = master or (None if submitted else LOCAL)
    builder = SparkSession.builder.appName("tcpinfo").config(
        "spark.sql.legacy.parquet.nanosAsLong", "true").config("spark.ui.showConsoleProgress", "false")
    if master:
        builder = builder.master(master)
    if master and master.startswith("local"):
        # the executors are this machine: its Python (a venv's), loopback only, and the JVM
        # this process starts logs errors only (its stderr is the command's)
        os.environ.setdefault("SPARK_LOCAL_IP", "127.0.0.1")
        builder = (builder.config("spark.pyspark.python", sys.executable)
                   .config("spark.driver.host", "127.0.0.1").config("spark.driver.bindAddress", "127.0.0.1")
                   .config("spark.ui.enabled", "false")
                   .config("spark.driver.extraJavaOptions", f"-Dlog4j2.configurationFile={_quiet_log4j()}"))
    spark = builder.getOrCreate()
    spark.sparkContext.setLogLevel("ERROR")
    return spark


def _quiet_log4j() -> str:
    """A log4j2 configuration that prints errors only (written once per process)."""
    path = os.path.join(tempfile.gettempdir(), f"tcpinfo-log4j2-{os.getpid()}.properties")
    with open(path, "w") as f:
        f.write("rootLogger.level = error\nrootLogger.appenderRef.stderr.ref = console\n"
                "appender.console.type = Console\nappender.console.name = console\n"
                "appender.console.target = SYSTEM_ERR\nappender.console.layout.type = PatternLayout\n"
                "appender.console.layout.pattern = spark: %p %c{1}: %m%n\n")
    return path


@contextlib.contextmanager
def running(master: str | None = None) -> Iterator[SparkSession]:
    """``session(master)``, stopped at the end; a Spark that cannot start (no Java, a master
    that does not answer) is an EngineError of one line."""
    def first_line(exc: Exception) -> str:
        return (str(exc).strip().splitlines() or [type(exc).__name__])[0]

    try:
        spark = session(master)
    except (PySparkException, Py4JError) as exc:
        raise EngineError(f"Spark did not start ({first_line(exc)}); it needs Java 17 or later "
                          "(Debian: apt-get install openjdk-17-jre-headless)") from None
    try:
        yield spark
    except (PySparkException, Py4JError) as exc:
        raise EngineError(f"Spark: {first_line(exc)}") from None
    finally:
        spark.stop()


def groups(paths: list[str], n: int) -> list[list[str]]:
    """``paths`` in at most ``n`` groups of about equal total size (largest files first, each
    to the smallest group), each group in the input's order."""
    n = max(1, min(n, len(paths)))
    sizes = {p: os.path.getsize(p) for p in paths}
    loads, members = [0] * n, [[] for _ in range(n)]  # type: list[int], list[list[int]]
    for i in sorted(range(len(paths)), key=lambda i: -sizes[paths[i]]):
        g = loads.index(min(loads))
        loads[g] += sizes[paths[i]] + 1
        members[g].append(i)
    return [[paths[i] for i in sorted(m)] for m in members if m]


def _task(job: dict, index: int, paths: list[str]) -> tuple[int, int, int, str | None]:
    """One group, run on an executor: (rows, skipped, files, error line or None).  Bad input
    comes back as its line, not an exception, so the driver prints it as the single-host
    export does."""
    fs, root = filesystem(job["out"])
    counts = Counts()
    try:
        files = write_group(paths, fs, root, shape=job["shape"], by=job["by"], prefix=f"part-g{index:05d}",
                            counts=counts, skip_bad=job["skip_bad"], max_line_bytes=job["max_line_bytes"],
                            parse_time_ns=job["parse_time_ns"], compression=job["compression"])
    except (BadInput, ArchiveError) as exc:
        return counts.rows, counts.skipped, 0, str(exc)
    return counts.rows, counts.skipped, files, None


def export(spark: SparkSession, paths: list[str], out: str, *, shape: str = "snapshots", partition: str = "auto",
           skip_bad: bool = False, max_line_bytes: int = MAX_LINE_BYTES,
           compression: str = COMPRESSION) -> tuple[Counts, int]:
    """The dataset written by tasks of ``spark``; returns (counts, files).  Raises BadInput
    with the first bad line (in input order) after every task has finished."""
    if STDIN in paths:
        raise BadInput("--engine spark reads files, not stdin (-)")
    job = {"out": out, "shape": shape, "by": partition_by(shape, partition, paths), "skip_bad": skip_bad,
           "max_line_bytes": max_line_bytes, "parse_time_ns": time.time_ns(), "compression": compression}
    parts = groups(paths, spark.sparkContext.defaultParallelism * TASKS_PER_CORE)
    if not parts:
        return Counts(), 0
    results = (spark.sparkContext.parallelize(list(enumerate(parts)), len(parts))
               .map(lambda item: _task(job, *item)).collect())
    counts = Counts(sum(r[0] for r in results), sum(r[1] for r in results))
    errors = [r[3] for r in results if r[3]]
    if errors:
        raise BadInput(errors[0])
    return counts, sum(r[2] for r in results)


def _plain(value: object) -> object:
    """Spark's value as ``summarize`` takes it (unsigned 64-bit columns come back Decimal)."""
    return int(value) if isinstance(value, Decimal) else value


def _summarized(row) -> dict[str, object]:
    return summary_row({k: _plain(v) for k, v in row.asDict().items()})


def summaries(spark: SparkSession, datasets: list[str]) -> Iterator[dict[str, object]]:
    """Each connection's summary (``query.SUMMARY_COLUMNS``), earliest first, computed as a
    Spark DataFrame over exported datasets (snapshots shape)."""
    spark.read.parquet(*datasets).createOrReplaceTempView("snapshots")
    aggregates = spark.sql(summary_sql(spark=True))
    return aggregates.rdd.map(_summarized).toLocalIterator()
