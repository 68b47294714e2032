"""tcp-info's Prometheus metrics: upstream's exact series, plus what upstream only logs.

Dashboards and alerts written for M-Lab's tcp-info query the names, types, labels and bucket
boundaries of UPSTREAM.md section 9, so those are reproduced exactly (including upstream's help
strings and its un-prefixed `large_netlink_total` and `netlink_skipped_total`).  Our additions carry
the `tcpinfo_` prefix and follow Prometheus naming conventions.  This module is the one place the
exposition's shape is written: the servers define which counters they need (`EventCounters`,
`httpserver.Counters`) and get them from here.

Nothing is registered at import.  The daemon calls `daemon_registry()` at start and builds one
`Metrics` on it (prometheus_client's `registry=` pattern); tests and benchmarks build their own.  The
daemon's registry also carries the `process_*`, `python_*` and `python_gc_*` collectors (upstream
shows `go_*` instead).  Series with a closed set of label values (address families, flow events,
cache operations, dump-error reasons, upstream's error types) are created with value 0: a counter
that exists from the start lets `rate()` see its first increment, where upstream's series only
appear once something happens.
"""
from __future__ import annotations

import os
import platform

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import tcpinfo
from tcpinfo.kernel.inetdiag import FAMILY_LABELS
from tcpinfo.servers import httpserver
from tcpinfo.servers.eventserver import EventCounters


def _go_linear_buckets(start: float, width: float, count: int) -> list[float]:
    """prometheus.LinearBuckets, summing as Go does so the `le` labels match bit for bit."""
    buckets = []
    for _ in range(count):
        buckets.append(start)
        start += width
    return buckets


_SYSCALL_BUCKETS = [
    0.001, 0.00125, 0.0016, 0.002, 0.0025, 0.0032, 0.004, 0.005, 0.0063, 0.0079,
    0.01, 0.0125, 0.016, 0.02, 0.025, 0.032, 0.04, 0.05, 0.063, 0.079,
    0.1, 0.125, 0.16, 0.2,
]
_COUNT_BUCKETS = [
    1, 2, 3, 4, 5, 6, 8,
    10, 12.5, 16, 20, 25, 32, 40, 50, 63, 79,
    100, 125, 160, 200, 250, 320, 400, 500, 630, 790,
    1000, 1250, 1600, 2000, 2500, 3200, 4000, 5000, 6300, 7900,
    10000, 12500, 16000, 20000, 25000, 32000, 40000, 50000, 63000, 79000,
    10000000,
]
_RATE_BUCKETS = [
    0, 1, 10, 100,
    1000, 1580, 2510, 3980, 6310,
    10000, 15800, 25100, 39800, 63100,
    100000, 158000, 251000, 398000, 631000,
    1000000, 1580000, 2510000, 3980000, 6310000,
    10000000, 15800000, 25100000, 39800000, 63100000,
    100000000, 158000000, 251000000, 398000000, 631000000,
    1000000000, 1260000000, 1580000000, 2000000000, 2510000000, 3160000000,
    3980000000, 5010000000, 6310000000, 7940000000, 10000000000, float("inf"),
]

# Label values of the `af` label, as upstream writes them.
AF_LABELS: dict[int, str] = FAMILY_LABELS
# Reasons a family's dump fails (DUMP_ERRORS); the first three are upstream's ERRORS types.
UPSTREAM_DUMP_ERRORS = ("wrong seq num", "wrong pid", "NLMSG_ERROR")
# A failed dump's or refresh's reason: the core's status names (tcpinfo.core.binding.STATUS_NAMES).
STATUS_REASONS = ("syscall", *UPSTREAM_DUMP_ERRORS, "truncated", "out of memory")
DUMP_ERROR_REASONS = (*STATUS_REASONS, "interrupted")
# Upstream's byte-accounting sanity checks (UPSTREAM.md section 9), also ERRORS types.
ACCOUNTING_ERRORS = (
    "totalSent < reportedSent",
    "totalSent-reportedSent exceeds network capacity",
    "totalReceived < reportedReceived",
    "totalReceived-reportedReceived exceeds network capacity",
)
CACHE_OPS = ("total", "new", "changed", "expired")
DESTROY_OUTCOMES = ("final", "short", "excluded", "late", "bad")
LOOKUP_OUTCOMES = ("changed", "unchanged", "missing", "bad")
FLOW_EVENT_KINDS = ("open", "close")
# What was found in the output tree where the collector would not write (UNSAFE_PATHS).
UNSAFE_PATH_KINDS = ("symlink", "not a directory", "not a regular file", "replaced file")


