"""What one connection's tcp_info snapshots say: its totals, RTT, loss, and why it was slow.

Two ways in, one way out.  A live consumer (the collector's query answer, its per-close counter)
feeds an ``Accumulator`` one snapshot at a time; an engine over many snapshots (DuckDB, Spark)
computes the same ``AGGREGATES`` in SQL (``aggregate_sql``).  Either way the result is the same
mapping of aggregate names to values, and ``summarize`` turns it into a ``Summary``, so the
derived values and the "why slow" rule exist once.

Snapshots are mappings of the modern schema's field names (``tcp.rtt``, ``idm.state``, ... as
``tcpinfo.modern`` and ``inetdiag.decode_attributes`` name them) to integers; a field the kernel
did not send is absent (or None).  The rule and its thresholds are documented in
docs/why-slow.md; the constants below are the thresholds it names.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import asdict, dataclass
from typing import Any, NamedTuple


class Aggregate(NamedTuple):
    """One value computed over a connection's snapshots.

    ``op``: ``min``, ``max``, ``sum``, ``count`` (snapshots where the field is present), ``first``
    or ``last`` (the value of the first / last snapshot that has the field).  ``nonzero``: zeros
    do not count (the kernel reports rtt 0 before its first sample).
    """

    name: str
    op: str
    field: str
    nonzero: bool = False


TIME = "timestamp"
"""The pseudo-field holding a snapshot's time (Unix ns) in ``Accumulator.add``."""

AGGREGATES: tuple[Aggregate, ...] = (
    Aggregate("first_ns", "min", TIME),
    Aggregate("last_ns", "max", TIME),
    Aggregate("rtt_min_us", "min", "tcp.rtt", nonzero=True),
    Aggregate("rtt_max_us", "max", "tcp.rtt", nonzero=True),
    Aggregate("rtt_sum_us", "sum", "tcp.rtt", nonzero=True),
    Aggregate("rtt_samples", "count", "tcp.rtt", nonzero=True),
    Aggregate("min_rtt_us", "min", "tcp.min_rtt", nonzero=True),
    Aggregate("delivery_rate_max", "max", "tcp.delivery_rate"),
    Aggregate("delivery_rate_last", "last", "tcp.delivery_rate"),
    Aggregate("app_limited_snapshots", "sum", "tcp.delivery_rate_app_limited"),
    Aggregate("info_snapshots", "count", "tcp.delivery_rate_app_limited"),
    Aggregate("bytes_acked", "last", "tcp.bytes_acked"),
    Aggregate("bytes_received", "last", "tcp.bytes_received"),
    Aggregate("bytes_sent", "last", "tcp.bytes_sent"),
    Aggregate("bytes_retrans", "last", "tcp.bytes_retrans"),
    Aggregate("data_segs_out", "last", "tcp.data_segs_out"),
    Aggregate("total_retrans", "last", "tcp.total_retrans"),
    Aggregate("total_rto", "last", "tcp.total_rto"),
    Aggregate("total_rto_recoveries", "last", "tcp.total_rto_recoveries"),
    Aggregate("busy_first_us", "first", "tcp.busy_time"),
    Aggregate("busy_us", "last", "tcp.busy_time"),
    Aggregate("rwnd_limited_us", "last", "tcp.rwnd_limited"),
    Aggregate("sndbuf_limited_us", "last", "tcp.sndbuf_limited"),
    Aggregate("state", "last", "idm.state"),
)
"""Everything ``summarize`` reads, and how each is computed from the snapshots."""

# --- the rule's thresholds (docs/why-slow.md) -------------------------------------------------
APP_BUSY_SHARE = 0.5
"""Below this share of the observed time with data outstanding (busy), the sender was idle most
of the time: the application did not give it data faster."""
INITIAL_WINDOW_SEGMENTS = 10
"""A flow of at most this many data segments fits in Linux's initial congestion window: only the
application (how much it had to send) limited it, unless the receive window or send buffer did."""
LIMIT_SHARE = 0.2
"""A receive-window or send-buffer share of the busy time at least this large names that limit
even for a small or mostly idle flow."""

CLASSES = ("application", "receive_window", "send_buffer", "network", "unknown")


