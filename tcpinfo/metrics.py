"""Prometheus metrics: upstream tcp-info's exact series, plus what upstream only logs.

Dashboards and alerts written for M-Lab's tcp-info query the names, types, labels
and bucket boundaries of UPSTREAM.md section 9, so those are reproduced exactly
(including upstream's help strings and its un-prefixed `large_netlink_total` and
`netlink_skipped_total`).  Our additions carry the `tcpinfo_` prefix and follow
Prometheus naming conventions.

Every metric lives in prometheus_client's default registry, so `/metrics` also
carries the `process_*` and `python_*` collectors (upstream shows `go_*` instead).
Series with a closed set of label values (address families, flow events, cache
operations, dump-error reasons, upstream's error types) are created at import with
value 0: a counter that exists from the start lets `rate()` see its first increment,
where upstream's series only appear once something happens.
"""
from __future__ import annotations

import ipaddress
import os
import platform

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

import tcpinfo
from tcpinfo import httpserver
from tcpinfo.inetdiag import FAMILY_LABELS

# Go's client exposes no `*_created` series; keep the exposition the same shape.
prometheus_client.disable_created_metrics()


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
AF_LABELS = FAMILY_LABELS
# Reasons a family's dump fails (DUMP_ERRORS); the first three are upstream's ERRORS types.
UPSTREAM_DUMP_ERRORS = ("wrong seq num", "wrong pid", "NLMSG_ERROR")
DUMP_ERROR_REASONS = ("syscall", *UPSTREAM_DUMP_ERRORS, "truncated", "out of memory",
                      "interrupted")
# Upstream's byte-accounting sanity checks (UPSTREAM.md section 9), also ERRORS types.
ACCOUNTING_ERRORS = (
    "totalSent < reportedSent",
    "totalSent-reportedSent exceeds network capacity",
    "totalReceived < reportedReceived",
    "totalReceived-reportedReceived exceeds network capacity",
)
CACHE_OPS = ("total", "new", "changed", "expired")
DESTROY_OUTCOMES = ("final", "short", "excluded", "late", "bad")
FLOW_EVENT_KINDS = ("open", "close")
# What was found in the output tree where the collector would not write (UNSAFE_PATHS).
UNSAFE_PATH_KINDS = ("symlink", "not a directory", "not a regular file", "replaced file")

# --- Upstream's metrics (UPSTREAM.md section 9): names, types, labels, buckets, help. ---

SYSCALL_TIME = Histogram(
    "tcpinfo_syscall_time_histogram", "netlink syscall latency distribution (seconds)",
    ["af"], buckets=_SYSCALL_BUCKETS)
POLLING_INTERVAL = Histogram(
    "tcpinfo_polling_interval_histogram", "netlink polling interval distribution (seconds)",
    buckets=_go_linear_buckets(0, 0.001, 30))
CONNECTION_COUNT = Histogram(
    "tcpinfo_connection_count_histogram", "connection count histogram",
    ["af"], buckets=_COUNT_BUCKETS)
CACHE_COUNT = Histogram(
    "tcpinfo_cache_count_histogram", "cache connection count histogram",
    buckets=_COUNT_BUCKETS)
ERRORS = Counter("tcpinfo_error_total", "The total number of errors encountered.", ["type"])
NEW_FILES = Counter("tcpinfo_new_file_total", "Number of files created.")
SEND_RATE = Histogram("tcpinfo_send_rate_histogram", "send rate histogram",
                      buckets=_RATE_BUCKETS)
RECEIVE_RATE = Histogram("tcpinfo_receive_rate_histogram", "receive rate histogram",
                         buckets=_RATE_BUCKETS)
SNAPSHOTS = Counter("tcpinfo_snapshot_total", "Number of snapshots taken.")
LARGE_NETLINK = Counter("large_netlink_total", "Number of oversize netlink messages.",
                        ["type"])
NETLINK_SKIPPED = Counter("netlink_skipped_total", "Number of skipped netlink messages.",
                          ["type"])
FLOW_EVENTS = Counter("tcpinfo_flow_events_total",
                      "Number of flow events (open, close) emitted on the event socket.",
                      ["event"])
GIT_SHORT_COMMIT = Gauge("git_short_commit", "The git commit interpreted as a number.",
                         ["commit"])

# --- Ours: what upstream only logs or lacks. ---

CACHE = Counter(
    "tcpinfo_cache_total",
    "Connections handled by the poll cache: seen (total), new, changed, expired.", ["op"])
POLL_INTERVAL_ACHIEVED = Gauge(
    "tcpinfo_poll_interval_achieved_seconds",
    "Time between the starts of the two most recent polls.")
POLL_PERIOD = Gauge(
    "tcpinfo_poll_period_seconds",
    "The poll interval chosen last: -poll-interval, or longer to stay within -cpu-budget.")
