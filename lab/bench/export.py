"""tcpinfo export and summary speed: rows/s against csvtool's default schema on the same archive,
peak RSS exporting 1,000,000 records, DuckDB's per-connection summary over the exported rows.

The archive is ``bench_csvtool``'s (the test data's records with what a busy connection moves
rewritten in every record), so the two converters do the same work on the same bytes.  Needs
the analysis extra.
"""
from __future__ import annotations

import io
import os
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

from lab.bench.csvtool import write_archive
from tcpinfo.csvtool.convert import convert


def _timed(convert_once: Callable[..., int], *args: Path) -> tuple[int, float, float]:
    """(rows, wall seconds, CPU seconds) of one conversion."""
    wall, cpu = time.perf_counter(), time.process_time()
    rows = convert_once(*args)
    return rows, time.perf_counter() - wall, time.process_time() - cpu


def _csvtool(archive: Path) -> int:
    return convert([str(archive)], io.BytesIO())[0]


def _export(archive: Path, out: Path) -> int:
    from tcpinfo.analysis.export import export

    return export([str(archive)], out)[0].rows


_HIGH_WATER = """import sys
from tcpinfo.analysis.cli import main
rc = main(sys.argv[1:])
print(next(line.split()[1] for line in open("/proc/self/status") if line.startswith("VmHWM:")))
sys.exit(rc)
"""
"""``tcpinfo export``, then its own peak resident set.  /proc's VmHWM is this process's alone:
wait4's ru_maxrss also holds the parent's, which a vforked child inherits until it execs."""


def peak_rss_kib(archive: Path, out: Path) -> int:
    """``tcpinfo export -o out archive`` as its own process: its peak resident set, in KiB."""
    proc = subprocess.run([sys.executable, "-c", _HIGH_WATER, "export", "-o", str(out), str(archive)],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise RuntimeError(f"tcpinfo export failed: {proc.stderr}")
    return int(proc.stdout.split()[-1])


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


def run(n_records: int = 200_000, big: int = 1_000_000, rounds: int = 3) -> dict:
    """Rows/s of both converters on ``n_records``, in ``rounds`` alternating runs (the ratio is
    the median of each round's, so a noisy moment slows both sides of it, not one); RSS and
    summary time on ``big`` records."""
    os.sched_setaffinity(0, {min(os.sched_getaffinity(0))})  # one core, children included
    with tempfile.TemporaryDirectory() as tmp:
        small = Path(tmp) / "bench.jsonl.zst"
        write_archive(small, n_records)
        _csvtool(small)  # both converters' first-call costs out of the timed runs
        _export(small, Path(tmp) / "warm-up")
        csv_runs, export_runs = [], []
        for i in range(rounds):
            csv_runs.append(_timed(_csvtool, small))
            export_runs.append(_timed(_export, small, Path(tmp) / f"small-{i}"))
        large = Path(tmp) / "big.jsonl.zst"
        write_archive(large, big)
        rss = round(peak_rss_kib(large, Path(tmp) / "big") / 1024, 1)
        connections, sql_s, total_s = _summary_seconds(Path(tmp) / "big")
    rows = csv_runs[0][0]
    return {
        "records": rows, "rounds": rounds,
        "csvtool_rows_per_s": [round(rows / wall) for _, wall, _ in csv_runs],
        "export_rows_per_s": [round(n / wall) for n, wall, _ in export_runs],
        "export_vs_csvtool": round(statistics.median(c[1] / e[1] for c, e in zip(csv_runs, export_runs)), 3),
        "export_vs_csvtool_cpu": round(statistics.median(c[2] / e[2] for c, e in zip(csv_runs, export_runs)), 3),
        f"export_peak_rss_mib_{big}": rss,
        "summary_connections": connections, f"summary_sql_s_{big}": round(sql_s, 3),
        f"summary_total_s_{big}": round(total_s, 3),
    }


if __name__ == "__main__":
    print(run(int(sys.argv[1]) if len(sys.argv) > 1 else 200_000))