class Metrics:
    """Every series of tcp-info, created on one registry."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self.registry = registry
        # --- Upstream's metrics (UPSTREAM.md section 9): names, types, labels, buckets, help.
        self.syscall_time = Histogram(
            "tcpinfo_syscall_time_histogram", "netlink syscall latency distribution (seconds)",
            ["af"], buckets=_SYSCALL_BUCKETS, registry=registry)
        self.polling_interval = Histogram(
            "tcpinfo_polling_interval_histogram", "netlink polling interval distribution (seconds)",
            buckets=_go_linear_buckets(0, 0.001, 30), registry=registry)
        self.connection_count = Histogram(
            "tcpinfo_connection_count_histogram", "connection count histogram",
            ["af"], buckets=_COUNT_BUCKETS, registry=registry)
        self.cache_count = Histogram(
            "tcpinfo_cache_count_histogram", "cache connection count histogram",
            buckets=_COUNT_BUCKETS, registry=registry)
        self.errors = Counter("tcpinfo_error_total", "The total number of errors encountered.",
                              ["type"], registry=registry)
        self.new_files = Counter("tcpinfo_new_file_total", "Number of files created.", registry=registry)
        self.send_rate = Histogram("tcpinfo_send_rate_histogram", "send rate histogram",
                                   buckets=_RATE_BUCKETS, registry=registry)
        self.receive_rate = Histogram("tcpinfo_receive_rate_histogram", "receive rate histogram",
                                      buckets=_RATE_BUCKETS, registry=registry)
        self.snapshots = Counter("tcpinfo_snapshot_total", "Number of snapshots taken.", registry=registry)
        self.large_netlink = Counter("large_netlink_total", "Number of oversize netlink messages.",
                                     ["type"], registry=registry)
        self.netlink_skipped = Counter("netlink_skipped_total",
                                       "Number of skipped netlink messages.", ["type"], registry=registry)
        self.git_short_commit = Gauge("git_short_commit", "The git commit interpreted as a number.",
                                      ["commit"], registry=registry)
        # --- Ours: what upstream only logs or lacks.
        self.cache = Counter(
            "tcpinfo_cache_total",
            "Connections handled by the poll cache: seen (total), new, changed, expired.", ["op"],
            registry=registry)
        self.poll_interval_achieved = Gauge(
            "tcpinfo_poll_interval_achieved_seconds",
            "Time between the starts of the two most recent polls.", registry=registry)
        self.poll_period = Gauge(
            "tcpinfo_poll_period_seconds",
            "The poll interval chosen last: -poll-interval, or longer to stay within -cpu-budget.",
            registry=registry)
        self.cycle_cpu = Gauge(
            "tcpinfo_cycle_cpu_seconds",
            "CPU time the whole process used over the most recent poll cycle.", registry=registry)
        self.destroy_notifications = Counter(
            "tcpinfo_destroy_notifications_total",
            "Kernel destroy notifications, by outcome: final (closed a polled connection), short "
            "(a connection no poll saw), excluded, late (after a poll had closed it), bad.",
            ["outcome"], registry=registry)
        self.destroy_overruns = Counter(
            "tcpinfo_destroy_overruns_total",
            "Times the kernel reported lost destroy notifications (ENOBUFS); polls close those "
            "connections instead.", registry=registry)
        self.timewait_remnants = Counter(
            "tcpinfo_timewait_remnants_total",
            "FIN_WAIT2 time-wait remnants of short flows that the kernel gave cookies of their "
            "own, recognised by their 4-tuple and not recorded as connections.", registry=registry)
        self.sweeps = Counter(
            "tcpinfo_sweeps_total",
            "Sweeps of the kernel's whole socket table (one dump of both families, or one per "
            "family in strict mode or with dump threads).", registry=registry)
        self.lookups = Counter(
            "tcpinfo_lookups_total",
            "Exact look-ups of the fast tier's active connections, by outcome: changed, unchanged, "
            "missing (gone, or in a state the sweeps skip: left to the sweep and the destroy "
            "notifications), bad.", ["outcome"], registry=registry)
        self.lookup_failures = Counter(
            "tcpinfo_lookup_failures_total",
            "Refreshes of the fast tier whose look-ups failed, by reason; the next sweep covers "
            "their connections.", ["reason"], registry=registry)
        self.active_connections = Gauge(
            "tcpinfo_active_connections",
            "Connections in the fast tier: looked up every -poll-interval between sweeps.",
            registry=registry)
        self.sweep_period = Gauge(
            "tcpinfo_sweep_period_seconds",
            "The sweep period chosen last: -sweep-interval, shorter while sweeps find connections, "
            "-poll-interval in strict mode.", registry=registry)
        self.sweep_interval_achieved = Gauge(
            "tcpinfo_sweep_interval_achieved_seconds",
            "Time between the starts of the two most recent sweeps.", registry=registry)
        self.lookup_interval_achieved = Gauge(
            "tcpinfo_lookup_interval_achieved_seconds",
            "Time between the starts of the two most recent polls (sweeps or refreshes) while the "
            "fast tier had connections.", registry=registry)
        self.discovery_bound = Gauge(
            "tcpinfo_discovery_bound_seconds",
            "Longest a new connection could have gone unseen in the last second: a sweep's end "
            "minus the previous sweep's start, at its worst (0: no two sweeps in the second).",
            registry=registry)
        self.cpu_share = Gauge(
            "tcpinfo_cpu_seconds_per_second",
            "CPU time the whole process used per second of wall time, over the last second.",
            registry=registry)
        self.dump_threads = Gauge(
            "tcpinfo_dump_threads",
            "Threads dumping sockets in the latest polls (-dump-threads; auto moves between 1 and "
            "2).", registry=registry)
        self.kernel_filter = Gauge(
            "tcpinfo_kernel_filter_bytes",
            "Size of the inet_diag bytecode filter the kernel runs on every dump; 0 if none.", registry=registry)
        self.dump_errors = Counter(
            "tcpinfo_dump_errors_total",
            "Socket dumps that failed or were interrupted, by address family and reason.",
            ["af", "reason"], registry=registry)
        self.write_errors = Counter("tcpinfo_write_errors_total",
                                    "Archive writes that failed, by cause.", ["cause"], registry=registry)
        self.dropped_bytes = Counter("tcpinfo_dropped_bytes_total",
                                     "Archive bytes that were never written, by reason.",
                                     ["reason"], registry=registry)
        self.dropped_records = Counter("tcpinfo_dropped_records_total",
                                       "Snapshot records that were never written, by reason.",
                                       ["reason"], registry=registry)
        self.open_connections = Gauge(
            "tcpinfo_open_connections",
            "Connections currently tracked (archived and not yet closed).", registry=registry)
        self.buffered_bytes = Gauge("tcpinfo_buffered_bytes",
                                    "Archive bytes accepted but not yet written to disk.", registry=registry)
        self.build_info = Gauge(
            "tcpinfo_build_info",
            "Always 1; the labels say which tcpinfo, Python and kernel are running.",
            ["version", "python", "kernel"], registry=registry)
        self.port_connections = Gauge(
            "tcpinfo_port_connections",
            "Open connections per local port, for the ports the operator asked to count.",
            ["port"], registry=registry)
        self.unsafe_paths = Counter(
            "tcpinfo_unsafe_paths_total",
            "Paths in the output tree left alone because they are not what the collector made: "
            "a symlink, a non-directory where a directory should be, an archive that is not a "
            "regular file or was replaced.", ["kind"], registry=registry)
        # --- The servers' series, in the shapes the servers ask for.
        self.events = EventCounters(
            flow_events=Counter(  # upstream's name and help
                "tcpinfo_flow_events_total",
                "Number of flow events (open, close) emitted on the event socket.", ["event"], registry=registry),
            clients=Gauge("tcpinfo_event_clients", "Clients connected to the event socket.", registry=registry),
            drops=Counter("tcpinfo_event_drops_total",
                          "Events not delivered because a client's queue overflowed.", registry=registry),
            disconnects=Counter(
                "tcpinfo_event_disconnects_total",
                "Event-socket clients disconnected by the server because they stopped reading.",
                registry=registry),
            refused=Counter(
                "tcpinfo_event_refused_total",
                "Event-socket clients closed at once because -tcpinfo.eventsocket-max-clients "
                "were connected.", registry=registry),
            accept_errors=Counter(
                "tcpinfo_event_accept_errors_total",
                "Event-socket connections that could not be accepted (e.g. EMFILE: out of file "
                "descriptors), by errno; the socket pauses 0.1 s and serves its clients "
                "meanwhile.", ["error"], registry=registry))
        self.http = httpserver.Counters(
            connections=Gauge("tcpinfo_http_connections",
                              "Connections open to the /metrics server.", registry=registry),
            requests=Counter("tcpinfo_http_requests_total",
                             "Requests the /metrics server answered, by status code.", ["code"],
                             registry=registry),
            dropped=Counter(
                "tcpinfo_http_dropped_total",
                "Connections the /metrics server closed without an answer: timeout (no complete "
                "request, or the response not taken, within the timeout), evicted (the oldest "
                "connection still sending its request, closed to make room at "
                "-prometheusx.max-connections), limit (every slot busy answering: the new "
                "connection is closed).", ["reason"], registry=registry),
            accept_errors=Counter(
                "tcpinfo_http_accept_errors_total",
                "/metrics connections that could not be accepted (e.g. EMFILE), by errno; the "
                "server pauses 0.1 s and serves its connections meanwhile.", ["error"], registry=registry))
        self._start_at_zero()
        self.build_info.labels(version=tcpinfo.__version__, python=platform.python_version(),
                               kernel=os.uname().release).set(1)
        self.set_git_commit("No commit specified")

    def _start_at_zero(self) -> None:
        """Creates every series whose label values are known, at 0."""
        for af in AF_LABELS.values():
            self.syscall_time.labels(af=af)
            self.connection_count.labels(af=af)
            for reason in DUMP_ERROR_REASONS:
                self.dump_errors.labels(af=af, reason=reason)
        for kind in (*UPSTREAM_DUMP_ERRORS, *ACCOUNTING_ERRORS):
            self.errors.labels(type=kind)
        for op in CACHE_OPS:
            self.cache.labels(op=op)
        for outcome in DESTROY_OUTCOMES:
            self.destroy_notifications.labels(outcome=outcome)
        for outcome in LOOKUP_OUTCOMES:
            self.lookups.labels(outcome=outcome)
        for reason in STATUS_REASONS:
            self.lookup_failures.labels(reason=reason)
        for event in FLOW_EVENT_KINDS:
            self.events.flow_events.labels(event=event)
        for kind in UNSAFE_PATH_KINDS:
            self.unsafe_paths.labels(kind=kind)
        for error in ("EMFILE", "ENFILE"):
            self.events.accept_errors.labels(error=error)
            self.http.accept_errors.labels(error=error)
        for code in httpserver.STATUS:
            self.http.requests.labels(code=str(code))
        for reason in httpserver.DROP_REASONS:
            self.http.dropped.labels(reason=reason)

    def set_git_commit(self, commit: str) -> None:
        """Publishes `git_short_commit` as upstream does: the hash read as base 16, 0 if not hex.

        Upstream stamps the commit at link time and defaults to "No commit specified"; a Python
        package has no link step, so whoever knows the commit (the daemon, from a build-time
        stamp) calls this.  The one series is replaced, never accumulated.
        """
        try:
            value = float(int(commit, 16))
        except ValueError:
            value = 0.0
        self.git_short_commit.clear()
        self.git_short_commit.labels(commit=commit).set(value)

    def count_dump_error(self, af: int, reason: str) -> None:
        """Counts a failed or interrupted dump in ours and, for upstream's reasons, upstream's.

        Upstream counts only `wrong seq num`, `wrong pid` and `NLMSG_ERROR`, in
        `tcpinfo_error_total{type}` without the family; dashboards keep working on that while
        `tcpinfo_dump_errors_total{af,reason}` tells the whole story.
        """
        if reason not in DUMP_ERROR_REASONS:
            raise ValueError(f"unknown dump error reason {reason!r}; expected one of "
                             f"{', '.join(DUMP_ERROR_REASONS)}")
        self.dump_errors.labels(af=AF_LABELS[af], reason=reason).inc()
        if reason in UPSTREAM_DUMP_ERRORS:
            self.errors.labels(type=reason).inc()


def daemon_registry() -> CollectorRegistry:
    """The daemon's registry: empty but for the process, platform and GC collectors, which
    prometheus_client puts in its default registry (and the Go client puts `go_*` in upstream's).

    Go's client exposes no `*_created` series, so the daemon (and only it: the setting is
    process-wide) keeps the exposition the same shape.
    """
    prometheus_client.disable_created_metrics()
    registry = CollectorRegistry()
    prometheus_client.ProcessCollector(registry=registry)
    prometheus_client.PlatformCollector(registry=registry)
    prometheus_client.GCCollector(registry=registry)
    return registry
