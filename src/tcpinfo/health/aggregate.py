"""Low-cardinality Prometheus aggregates of the host's TCP, from changed and closed connections.

The C core hands Python only the connections that changed and those that closed, so an idle host
costs nothing here either.  Per changed snapshot the common case is one dict lookup: a connection
is sampled (its rtt and rttvar observed, its current RTT kept for the open-RTT gauges) at most once
per ``sample_interval``, which also weights the snapshot histograms by time rather than by how
often a busy connection changes.  Per closed connection its final tcp_info (the destroy
notification's, or the last snapshot) feeds the closed-connection histograms.  Only a few fields
are read, by struct at the offsets of the tables in tcpinfo.kernel.tcp and tcpinfo.kernel.inetdiag.

Aggregates never carry a connection's identity in a label: a connection belongs to a group, the
label set chosen by the operator (HealthConfig.labels) and fixed at its first snapshot.  At most
``max_groups`` label sets exist; a connection that would make one more is counted in the group
whose every label is ``other`` (and in tcpinfo_health_overflow_connections_total).  A group with no
open connection and no event for ``group_ttl`` is dropped, freeing its slot; its series leave the
exposition, which a remote writer turns into stale markers.  What links an aggregate back to one
connection is the OpenMetrics exemplar on each bucket: the UUID of the latest connection that fell
in it.

Memory per open connection is one small list (about 200 bytes with its dict slot); the open-RTT
gauges (min, max, mean per group) are computed when the registry is collected, one pass over the
open connections, so the hot path never maintains an order.  The collector's thread calls the
``observe_*`` methods and ``expire``; ``collect`` may run at the same time on a scrape or
remote-write thread (a lock covers everything but the lookup that skips a snapshot).
"""
from __future__ import annotations

import ipaddress
import logging
import struct
import threading
from bisect import bisect_left
from collections.abc import Callable, Iterable, Iterator

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry
from prometheus_client.samples import Exemplar
from prometheus_client.utils import floatToGoString

from tcpinfo.base.ratelog import RateLimitedLog
from tcpinfo.health.config import OTHER, UNKNOWN, UNLISTED, HealthConfig
from tcpinfo.health.connection import CLASSES, summarize
from tcpinfo.kernel.inetdiag import (
    AF_INET,
    AF_INET6,
    FAMILY_LABELS,
    IDM_HOST,
    IDM_NET,
    INET_DIAG_CONG,
    INET_DIAG_INFO,
    V4_MAPPED_PREFIX,
    attribute_span,
    congestion_name,
)
from tcpinfo.kernel.tcp import STATE_NAMES, TCP_INFO, struct_for

log = logging.getLogger(__name__)

NS = 1_000_000_000
LISTEN = STATE_NAMES.index("LISTEN")
NO_MIN_RTT = 0xFFFFFFFF           # tcpi_min_rtt before the first RTT sample (~0U)
EXEMPLAR_MAX_RUNES = 128          # OpenMetrics: an exemplar's label names and values together
PREFIX_CACHE = 65_536             # remote-prefix label texts remembered


def _fields(*names: str) -> tuple:
    """(Struct, offset of its first field, field names in offset order) for tcp_info fields."""
    by_name = {f.name: f for f in TCP_INFO.fields}
    chosen = tuple(sorted((by_name[n] for n in names), key=lambda f: f.offset))
    start = chosen[0].offset
    layout = struct_for(chosen, "fmt", start)
    return layout, start, start + layout.size, tuple(f.name for f in chosen)


_SNAP, _SNAP_START, _SNAP_END, _ = _fields("rtt", "rttvar")
_BUSY, _BUSY_START, _BUSY_END, _ = _fields("busy_time")
_FINAL, _FINAL_START, _FINAL_END, _FINAL_NAMES = _fields(
    "rtt", "min_rtt", "delivery_rate", "bytes_acked", "bytes_received", "bytes_sent",
    "bytes_retrans", "busy_time", "rwnd_limited", "sndbuf_limited", "data_segs_out",
    "total_retrans")
