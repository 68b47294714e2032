"""Offline analysis of archives: Parquet export (snapshots, M-Lab's row), DuckDB SQL, summaries.

Needs the ``analysis`` extra (pyarrow, DuckDB, numpy); ``cli`` says so in one line when it is
missing.  The per-archive converters (``snapshots.archive_batches``, ``mlab.archive_batches``)
are pure functions of one file, for engines that run them per file.
"""