CYCLE_CPU = Gauge(
    "tcpinfo_cycle_cpu_seconds",
    "CPU time the whole process used over the most recent poll cycle.")
DESTROY_NOTIFICATIONS = Counter(
    "tcpinfo_destroy_notifications_total",
    "Kernel destroy notifications, by outcome: final (closed a polled connection), short (a "
    "connection no poll saw), excluded, late (after a poll had closed it), bad.", ["outcome"])
DESTROY_OVERRUNS = Counter(
    "tcpinfo_destroy_overruns_total",
    "Times the kernel reported lost destroy notifications (ENOBUFS); polls close those "
    "connections instead.")
TIMEWAIT_REMNANTS = Counter(
    "tcpinfo_timewait_remnants_total",
    "FIN_WAIT2 time-wait remnants of short flows that the kernel gave cookies of their own, "
    "recognised by their 4-tuple and not recorded as connections.")
DUMP_THREADS = Gauge(
    "tcpinfo_dump_threads",
    "Threads dumping sockets in the latest polls (-dump-threads; auto moves between 1 and 2).")
KERNEL_FILTER = Gauge(
    "tcpinfo_kernel_filter_bytes",
    "Size of the inet_diag bytecode filter the kernel runs on every dump; 0 if none.")
DUMP_ERRORS = Counter(
    "tcpinfo_dump_errors_total",
    "Socket dumps that failed or were interrupted, by address family and reason.",
    ["af", "reason"])
WRITE_ERRORS = Counter("tcpinfo_write_errors_total",
                       "Archive writes that failed, by cause.", ["cause"])
DROPPED_BYTES = Counter("tcpinfo_dropped_bytes_total",
                        "Archive bytes that were never written, by reason.", ["reason"])
DROPPED_RECORDS = Counter("tcpinfo_dropped_records_total",
                          "Snapshot records that were never written, by reason.", ["reason"])
OPEN_CONNECTIONS = Gauge("tcpinfo_open_connections",
                         "Connections currently tracked (archived and not yet closed).")
BUFFERED_BYTES = Gauge("tcpinfo_buffered_bytes",
                       "Archive bytes accepted but not yet written to disk.")
EVENT_CLIENTS = Gauge("tcpinfo_event_clients", "Clients connected to the event socket.")
EVENT_DROPS = Counter("tcpinfo_event_drops_total",
                      "Events not delivered because a client's queue overflowed.")
EVENT_DISCONNECTS = Counter(
    "tcpinfo_event_disconnects_total",
    "Event-socket clients disconnected by the server because they stopped reading.")
EVENT_REFUSED = Counter(
    "tcpinfo_event_refused_total",
    "Event-socket clients closed at once because -tcpinfo.eventsocket-max-clients were connected.")
EVENT_ACCEPT_ERRORS = Counter(
    "tcpinfo_event_accept_errors_total",
    "Event-socket connections that could not be accepted (e.g. EMFILE: out of file descriptors), "
    "by errno; the socket pauses 0.1 s and serves its clients meanwhile.", ["error"])
HTTP_CONNECTIONS = Gauge("tcpinfo_http_connections", "Connections open to the /metrics server.")
HTTP_REQUESTS = Counter("tcpinfo_http_requests_total",
                        "Requests the /metrics server answered, by status code.", ["code"])
HTTP_DROPPED = Counter(
    "tcpinfo_http_dropped_total",
    "Connections the /metrics server closed without an answer: timeout (no complete request, or "
    "the response not taken, within the timeout), evicted (the oldest connection still sending "
    "its request, closed to make room at -prometheusx.max-connections), limit (every slot busy "
    "answering: the new connection is closed).", ["reason"])
HTTP_ACCEPT_ERRORS = Counter(
    "tcpinfo_http_accept_errors_total",
    "/metrics connections that could not be accepted (e.g. EMFILE), by errno; the server pauses "
    "0.1 s and serves its connections meanwhile.", ["error"])
HTTP_COUNTERS = httpserver.Counters(HTTP_CONNECTIONS, HTTP_REQUESTS, HTTP_DROPPED,
                                    HTTP_ACCEPT_ERRORS)
BUILD_INFO = Gauge("tcpinfo_build_info",
                   "Always 1; the labels say which tcpinfo, Python and kernel are running.",
                   ["version", "python", "kernel"])
PORT_CONNECTIONS = Gauge(
    "tcpinfo_port_connections",
    "Open connections per local port, for the ports the operator asked to count.", ["port"])
UNSAFE_PATHS = Counter(
    "tcpinfo_unsafe_paths_total",
    "Paths in the output tree left alone because they are not what the collector made: a "
    "symlink, a non-directory where a directory should be, an archive that is not a regular "
    "file or was replaced.", ["kind"])