# The final counters the why-slow rule reads, by the names of health.connection's AGGREGATES.
_WHY_FIELDS = (("busy_us", "busy_time"), ("rwnd_limited_us", "rwnd_limited"),
               ("sndbuf_limited_us", "sndbuf_limited"), ("bytes_acked", "bytes_acked"),
               ("bytes_received", "bytes_received"), ("bytes_sent", "bytes_sent"),
               ("bytes_retrans", "bytes_retrans"), ("data_segs_out", "data_segs_out"),
               ("total_retrans", "total_retrans"))

# The histograms: (name, help, quantity whose buckets it uses).  Indexes below name them.
HISTOGRAMS: tuple[tuple[str, str, str], ...] = (
    ("tcpinfo_health_rtt_seconds",
     "Smoothed RTT (tcpi_rtt) of open connections: changed snapshots, at most one per "
     "connection per -health.sample-interval.", "rtt"),
    ("tcpinfo_health_rttvar_seconds",
     "RTT variation (tcpi_rttvar, the kernel's jitter estimate) of open connections, sampled "
     "with tcpinfo_health_rtt_seconds.", "rtt"),
    ("tcpinfo_health_closed_min_rtt_seconds",
     "Final min_rtt of closed connections that had an RTT sample.", "rtt"),
    ("tcpinfo_health_closed_rtt_seconds",
     "Final smoothed RTT of closed connections that had an RTT sample.", "rtt"),
    ("tcpinfo_health_closed_retransmitted_ratio",
     "bytes_retrans / bytes_sent of closed connections that sent data (0 is the first "
     "bucket).", "ratio"),
    ("tcpinfo_health_closed_delivery_rate_bytes_per_second",
     "Final delivery_rate of closed connections that delivered data.", "rate"),
    ("tcpinfo_health_closed_duration_seconds",
     "First snapshot to close, for closed connections a poll saw open (up to one poll "
     "interval shorter than the connection).", "duration"),
    ("tcpinfo_health_closed_acked_bytes",
     "bytes_acked (sent and acknowledged) of closed connections.", "bytes"),
    ("tcpinfo_health_closed_received_bytes",
     "bytes_received of closed connections.", "bytes"),
)
(H_RTT, H_RTTVAR, H_MIN_RTT, H_FINAL_RTT, H_RETRANS, H_RATE, H_DURATION, H_ACKED,
 H_RECEIVED) = range(len(HISTOGRAMS))
SKIP_REASONS = ("malformed", "unmatched_close")


class _Group:
    """One label set: its open count, closed count and the histograms' bins (not cumulative)."""

    __slots__ = ("labels", "open", "closed", "why", "last_ns", "counts", "sums", "exemplars")

    def __init__(self, labels: tuple[str, ...], sizes: list[int], now_ns: int) -> None:
        self.labels = labels
        self.open = 0
        self.closed = 0
        self.why = dict.fromkeys(CLASSES, 0)    # closed connections by why-slow class
        self.last_ns = now_ns
        self.counts = [[0] * (n + 1) for n in sizes]      # the last bin is the overflow bin
        self.sums = [0.0] * len(sizes)
        self.exemplars: list[list[tuple | None]] = [[None] * (n + 1) for n in sizes]

    def observe(self, h: int, bounds: tuple[float, ...], value: float, uuid: str,
                ts_s: float) -> None:
        i = bisect_left(bounds, value)    # the first boundary >= value: Prometheus' le
        self.counts[h][i] += 1
        self.sums[h] += value
        self.exemplars[h][i] = (uuid, value, ts_s)


