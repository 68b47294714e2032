"""Reading what tcpinfo export writes, for the tests that compare datasets.

pyarrow is imported only when a function here runs, never when a test module is collected: a
child's peak RSS (wait4) counts the pages of the process that spawned it, and the csvtool tests
that bound their child's memory run before the export tests (test_archive_bounds, test_csvtool).
"""
from __future__ import annotations

from pathlib import Path


def arrow():
    """(pyarrow, pyarrow.dataset), imported on first use."""
    import pyarrow
    import pyarrow.dataset

    return pyarrow, pyarrow.dataset


def read(out: Path | str, filesystem=None):
    """The dataset with its Hive partition columns typed (a null date cannot be inferred);
    ``out`` is a directory, or a path in ``filesystem`` (e.g. pyarrow's S3)."""
    pa, ds = arrow()
    if filesystem is None:
        hosts = any(Path(out).rglob("host=*"))
    else:
        from pyarrow.fs import FileSelector

        hosts = any("host=" in f.path for f in filesystem.get_file_info(FileSelector(str(out), recursive=True)))
    keys = [("date", pa.date32())] + ([("host", pa.string())] if hosts else [])
    return ds.dataset(str(out), format="parquet", filesystem=filesystem,
                      partitioning=ds.partitioning(pa.schema(keys), flavor="hive"))


def sorted_rows(out: Path | str, filesystem=None):
    """The dataset as one table in a fixed order (connection, time, file, line): two exports of
    the same archives compare equal whatever their files' cut."""
    table = read(out, filesystem).to_table()
    keys = [k for k in ("uuid", "timestamp", "source_file", "source_line", "UUID") if k in table.schema.names]
    return table.sort_by([(k, "ascending") for k in keys]).combine_chunks()