@dataclass(frozen=True)
class Summary:
    """One connection, as ``tcpinfo summary`` prints it and the collector answers a query.

    Units are in the names: ``_s`` seconds, ``_ms`` milliseconds, ``_bps`` bits per second,
    shares are fractions 0-1.  None: the snapshots did not hold what the value needs.
    """

    snapshots: int
    duration_s: float | None
    bytes_acked: int | None
    bytes_received: int | None
    rtt_min_ms: float | None
    rtt_mean_ms: float | None
    rtt_max_ms: float | None
    min_rtt_ms: float | None
    retrans_share: float | None
    retransmits: int | None
    rtos: int | None
    delivery_rate_max_bps: int | None
    delivery_rate_last_bps: int | None
    busy_share: float | None
    rwnd_limited_share: float | None
    sndbuf_limited_share: float | None
    app_limited_share: float | None
    why_slow: str
    evidence: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


class Accumulator:
    """A connection's ``AGGREGATES``, updated one snapshot at a time in constant memory."""

    __slots__ = ("rows", "_values")

    def __init__(self) -> None:
        self.rows = 0
        self._values: dict[str, int | None] = {a.name: None for a in AGGREGATES}

    def add(self, ts_ns: int | None, fields: Mapping[str, object]) -> None:
        """One snapshot: its time (Unix ns, None if unknown) and its decoded fields."""
        self.rows += 1
        values = self._values
        for name, op, field, nonzero in AGGREGATES:
            value = ts_ns if field == TIME else fields.get(field)
            if not isinstance(value, int) or (nonzero and value == 0):   # absent (or text)
                continue
            old = values[name]
            if op == "count":
                values[name] = (old or 0) + 1
            elif op == "sum":
                values[name] = (old or 0) + value
            elif old is None or op == "last":
                values[name] = value
            elif op == "min":
                values[name] = min(old, value)
            elif op == "max":
                values[name] = max(old, value)

    def values(self) -> dict[str, int | None]:
        """The aggregates so far, as ``summarize`` takes them (``rows`` included)."""
        return {"rows": self.rows, **self._values}

    def summary(self) -> Summary:
        return summarize(self.values())


def duckdb_pick(op: str, column: str, order: str) -> str:
    """DuckDB's first / last value of ``column`` by ``order`` (``arg_min`` / ``arg_max`` skip
    NULL values, as ``Accumulator`` skips absent fields)."""
    return f"{'arg_min' if op == 'first' else 'arg_max'}({column}, {order})"


def spark_pick(op: str, column: str, order: str) -> str:
    """Spark SQL's first / last value (``min_by`` / ``max_by`` would take a NULL value, so
    rows without one are filtered out)."""
    return f"{'min_by' if op == 'first' else 'max_by'}({column}, {order}) FILTER (WHERE {column} IS NOT NULL)"


def aggregate_sql(quote=lambda field: '"' + field.replace(".", "_") + '"', *, time: str = "epoch_ns(timestamp)",
                  order: str = "snapshot_order", pick: Callable[[str, str, str], str] = duckdb_pick) -> list[str]:
    """``AGGREGATES`` as SQL select expressions (``expr AS name``), ``rows`` first.

    ``quote`` maps a modern field name to its column (the Parquet export's names by default),
    ``time`` is the Unix-ns expression of a row's time and ``order`` the column that orders a
    connection's snapshots (for first / last, which ``pick`` writes in the engine's dialect:
    ``duckdb_pick`` or ``spark_pick``).
    """
    out = ["count(*) AS rows"]
    for name, op, field, nonzero in AGGREGATES:
        column = time if field == TIME else quote(field)
        if nonzero:
            column = f"nullif({column}, 0)"
        if op in ("first", "last"):
            expr = pick(op, column, order)
        else:
            expr = f"{op}({column})"
        out.append(f"{expr} AS {name}")
    return out


def _share(part: int | None, whole: int | float | None) -> float | None:
    if part is None or not whole:
        return None
    return min(max(part / whole, 0.0), 1.0)


def _ms(us: float | None) -> float | None:
    return None if us is None else round(us / 1000, 3)