class Aggregator(Collector):
    """The health aggregates of one collector, exposed by ``registry`` (registered at creation).

    ``uuid_of(cookie)`` makes a connection's UUID; it is called only when an exemplar is kept
    (a sample or a close), never for a skipped snapshot.
    """

    def __init__(self, config: HealthConfig, registry: CollectorRegistry,
                 uuid_of: Callable[[int], str]) -> None:
        self._config = config
        self._uuid_of = uuid_of
        self._interval = config.sample_interval_ns
        self._label_names = list(config.labels)
        self._bounds = [config.buckets(quantity) for _, _, quantity in HISTOGRAMS]
        self._sizes = [len(b) for b in self._bounds]
        self._values = [{"family": self._family, "service": self._service, "port": self._port,
                         "remote": self._remote, "cc": self._cc}[label]
                        for label in config.labels]   # label value from the first message
        self._le = [[floatToGoString(b) for b in bounds] + ["+Inf"] for bounds in self._bounds]
        self._cidrs = [(net.version, int(net.netmask), int(net.network_address), str(net))
                       for net in map(ipaddress.ip_network, config.remote_cidrs)]
        self._prefix_text: dict[tuple[int, int], str] = {}
        # cookie -> [last sample ns, group, first ns, rtt s, busy_time µs of the first snapshot,
        #            sampled rtt µs: min, max, sum, count]
        self._open: dict[int, list] = {}
        self._groups: dict[tuple[str, ...], _Group] = {}
        self._other: _Group | None = None
        self._overflow = 0
        self._evicted = 0
        self._skipped = dict.fromkeys(SKIP_REASONS, 0)
        self._lock = threading.Lock()
        self._log = RateLimitedLog(log)
        example = uuid_of(0)
        self._exemplars = len("uuid") + len(example) <= EXEMPLAR_MAX_RUNES
        if not self._exemplars:
            log.warning("Health histograms carry no exemplars: UUIDs such as %r are longer than "
                        "OpenMetrics allows (%d characters with the label name)", example,
                        EXEMPLAR_MAX_RUNES)
        registry.register(self)

    # --- the collector's thread ---------------------------------------------------------------

    def observe_snapshot(self, cookie: int, payload: bytes, timestamp_ns: int) -> None:
        """A new or changed snapshot (raw inet_diag message) of an open connection."""
        conn = self._open.get(cookie)
        if conn is not None and 0 <= timestamp_ns - conn[0] < self._interval:
            return
        self._sample(cookie, conn, payload, timestamp_ns)

    def observe_changes(self, changes: Iterable[tuple[bytes, int, int, int, int]]) -> None:
        """observe_snapshot for each (payload, cookie, family, kind, timestamp_ns), the shape of
        the poller's PollResult.changes: the same work without a call per skipped snapshot."""
        get, interval = self._open.get, self._interval
        for payload, cookie, _family, _kind, ts in changes:
            conn = get(cookie)
            if conn is None or not 0 <= ts - conn[0] < interval:
                self._sample(cookie, conn, payload, ts)

    def _sample(self, cookie: int, conn: list | None, payload: bytes, ts: int) -> None:
        try:
            off, length = attribute_span(payload, INET_DIAG_INFO)   # checks the rtattrs before it
            if conn is None:
                if IDM_HOST.unpack_from(payload)[1] == LISTEN:
                    return                      # a listener is not a connection
                busy = (_BUSY.unpack_from(payload, off + _BUSY_START)[0]
                        if off >= 0 and length >= _BUSY_END else None)
                conn = [ts, self._group_of(payload, ts), ts, None, busy, None, None, 0, 0]
                with self._lock:
                    self._open[cookie] = conn
                    conn[1].open += 1
        except (ValueError, struct.error) as err:   # struct.error: shorter than its header
            self._skip("malformed", err)
            return
        conn[0] = ts
        rtt_us = rttvar_us = 0
        if length >= _SNAP_END:
            rtt_us, rttvar_us = _SNAP.unpack_from(payload, off + _SNAP_START)
        if not rtt_us:                            # no RTT sample yet, or no tcp_info
            conn[3] = None
            return
        rtt = rtt_us / 1e6
        uuid, ts_s, group = self._uuid_of(cookie), ts / NS, conn[1]
        conn[5] = rtt_us if conn[5] is None else min(conn[5], rtt_us)
        conn[6] = rtt_us if conn[6] is None else max(conn[6], rtt_us)
        conn[7] += rtt_us
        conn[8] += 1
        with self._lock:
            conn[3] = rtt
            group.last_ns = ts
            group.observe(H_RTT, self._bounds[H_RTT], rtt, uuid, ts_s)
            group.observe(H_RTTVAR, self._bounds[H_RTTVAR], rttvar_us / 1e6, uuid, ts_s)

    def observe_close(self, cookie: int, payload: bytes | None, timestamp_ns: int) -> None:
        """A connection ended; ``payload`` is its final snapshot (destroy notification or last
        poll), or None if there is none, in which case only its count and duration are kept."""
        with self._lock:
            conn = self._open.pop(cookie, None)
            if conn is not None:
                conn[1].open -= 1
        info = None
        try:
            if payload is not None:
                if conn is None and IDM_HOST.unpack_from(payload)[1] == LISTEN:
                    return
                info = _final_info(payload)
                group = conn[1] if conn is not None else self._group_of(payload, timestamp_ns)
            elif conn is None:
                self._skip("unmatched_close", f"cookie {cookie:#x}")
                return
            else:
                group = conn[1]
        except (ValueError, struct.error) as err:
            self._skip("malformed", err)
            if conn is None:
                return
            group = conn[1]
        uuid, ts_s = self._uuid_of(cookie), timestamp_ns / NS
        bounds = self._bounds
        why = _why_slow(info, conn, timestamp_ns)
        with self._lock:
            group.closed += 1
            group.why[why] += 1
            group.last_ns = timestamp_ns
            if conn is not None:
                duration = max(timestamp_ns - conn[2], 0) / NS
                group.observe(H_DURATION, bounds[H_DURATION], duration, uuid, ts_s)
            if info is None:
                return
            for h, value in _final_values(info):
                group.observe(h, bounds[h], value, uuid, ts_s)

    def expire(self, now_ns: int) -> None:
        """Drops groups with no open connection and no event for group_ttl (call about once a
        second); their series leave the exposition and their slots become free."""
        ttl = self._config.group_ttl_ns
        with self._lock:
            for key, group in list(self._groups.items()):
                if group.open == 0 and now_ns - group.last_ns >= ttl:
                    del self._groups[key]
                    self._evicted += 1
            other = self._other
            if other is not None and other.open == 0 and now_ns - other.last_ns >= ttl:
                self._other = None
                self._evicted += 1

    def seen(self, cookie: int) -> dict[str, int | None] | None:
        """What the samples of an open connection said, by the names of health.connection's
        AGGREGATES (first snapshot's time and busy_time, sampled RTT min/max/sum/count), for a
        query's derived values; None if the connection is not open here."""
        conn = self._open.get(cookie)
        if conn is None:
            return None
        return {"first_ns": conn[2], "busy_first_us": conn[4], "rtt_min_us": conn[5],
                "rtt_max_us": conn[6], "rtt_sum_us": conn[7], "rtt_samples": conn[8]}

    @property
    def open_connections(self) -> int:
        return len(self._open)

    def _skip(self, reason: str, detail: object) -> None:
        self._skipped[reason] += 1
        self._log(logging.WARNING, f"health {reason}",
                  "Health aggregates skipped a record (%s): %s", reason, detail)

    def _group_of(self, payload: bytes, now_ns: int) -> _Group:
        """The group of a connection's first message, made if there is room, else ``other``."""
        family = IDM_HOST.unpack_from(payload)[0]
        sport, dport, _src, dst, _if = IDM_NET.unpack_from(payload)
        if family == AF_INET6 and dst[:12] == V4_MAPPED_PREFIX:
            family, dst = AF_INET, dst[12:]
        key = tuple([value(family, sport, dport, dst, payload) for value in self._values])
        group = self._groups.get(key)
        if group is not None:
            return group
        with self._lock:
            if len(self._groups) < self._config.max_groups:
                group = self._groups[key] = _Group(key, self._sizes, now_ns)
                return group
            self._overflow += 1
            if self._other is None:
                self._other = _Group((OTHER,) * len(key), self._sizes, now_ns)
            return self._other

    @staticmethod
    def _family(family: int, _sport: int, _dport: int, _dst: bytes, _payload: bytes) -> str:
        return FAMILY_LABELS.get(family, str(family))

    @staticmethod
    def _port(_family: int, sport: int, _dport: int, _dst: bytes, _payload: bytes) -> str:
        return str(sport)

    @staticmethod
    def _cc(_family: int, _sport: int, _dport: int, _dst: bytes, payload: bytes) -> str:
        off, length = attribute_span(payload, INET_DIAG_CONG)
        return congestion_name(payload[off:off + length]) if off >= 0 else UNKNOWN

    def _service(self, _family: int, sport: int, dport: int, _dst: bytes, _payload: bytes) -> str:
        services = self._config.services
        for port in (sport, dport):
            for service in services:
                if service.first <= port <= service.last:
                    return service.name
        return UNLISTED

    def _remote(self, family: int, _sport: int, _dport: int, dst: bytes, _payload: bytes) -> str:
        size = 4 if family == AF_INET else 16
        address = int.from_bytes(dst[:size], "big")
        version = 4 if size == 4 else 6
        if self._cidrs:
            for net_version, mask, network, text in self._cidrs:
                if net_version == version and address & mask == network:
                    return text
            return UNLISTED
        bits = self._config.remote_prefix[0 if version == 4 else 1]
        masked = address >> (size * 8 - bits) << (size * 8 - bits)
        cached = self._prefix_text.get((version, masked))
        if cached is not None:
            return cached
        if len(self._prefix_text) >= PREFIX_CACHE:
            self._prefix_text.clear()
        net = (ipaddress.IPv4Network if version == 4 else ipaddress.IPv6Network)((masked, bits))
        text = self._prefix_text[(version, masked)] = str(net)
        return text

    # --- any thread: the registry's view ------------------------------------------------------

    def describe(self) -> Iterator[Metric]:
        """The metric names, without samples, so a registry can refuse a clash at register()."""
        return self._families({}, [], [])

    def collect(self) -> Iterator[Metric]:
        with self._lock:
            groups = list(self._groups.values())
            if self._other is not None:
                groups.append(self._other)
            copies = [(g, g.open, g.closed, [list(c) for c in g.counts], list(g.sums),
                       [list(e) for e in g.exemplars], dict(g.why)) for g in groups]
            conns = list(self._open.values())
            counters = (self._overflow, self._evicted, dict(self._skipped))
        rtts: dict[_Group, list[float]] = {}
        for conn in conns:
            rtt = conn[3]
            if rtt is None:
                continue
            seen = rtts.get(conn[1])
            if seen is None:
                rtts[conn[1]] = [rtt, rtt, rtt, 1]
            else:
                if rtt < seen[0]:
                    seen[0] = rtt
                if rtt > seen[1]:
                    seen[1] = rtt
                seen[2] += rtt
                seen[3] += 1
        return self._families(rtts, copies, counters)

    def _families(self, rtts: dict, copies: list, counters: tuple | list) -> Iterator[Metric]:
        names = self._label_names
        for h, (name, doc, _) in enumerate(HISTOGRAMS):
            family = HistogramMetricFamily(name, doc, labels=names)
            le = self._le[h]
            for group, _open, _closed, counts, sums, exemplars, _why in copies:
                buckets: list[tuple] = []
                total = 0
                for i, n in enumerate(counts[h]):
                    total += n
                    ex = exemplars[h][i]
                    if ex is not None and self._exemplars:
                        buckets.append((le[i], total, Exemplar({"uuid": ex[0]}, ex[1], ex[2])))
                    else:
                        buckets.append((le[i], total))
                family.add_metric(group.labels, buckets, sums[h])
            yield family
        open_conns = GaugeMetricFamily("tcpinfo_health_open_connections",
                                       "Open connections by health group.", labels=names)
        closed = CounterMetricFamily("tcpinfo_health_closed_connections",
                                     "Closed connections by health group.", labels=names)
        why_slow = CounterMetricFamily(
            "tcpinfo_health_closed_why_slow",
            "Closed connections by health group and what limited their sending, from the "
            "kernel's final counters (docs/why-slow.md): application, receive_window, "
            "send_buffer, network, unknown.", labels=[*names, "class"])
        stats = [GaugeMetricFamily(f"tcpinfo_health_open_rtt_{stat}_seconds",
                                   f"{stat.capitalize()} current smoothed RTT of the group's open "
                                   f"connections that have one (sampled at most every "
                                   f"-health.sample-interval).", labels=names)
                 for stat in ("min", "max", "mean")]
        for group, n_open, n_closed, *_, copy_why in copies:
            open_conns.add_metric(group.labels, n_open)
            closed.add_metric(group.labels, n_closed)
            for cls, n in copy_why.items():
                why_slow.add_metric([*group.labels, cls], n)
            seen = rtts.get(group)
            if seen is not None:
                for gauge, value in zip(stats, (seen[0], seen[1], seen[2] / seen[3])):
                    gauge.add_metric(group.labels, value)
        yield open_conns
        yield closed
        yield why_slow
        yield from stats
        overflow, evicted, skipped = counters or (0, 0, {})
        yield GaugeMetricFamily("tcpinfo_health_groups", "Health label sets in use (the "
                                "'other' group included).", value=len(copies))
        yield CounterMetricFamily(
            "tcpinfo_health_overflow_connections",
            "Connections counted in the 'other' group because -health.max-groups label sets "
            "were in use.", value=overflow)
        yield CounterMetricFamily(
            "tcpinfo_health_evicted_groups",
            "Health label sets dropped after -health.group-ttl without an open connection or "
            "an event.", value=evicted)
        skipped_family = CounterMetricFamily(
            "tcpinfo_health_skipped_records",
            "Records the health aggregates could not use: malformed (not a well-formed "
            "inet_diag message), unmatched_close (a close without a final snapshot of a "
            "connection never seen open).", labels=["reason"])
        for reason in SKIP_REASONS:
            skipped_family.add_metric([reason], skipped.get(reason, 0))
        yield skipped_family


