"""``tcpinfo report``: one self-contained HTML page with a section per connection.

Analysts open one file: each connection of the given archives (or UUIDs, found by name under
``--search`` directories) gets its summary line on top (``query.summaries``, the code of
``tcpinfo summary``), plots over time of RTT with min_rtt, the congestion window, the delivery
rate and the bytes acknowledged / received, every retransmit marked, and its limitation shares
as one bar.  matplotlib renders each figure (its object API: no pyplot, no display, no global
state) as SVG inline into the page, so the file needs nothing else: no scripts, no fonts (text is
drawn as paths), no other files.  A long connection's lines are simplified by matplotlib's path
simplification (points that move a line less than a fraction of a pixel are dropped).
"""
from __future__ import annotations

import html
import io
import os
import re
import sys
from collections.abc import Iterable
from pathlib import Path

import matplotlib
import numpy as np
from matplotlib.figure import Figure

from tcpinfo.analysis.export import Progress
from tcpinfo.analysis.query import CONNECTION_KEY, SNAPSHOT_ORDER, SUMMARY_COLUMNS, connect, summaries
from tcpinfo.analysis.snapshots import Counts
from tcpinfo.archive.reader import MAX_LINE_BYTES, STDIN, ArchiveError, expand_paths

SERIES = ("tcp_rtt", "tcp_min_rtt", "tcp_snd_cwnd", "tcp_delivery_rate", "tcp_bytes_acked",
          "tcp_bytes_received", "tcp_total_retrans")
"""The snapshot columns the plots draw."""
RETRANSMIT_COLOR = "#d62728"


def archive_name(uuid: str) -> re.Pattern[str]:
    """The file names of a connection's archives: ``<UUID>.NNNNN.jsonl[.zst]``."""
    return re.compile(re.escape(uuid) + r"\.\d{5}\.jsonl(?:\.zst)?\Z")


def find_archives(uuid: str, directories: Iterable[str]) -> list[str]:
    """Every archive file of ``uuid`` under ``directories`` (walked recursively), in sequence
    order; ArchiveError (named by the UUID) if there is none."""
    pattern, found = archive_name(uuid), []
    dirs = list(directories)
    for top in dirs:
        for root, subdirs, files in os.walk(top):
            subdirs.sort()
            found += [os.path.join(root, f) for f in files if pattern.match(f)]
    if not found:
        raise ArchiveError(uuid, 0, f"not a file, and no archive {uuid}.NNNNN.jsonl[.zst] under "
                           f"{', '.join(dirs)} (--search)")
    return sorted(found, key=os.path.basename)


def resolve(args: Iterable[str], search: Iterable[str]) -> list[str]:
    """Archive files for the command line's words: a file as given, a directory's archives
    (``expand_paths``), ``-`` for stdin, anything else a UUID to find under ``search``."""
    out: list[str] = []
    for arg in args:
        out += expand_paths([arg]) if arg == STDIN or os.path.exists(arg) else find_archives(arg, search)
    return out


Columns = dict[str, np.ndarray]
"""One connection's snapshots as DuckDB's ``fetchnumpy`` gives them (masked where null)."""


def _floats(table: Columns, name: str) -> np.ndarray:
    """A column as float64, NaN where null."""
    return np.ma.filled(np.ma.asarray(table[name]).astype(np.float64), np.nan)


def _svg(fig: Figure, salt: str) -> str:
    """The figure as an inline ``<svg>`` element (the XML prologue and DOCTYPE dropped).
    ``salt`` keeps the clip-path ids of the figures on one page apart."""
    buf = io.StringIO()
    with matplotlib.rc_context({"svg.hashsalt": salt}):
        fig.savefig(buf, format="svg", bbox_inches="tight")
    text = buf.getvalue()
    return text[text.index("<svg"):]