for _af in AF_LABELS.values():
    SYSCALL_TIME.labels(af=_af)
    CONNECTION_COUNT.labels(af=_af)
    for _reason in DUMP_ERROR_REASONS:
        DUMP_ERRORS.labels(af=_af, reason=_reason)
for _type in (*UPSTREAM_DUMP_ERRORS, *ACCOUNTING_ERRORS):
    ERRORS.labels(type=_type)
for _op in CACHE_OPS:
    CACHE.labels(op=_op)
for _outcome in DESTROY_OUTCOMES:
    DESTROY_NOTIFICATIONS.labels(outcome=_outcome)
for _event in FLOW_EVENT_KINDS:
    FLOW_EVENTS.labels(event=_event)
for _kind in UNSAFE_PATH_KINDS:
    UNSAFE_PATHS.labels(kind=_kind)
for _error in ("EMFILE", "ENFILE"):
    EVENT_ACCEPT_ERRORS.labels(error=_error)
    HTTP_ACCEPT_ERRORS.labels(error=_error)
for _code in httpserver.STATUS:
    HTTP_REQUESTS.labels(code=str(_code))
for _reason in httpserver.DROP_REASONS:
    HTTP_DROPPED.labels(reason=_reason)
BUILD_INFO.labels(version=tcpinfo.__version__, python=platform.python_version(),
                  kernel=os.uname().release).set(1)


def set_git_commit(commit: str) -> None:
    """Publishes `git_short_commit` as upstream does: the hash read as base 16, 0 if not hex.

    Upstream stamps the commit at link time and defaults to "No commit specified";
    a Python package has no link step, so whoever knows the commit (the daemon, from
    a build-time stamp) calls this.  The one series is replaced, never accumulated.
    """
    try:
        value = float(int(commit, 16))
    except ValueError:
        value = 0.0
    GIT_SHORT_COMMIT.clear()
    GIT_SHORT_COMMIT.labels(commit=commit).set(value)


set_git_commit("No commit specified")


def count_dump_error(af: int, reason: str) -> None:
    """Counts a failed or interrupted dump in ours and, for upstream's reasons, upstream's series.

    Upstream counts only `wrong seq num`, `wrong pid` and `NLMSG_ERROR`, in
    `tcpinfo_error_total{type}` without the family; dashboards keep working on that
    while `tcpinfo_dump_errors_total{af,reason}` tells the whole story.
    """
    if reason not in DUMP_ERROR_REASONS:
        raise ValueError(f"unknown dump error reason {reason!r}; expected one of "
                         f"{', '.join(DUMP_ERROR_REASONS)}")
    DUMP_ERRORS.labels(af=AF_LABELS[af], reason=reason).inc()
    if reason in UPSTREAM_DUMP_ERRORS:
        ERRORS.labels(type=reason).inc()


def parse_listen_address(listen_address: str) -> tuple[str, int]:
    """Splits a Go listen address (":9990", "host:9990", "[::1]:9990") into host and port.

    An empty host means every interface, as in Go.  Only numeric ports are accepted.
    """
    host, sep, port = listen_address.rpartition(":")
    if not sep or not port.isdigit() or int(port) > 65535:
        raise ValueError(f"bad listen address {listen_address!r}: want [host]:port, "
                         f"e.g. ':9990', '127.0.0.1:9990' or '[::1]:9990'")
    if host.startswith("[") and host.endswith("]"):
        host = host[1:-1]
        try:
            ipaddress.IPv6Address(host)
        except ValueError as err:
            raise ValueError(f"bad listen address {listen_address!r}: {err}") from None
    elif ":" in host:
        raise ValueError(f"bad listen address {listen_address!r}: "
                         f"an IPv6 host must be in brackets, e.g. '[::1]:9990'")
    return host, int(port)


def start_http_server(listen_address: str, max_connections: int = 32,
                      registry: CollectorRegistry = prometheus_client.REGISTRY) -> tuple[str, int]:
    """Serves the registry at /metrics from a daemon thread; returns the bound (host, port).

    Like Go's net.Listen, an empty host listens on every interface: one dual-stack
    IPv6 socket, or IPv4 alone on a kernel without IPv6.  Port 0 picks a free port,
    and a name is resolved, which is why the bound address is returned.  See tcpinfo/httpserver.py for what is served
    and how clients are bounded.
    """
    host, port = parse_listen_address(listen_address)
    if not host:
        host = "::" if os.path.exists("/proc/net/if_inet6") else "0.0.0.0"
    try:
        server = httpserver.HTTPServer(host, port, registry, HTTP_COUNTERS, max_connections)
        server.start()
    except OSError as err:
        raise OSError(err.errno, f"cannot serve metrics on {listen_address!r}: "
                                 f"{err.strerror or err}") from err
    return server.address
