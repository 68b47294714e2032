"""tcpinfo export and summary speed: rows/s against csvtool's default schema on the same archive,
peak RSS exporting 1,000,000 records, DuckDB's per-connection summary over the exported rows.

The archive is ``bench_csvtool``'s (the test data's records with what a busy connection moves
rewritten in every record), so the two converters do the same work on the same bytes.  Needs
the analysis extra.
"""
from __future__ import annotations

import io
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from lab.bench.csvtool import write_archive
from tcpinfo.csvtool.convert import convert


def _export_in_process(archive: Path, out: Path) -> tuple[int, float]:
    from tcpinfo.analysis.export import export

    start = time.perf_counter()
    counts, _ = export([str(archive)], out)
    return counts.rows, time.perf_counter() - start


def _peak_rss_mib(archive: Path, out: Path) -> float:
    """``tcpinfo export`` as its own process: its peak resident set (wait4)."""
    proc = subprocess.Popen([sys.executable, "-m", "tcpinfo.analysis.cli", "export", "-o", str(out),
                             str(archive)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    _, status, usage = os.wait4(proc.pid, 0)
    if os.waitstatus_to_exitcode(status) != 0:
        raise RuntimeError(f"tcpinfo export failed: {proc.stderr.read().decode()}")
    return round(usage.ru_maxrss / 1024, 1)


def _summary_seconds(dataset: Path, rounds: int = 5) -> tuple[int, float, float]:
    """(connections, best seconds for the summary SQL alone, best for SQL + summarize)."""
    from tcpinfo.analysis.query import connect, summaries, summary_sql

    sql_best = total_best = float("inf")
    with connect([str(dataset)], []) as con:
        for _ in range(rounds):
            start = time.perf_counter()
            con.execute(summary_sql()).fetchall()
            sql_best = min(sql_best, time.perf_counter() - start)
            start = time.perf_counter()
            n = sum(1 for _ in summaries(con))
            total_best = min(total_best, time.perf_counter() - start)
    return n, sql_best, total_best


def run(n_records: int = 200_000, big: int = 1_000_000) -> dict:
    """Rows/s of both converters on ``n_records``; RSS and summary time on ``big`` records."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, children included
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "bench.jsonl.zst"
        write_archive(small, n_records)
        convert([str(small)], io.BytesIO())  # both converters' first-call costs out of the timed runs
        start = time.perf_counter()
        rows, _ = convert([str(small)], io.BytesIO())
        csv_s = time.perf_counter() - start
        _export_in_process(small, Path(tmp) / "warm-up")
        exported, export_s = _export_in_process(small, Path(tmp) / "small")
        large = Path(tmp) / "big.jsonl.zst"
        write_archive(large, big)
        rss = _peak_rss_mib(large, Path(tmp) / "big")
        connections, sql_s, total_s = _summary_seconds(Path(tmp) / "big")
    return {
        "records": rows, "csvtool_rows_per_s": round(rows / csv_s), "export_rows_per_s": round(exported / export_s),
        "export_vs_csvtool": round(csv_s / export_s, 3),
        f"export_peak_rss_mib_{big}": rss,
        "summary_connections": connections, f"summary_sql_s_{big}": round(sql_s, 3),
        f"summary_total_s_{big}": round(total_s, 3),
    }


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