def summarize(v: Mapping[str, Any]) -> Summary:
    """The derived values and the "why slow" class from a connection's aggregates (see
    ``Accumulator.values`` and ``aggregate_sql``; missing names count as None)."""
    def g(name: str) -> Any:   # a missing aggregate is None, like an absent field
        return v.get(name)

    first, last = g("first_ns"), g("last_ns")
    duration_ns = None if first is None or last is None else last - first
    rtt_mean = g("rtt_sum_us") / g("rtt_samples") if g("rtt_samples") else None
    if g("bytes_sent") is not None:
        retrans = _share(g("bytes_retrans"), g("bytes_sent"))
    else:  # kernels before 4.19 count segments only
        retrans = _share(g("total_retrans"), g("data_segs_out"))
    busy, first_busy = g("busy_us"), g("busy_first_us")
    # busy time is cumulative over the connection's life; only what accrued while it was
    # observed compares with the observed time
    busy_share = (_share((busy - first_busy) * 1000, duration_ns)
                  if busy is not None and first_busy is not None else None)
    rwnd = _share(g("rwnd_limited_us"), busy)
    sndbuf = _share(g("sndbuf_limited_us"), busy)
    app = _share(g("app_limited_snapshots"), g("info_snapshots"))
    why, evidence = classify(v, busy_share, rwnd, sndbuf, retrans)
    return Summary(
        snapshots=int(g("rows") or 0),
        duration_s=None if duration_ns is None else round(duration_ns / 1e9, 6),
        bytes_acked=g("bytes_acked"), bytes_received=g("bytes_received"),
        rtt_min_ms=_ms(g("rtt_min_us")), rtt_mean_ms=_ms(rtt_mean), rtt_max_ms=_ms(g("rtt_max_us")),
        min_rtt_ms=_ms(g("min_rtt_us")),
        retrans_share=None if retrans is None else round(retrans, 6),
        retransmits=g("total_retrans"), rtos=g("total_rto"),
        delivery_rate_max_bps=None if g("delivery_rate_max") is None else 8 * g("delivery_rate_max"),
        delivery_rate_last_bps=None if g("delivery_rate_last") is None else 8 * g("delivery_rate_last"),
        busy_share=_round(busy_share), rwnd_limited_share=_round(rwnd),
        sndbuf_limited_share=_round(sndbuf), app_limited_share=_round(app),
        why_slow=why, evidence=evidence,
    )


def _round(x: float | None) -> float | None:
    return None if x is None else round(x, 4)


def _pct(x: float | None) -> str:
    return "n/a" if x is None else f"{100 * x:.1f}%"


def classify(v: Mapping[str, int | float | None], busy_share: float | None, rwnd: float | None,
             sndbuf: float | None, retrans: float | None) -> tuple[str, str]:
    """(class, evidence): what limited the connection's sending, from the kernel's counters.

    In order (docs/why-slow.md):
    1. no busy_time in any snapshot (no tcp_info, or a kernel before 4.9): ``unknown``;
    2. it received more than it sent: ``unknown`` (the limits of that flow are the peer's);
    3. never busy (nothing sent): ``application``;
    4. a receive-window or send-buffer share of busy time >= LIMIT_SHARE: the larger of the two;
    5. busy less than APP_BUSY_SHARE of the observed time, or at most INITIAL_WINDOW_SEGMENTS
       data segments sent: ``application``;
    6. otherwise ``network`` (busy and limited by neither window nor buffer: the path, through
       the congestion window), with retransmits and RTOs as evidence.
    """
    g = v.get
    busy = g("busy_us")
    loss = (f"retransmitted {_pct(retrans)} ({g('total_retrans') or 0} segments"
            + (f", {g('total_rto')} RTOs)" if g("total_rto") is not None else ")"))
    shares = (f"busy {_pct(busy_share)} of the time, rwnd-limited {_pct(rwnd)} and "
              f"sndbuf-limited {_pct(sndbuf)} of busy")
    if busy is None:
        return "unknown", "no busy_time counter (no tcp_info, or kernel before 4.9)"
    sent, received = g("bytes_acked") or 0, g("bytes_received") or 0
    if received > sent:
        return "unknown", f"mostly receiving ({received} bytes in, {sent} out): the sender's limits are the peer's"
    if busy == 0:
        return "application", "never had data to send (busy_time 0)"
    if max(rwnd or 0, sndbuf or 0) >= LIMIT_SHARE:
        if (rwnd or 0) >= (sndbuf or 0):
            return "receive_window", f"{shares}; {loss}"
        return "send_buffer", f"{shares}; {loss}"
    segs = g("data_segs_out")
    if busy_share is not None and busy_share < APP_BUSY_SHARE:
        return "application", f"{shares}; {loss}"
    if segs is not None and segs <= INITIAL_WINDOW_SEGMENTS:
        return "application", f"{segs} data segments, within the initial window; {shares}"
    return "network", f"{shares}; {loss}"


def summarize_snapshots(snapshots: Iterable[tuple[int | None, Mapping[str, object]]]) -> Summary:
    """A whole connection at once: (time in Unix ns, fields) per snapshot, in order."""
    acc = Accumulator()
    for ts_ns, fields in snapshots:
        acc.add(ts_ns, fields)
    return acc.summary()