def _final_info(payload: bytes) -> dict[str, int] | None:
    """The final tcp_info fields the closed-connection aggregates read; None without tcp_info."""
    off, length = attribute_span(payload, INET_DIAG_INFO)
    if off < 0:
        return None
    if length >= _FINAL_END:
        return dict(zip(_FINAL_NAMES, _FINAL.unpack_from(payload, off + _FINAL_START)))
    return TCP_INFO.decode(payload[off:off + length])   # an older kernel's shorter tcp_info


def _why_slow(info: dict[str, int] | None, conn: list | None, ts: int) -> str:
    """The why-slow class of a closed connection: the rule of health.connection, fed its final
    counters and what its first snapshot said (busy time and time, if a poll saw it open)."""
    values: dict[str, int | None] = {"rows": 1, "last_ns": ts}
    if conn is not None:
        values["first_ns"], values["busy_first_us"] = conn[2], conn[4]
    if info is not None:
        values.update((name, info.get(field)) for name, field in _WHY_FIELDS)
    return summarize(values).why_slow


def _final_values(info: dict[str, int]) -> list[tuple[int, float]]:
    """(histogram, value) pairs of a connection's final tcp_info."""
    out: list[tuple[int, float]] = []
    min_rtt, rtt = info.get("min_rtt"), info.get("rtt")
    if min_rtt and min_rtt != NO_MIN_RTT:
        out.append((H_MIN_RTT, min_rtt / 1e6))
    if rtt:
        out.append((H_FINAL_RTT, rtt / 1e6))
    sent, retrans = info.get("bytes_sent"), info.get("bytes_retrans")
    if sent and retrans is not None:
        out.append((H_RETRANS, retrans / sent))
    if info.get("delivery_rate"):
        out.append((H_RATE, float(info["delivery_rate"])))
    for h, name in ((H_ACKED, "bytes_acked"), (H_RECEIVED, "bytes_received")):
        if name in info:
            out.append((h, float(info[name])))
    return out