def timeline(table: Columns, salt: str) -> str:
    """RTT and min_rtt, cwnd, delivery rate and bytes over time, retransmits marked: SVG."""
    t_ns = _floats(table, "t_ns")
    start = np.nanmin(t_ns) if np.isfinite(t_ns).any() else 0.0
    t = (t_ns - start) / 1e9
    rtt = _floats(table, "tcp_rtt")
    min_rtt = _floats(table, "tcp_min_rtt")
    retrans = _floats(table, "tcp_total_retrans")
    steps = np.diff(np.nan_to_num(retrans), prepend=np.nan_to_num(retrans[:1]))
    marks = t[(steps > 0) & np.isfinite(t)]
    fig = Figure(figsize=(11, 9.5), layout="constrained")
    axes = fig.subplots(4, 1, sharex=True)
    rtt_ax, cwnd_ax, rate_ax, bytes_ax = axes
    rtt_ax.plot(t, np.where(rtt > 0, rtt, np.nan) / 1000, label="RTT (smoothed)", lw=1.2)
    rtt_ax.plot(t, np.where(min_rtt > 0, min_rtt, np.nan) / 1000, label="min_rtt", lw=1.2, ls="--")
    rtt_ax.set_ylabel("RTT (ms)")
    cwnd_ax.plot(t, _floats(table, "tcp_snd_cwnd"), color="C2", lw=1.2)
    cwnd_ax.set_ylabel("cwnd (segments)")
    rate_ax.plot(t, _floats(table, "tcp_delivery_rate") * 8 / 1e6, color="C4", lw=1.2)
    rate_ax.set_ylabel("delivery rate (Mbit/s)")
    bytes_ax.plot(t, _floats(table, "tcp_bytes_acked") / 1e6, label="bytes acked", lw=1.2, color="C1")
    bytes_ax.plot(t, _floats(table, "tcp_bytes_received") / 1e6, label="bytes received", lw=1.2, color="C5")
    bytes_ax.set_ylabel("MB")
    bytes_ax.set_xlabel("seconds since the first snapshot")
    for ax in axes:
        ax.grid(True, alpha=0.3)
        for x in marks:
            ax.axvline(x, color=RETRANSMIT_COLOR, alpha=0.35, lw=0.8)
    if len(marks):
        rtt_ax.plot(marks, np.interp(marks, t[np.isfinite(rtt)], rtt[np.isfinite(rtt)] / 1000)
                    if np.isfinite(rtt).any() else np.zeros(len(marks)),
                    "v", color=RETRANSMIT_COLOR, ms=5, label=f"retransmit ({len(marks)} snapshots)")
    rtt_ax.set_title("retransmits marked in red" if len(marks) else "no retransmits", fontsize=10, loc="right")
    rtt_ax.legend(loc="upper left", fontsize=8)
    bytes_ax.legend(loc="upper left", fontsize=8)
    return _svg(fig, salt)


LIMIT_PARTS = (("busy, not window- or buffer-limited", "C0"), ("receive-window limited", "C1"),
               ("send-buffer limited", "C3"), ("not busy (nothing to send)", "#cccccc"))


def limitation_parts(summary: dict[str, object]) -> list[float] | None:
    """Shares of the observed time, as LIMIT_PARTS orders them (they add up to 1), from the
    summary's busy share (of the time) and rwnd / sndbuf shares (of the busy time); None
    without the kernel's chronograph counters."""
    busy, rwnd, sndbuf = (summary.get(k) for k in ("busy_share", "rwnd_limited_share", "sndbuf_limited_share"))
    if not isinstance(busy, float | int):
        return None
    rwnd = float(rwnd) if isinstance(rwnd, float | int) else 0.0
    sndbuf = min(float(sndbuf) if isinstance(sndbuf, float | int) else 0.0, 1.0 - rwnd)
    return [busy * (1 - rwnd - sndbuf), busy * rwnd, busy * sndbuf, 1.0 - busy]


def limitation_bar(summary: dict[str, object], salt: str) -> str:
    """The limitation shares as one horizontal stacked bar: SVG, or a note without counters."""
    parts = limitation_parts(summary)
    if parts is None:
        return '<p class="note">No limitation shares: no busy_time counter (no tcp_info, or a kernel before 4.9).</p>'
    fig = Figure(figsize=(11, 1.5), layout="constrained")
    ax = fig.subplots()
    left = 0.0
    for (label, color), share in zip(LIMIT_PARTS, parts):
        ax.barh(0, 100 * share, left=100 * left, color=color, label=f"{label} {100 * share:.1f}%")
        left += share
    ax.set_xlim(0, 100)
    ax.set_yticks([])
    ax.set_xlabel("% of the observed time")
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.5), ncol=4, fontsize=8, frameon=False)
    return _svg(fig, salt)


def _fmt(value: object, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, float):
        return f"{value:,.3f}".rstrip("0").rstrip(".") + unit
    if isinstance(value, int):
        return f"{value:,}{unit}"
    return f"{value}{unit}"


def _pct(value: object) -> str:
    return "n/a" if not isinstance(value, float | int) else f"{100 * value:.1f}%"


def headline(s: dict[str, object]) -> str:
    """The summary in one line of text."""
    rate = s["delivery_rate_max_bps"]
    return (f"{s['start'] or 'no time'} · {_fmt(s['duration_s'], ' s')} · {_fmt(s['snapshots'])} snapshots · "
            f"{_fmt(s['bytes_acked'])} B acked, {_fmt(s['bytes_received'])} B received · "
            f"RTT min/mean/max {_fmt(s['rtt_min_ms'])}/{_fmt(s['rtt_mean_ms'])}/{_fmt(s['rtt_max_ms'])} ms "
            f"(min_rtt {_fmt(s['min_rtt_ms'], ' ms')}) · retransmitted {_pct(s['retrans_share'])} "
            f"({_fmt(s['retransmits'])} segments, {_fmt(s['rtos'])} RTOs) · delivery rate max "
            f"{_fmt(None if not isinstance(rate, int) else rate / 1e6, ' Mbit/s')} · "
            f"why slow: {s['why_slow']}")


STYLE = """
body { font-family: sans-serif; margin: 1.5em; color: #222; max-width: 1150px; }
h1 { font-size: 1.4em; } h2 { font-size: 1.15em; margin-top: 2em; border-top: 1px solid #ccc; padding-top: 1em; }
.headline { font-weight: bold; } .evidence { color: #555; }
table.summary { border-collapse: collapse; font-size: 0.85em; margin: 0.5em 0; }
table.summary td, table.summary th { border: 1px solid #ddd; padding: 2px 6px; text-align: left; }
svg { display: block; max-width: 100%; height: auto; } .note { color: #a00; }
"""


def section(index: int, summary: dict[str, object], table: Columns) -> str:
    """One connection: title, summary line and table, the timeline and the limitation bar."""
    name = html.escape(str(summary["connection"]))
    cells = "".join(f"<tr><th>{html.escape(c)}</th><td>{html.escape(_fmt(summary[c]))}</td></tr>"
                    for c in SUMMARY_COLUMNS[1:])
    return (f'<section id="connection-{index}"><h2>{name}</h2>\n'
            f'<p class="headline">{html.escape(headline(summary))}</p>\n'
            f'<p class="evidence">evidence: {html.escape(str(summary["evidence"]))}</p>\n'
            f'<details><summary>every summary value</summary><table class="summary">{cells}</table></details>\n'
            f"<h3>Over time</h3>\n{timeline(table, f'c{index}t')}\n"
            f"<h3>Limitation shares</h3>\n{limitation_bar(summary, f'c{index}b')}\n</section>\n")


def page(sections: list[tuple[dict[str, object], str]], title: str) -> str:
    """The whole document; a list of contents when it holds several connections."""
    contents = ""
    if len(sections) > 1:
        items = "".join(f'<li><a href="#connection-{i}">{html.escape(str(s["connection"]))}</a> '
                        f'({html.escape(str(s["why_slow"]))})</li>' for i, (s, _) in enumerate(sections))
        contents = f"<ol>{items}</ol>\n"
    body = "".join(text for _, text in sections)
    return ('<!DOCTYPE html>\n<html lang="en"><head><meta charset="utf-8">'
            '<link rel="icon" href="data:,">'  # no favicon request
            f"<title>{html.escape(title)}</title><style>{STYLE}</style></head><body>\n"
            f"<h1>{html.escape(title)}</h1>\n{contents}{body}</body></html>\n")


def report(paths: list[str], out: Path, counts: Counts, *, skip_bad: bool = False,
           max_line_bytes: int = MAX_LINE_BYTES, progress: bool = False) -> int:
    """Writes the page for every connection in the archives ``paths``; returns how many."""
    series = ", ".join(SERIES)
    with connect([], paths, counts, skip_bad=skip_bad, max_line_bytes=max_line_bytes, progress=progress) as con:
        rows = list(summaries(con))
        sections = []
        bar = Progress(progress, [])
        for i, summary in enumerate(rows):
            bar.items(i, len(rows), "connections")
            table = con.execute(f"SELECT epoch_ns(timestamp) AS t_ns, {series} FROM snapshots "
                                f"WHERE {CONNECTION_KEY} = ? ORDER BY {SNAPSHOT_ORDER}",
                                [summary["connection"]]).fetchnumpy()
            sections.append((summary, section(i, summary, table)))
        bar.items(len(rows), len(rows), "connections")
        if progress:
            sys.stderr.write("\n")
    title = f"tcpinfo report: {len(rows)} connection{'s' * (len(rows) != 1)}"
    tmp = out.with_name(out.name + ".tmp")
    tmp.write_text(page(sections, title), encoding="utf-8")
    os.replace(tmp, out)
    return len(rows)
