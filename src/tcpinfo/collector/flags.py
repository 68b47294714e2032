"""tcp-info's flags: upstream's names and defaults, our additions, and the bounds of every value.

The syntax (Go's `flag` with `flagx.ArgsFromEnv`'s environment fallback) is `tcpinfo.base.goflag`'s;
this module is what tcp-info accepts.  Beyond Go's syntax, every value is bounded (durations at most
24h, at most 1,024 list items, a UUID prefix that can start a file name), and a word left after the
flags is an error: Go ignores it, so `-trace true -reps=3` would silently run forever.  A default
that a component owns (the saver's limits, the servers' caps and modes) is read from that component,
so each is written once.
"""
from __future__ import annotations

import ipaddress
import os
import stat
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field

from tcpinfo.base import goflag
from tcpinfo.base.goflag import (
    MS,
    Flag,
    FlagError,
    HelpRequested,
    VersionRequested,
    format_duration,
    format_mode,
    format_size,
    parse_bool,
    parse_count,
    parse_duration,
    parse_duration_or_zero,
    parse_go_int,
    parse_mode,
    parse_port,
    parse_port_range,
    parse_size,
    parse_text,
    quoted,
    show,
)
from tcpinfo.collector import sockfilter
from tcpinfo.collector.outtree import FILE_MODE
from tcpinfo.collector.saver import Limits
from tcpinfo.health import config as healthconf
from tcpinfo.remotewrite import writer as remotewrite
from tcpinfo.servers import eventserver, httpserver

__all__ = ["Config", "FLAGS", "FlagError", "HelpRequested", "VersionRequested", "parse", "usage"]

MAX_QUEUE = 1_000_000
MAX_CLIENTS = 65_536                   # more than any fd limit lets a server hold
MAX_PREFIX_BYTES = 200                 # NAME_MAX 255 minus "_<cookie>.<seq>.jsonl.zst"
MAX_SOCKET_PATH_BYTES = 107            # sun_path holds 108 bytes with the final NUL
_LIMITS = Limits()
_HEALTH = healthconf.HealthConfig()
_PUSH = remotewrite.RemoteWriteConfig(url="http://defaults.invalid/")   # only its defaults are read


@dataclass
class Config:
    """Everything the daemon was asked to do, after flags and environment were applied."""
    reps: int = 0
    trace: bool = False
    output: str = ""
    exclude_srcport: list[int] = field(default_factory=list)
    exclude_dstip: list[str] = field(default_factory=list)
    eventsocket: str = ""
    eventsocket_mode: int = eventserver.SOCKET_MODE
    eventsocket_replay: bool = False
    eventsocket_queue: int = eventserver.QUEUE_LIMIT
    anonymize_ip: str = "none"
    listen_address: str = ":9990"
    uuid_prefix: str | None = None
    uuid_prefix_file: str = ""
    debug: bool = False
    exclude_local: bool = True
    count_port: list[int] = field(default_factory=list)
    poll_interval_ns: int = 10 * MS
    flush_age_ns: int = _LIMITS.flush_age_ns
    flush_size: int = _LIMITS.flush_size
    conn_buffer_limit: int = _LIMITS.conn_limit
    buffer_limit: int = _LIMITS.total_limit
    rotate_interval_ns: int = _LIMITS.rotate_ns
    include_ip: list[str] = field(default_factory=list)
    include_port: list[tuple[int, int]] = field(default_factory=list)
    kernel_filter: bool = True
    destroy_events: bool = True
    cpu_budget: float = 0.0
    dump_threads: int = 0   # auto
    strict: bool = False
    sweep_interval_ns: int = 100 * MS
    active_linger_ns: int = 1000 * MS
    output_mode: int = FILE_MODE
    eventsocket_max_clients: int = eventserver.MAX_CLIENTS
    max_connections: int = httpserver.MAX_CONNECTIONS
    health: bool = True
    health_labels: list[str] = field(default_factory=list)      # empty: HealthConfig's default
    health_services: list[healthconf.Service] = field(default_factory=list)
    health_remote_prefix: tuple[int, int] = _HEALTH.remote_prefix
    health_remote_cidrs: list[str] = field(default_factory=list)
    health_max_groups: int = _HEALTH.max_groups
    health_group_ttl_ns: int = _HEALTH.group_ttl_ns
    health_sample_interval_ns: int = _HEALTH.sample_interval_ns
    health_per_decade: int = _HEALTH.per_decade
    health_ranges: list[tuple[str, float, float]] = field(default_factory=list)
    remote_write_url: str = ""
    remote_write_interval_ns: int = _PUSH.interval_ns
    remote_write_instance: str = ""                             # empty: the host name
    remote_write_job: str = _PUSH.job
    remote_write_buffer: int = _PUSH.buffer_bytes
    remote_write_max_age_ns: int = _PUSH.max_age_ns
    remote_write_timeout_ns: int = _PUSH.timeout_ns
    # For the startup log: "name=value" of every flag, and where a value came from.
    arguments: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

    def health_config(self) -> healthconf.HealthConfig:
        """The health aggregates' settings these flags ask for; ValueError if they contradict."""
        return healthconf.HealthConfig(
            labels=tuple(self.health_labels) or _HEALTH.labels, services=tuple(self.health_services),
            remote_prefix=self.health_remote_prefix, remote_cidrs=tuple(self.health_remote_cidrs),
            max_groups=self.health_max_groups, group_ttl_ns=self.health_group_ttl_ns,
            sample_interval_ns=self.health_sample_interval_ns, per_decade=self.health_per_decade,
            ranges=tuple(self.health_ranges))

    def remote_write_config(self) -> remotewrite.RemoteWriteConfig | None:
        """Where to push, or None without -remote-write.url; ValueError if the settings clash."""
        if not self.remote_write_url:
            return None
        extra = {"instance": self.remote_write_instance} if self.remote_write_instance else {}
        return remotewrite.RemoteWriteConfig(
            url=self.remote_write_url, interval_ns=self.remote_write_interval_ns,
            job=self.remote_write_job, buffer_bytes=self.remote_write_buffer,
            max_age_ns=self.remote_write_max_age_ns, timeout_ns=self.remote_write_timeout_ns,
            **extra)

    def limits(self) -> Limits:
        """The saver's limits these flags ask for."""
        return Limits(flush_size=self.flush_size, flush_age_ns=self.flush_age_ns,
                      conn_limit=self.conn_buffer_limit, total_limit=self.buffer_limit,
                      rotate_ns=self.rotate_interval_ns)


# ---------------------------------------------------------------------------------------------
# Value parsers.  Each takes the text and returns the value or raises ValueError(reason).

def parse_reps(text: str) -> int:
    value = parse_go_int(text)
    if value < 0:
        raise ValueError("must be 0 (run forever) or a positive number of polls")
    return value



def parse_ip(text: str) -> str:
    try:
        return str(ipaddress.ip_address(text))
    except ValueError:
        raise ValueError(f"cannot convert ip {text!r}") from None


def parse_cidr(text: str) -> str:
    """An IPv4 or IPv6 prefix ("198.18.0.0/15", "fd00::/8"); a bare address is a /32 or /128."""
    try:
        return str(sockfilter.ip_network(text))
    except ValueError:
        raise ValueError(f"cannot convert network {text!r}: want a CIDR prefix such as "
                         f"10.0.0.0/8 or fd00::/8") from None


def parse_cpu_budget(text: str) -> float:
    """A share of one CPU: "0.25" or "25%"; 0 means no budget."""
    try:
        value = float(text[:-1]) / 100 if text.endswith("%") else float(text)
    except ValueError:
        raise ValueError(f"cannot convert CPU budget {text!r}: want a share of one CPU such "
                         f"as 0.25 or 25%") from None
    if not 0 <= value <= 64 or value != value:
        raise ValueError(f"CPU budget {text!r} must be between 0 (none) and 64 CPUs")
    return value


def parse_threads(text: str) -> int:
    """How many threads dump sockets in parallel: 1 to 16, or auto (0)."""
    if text == "auto":
        return 0
    value = parse_go_int(text)
    if not 1 <= value <= 16:
        raise ValueError(f"dump threads {text!r} must be auto or between 1 and 16")
    return value


def parse_anonymization(text: str) -> str:
    if text not in ("none", "netblock"):
        raise ValueError(f"unknown anonymization method {text!r}: want none or netblock")
    return text


def parse_listen_address(text: str) -> str:
    if text:
        httpserver.parse_listen_address(text)
    return text


def parse_queue(text: str) -> int:
    """Events queued per event-socket client."""
    return parse_count(text, "queue length", 1, MAX_QUEUE)


def parse_cap(text: str) -> int:
    """Clients or connections served at once (lowered further to a share of the fd limit)."""
    return parse_count(text, "limit", 1, MAX_CLIENTS)


def parse_socket_path(text: str) -> str:
    """A Unix socket path, which the kernel limits to 107 bytes."""
    if len(text.encode(errors="surrogateescape")) > MAX_SOCKET_PATH_BYTES:
        raise ValueError(f"a Unix socket path is at most {MAX_SOCKET_PATH_BYTES} bytes")
    return text


def read_prefix_file(path: str) -> str:
    """flagx.FileBytes: the file's bytes verbatim, if they can be part of a file name.

    The prefix starts every archive's name, so a prefix that cannot (a '/', a control character
    such as a trailing newline, more than MAX_PREFIX_BYTES) is refused rather than passed on to
    fail at every write, as upstream does.  Only a regular file is read, and only as much of it
    as a prefix may be: a FIFO or /dev/zero cannot stall or flood the start.
    """
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        try:
            if not stat.S_ISREG(os.fstat(fd).st_mode):
                raise ValueError("not a regular file")
            data = os.read(fd, MAX_PREFIX_BYTES + 1)
        finally:
            os.close(fd)
    except OSError as err:
        raise ValueError(err.strerror or str(err)) from None
    if len(data) > MAX_PREFIX_BYTES:
        raise ValueError(f"the prefix is longer than {MAX_PREFIX_BYTES} bytes (it starts "
                         f"every archive's file name)")
    try:
        prefix = data.decode("utf-8")
    except UnicodeDecodeError:
        raise ValueError("the prefix is not UTF-8 text") from None
    bad = next((c for c in prefix if c == "/" or not c.isprintable()), None)
    if bad is not None:
        hint = " (write the file without a final newline, e.g. printf %s PREFIX > FILE)" \
            if bad == "\n" else ""
        raise ValueError(f"the prefix contains {bad!r}, which has no place in the file names "
                         f"it starts{hint}")
    return prefix

def parse_instance(text: str) -> str:
    """-remote-write.instance: a label value, or empty for the host name."""
    return remotewrite.parse_label_value(text) if text else ""


def show_threads(value: int) -> str:
    return str(value or "auto")


def show_service(service: healthconf.Service) -> str:
    return f"{service.name}={show_port_range((service.first, service.last))}"


def show_prefix(prefix: tuple[int, int]) -> str:
    return f"{prefix[0]},{prefix[1]}"


def show_range(item: tuple[str, float, float]) -> str:
    return f"{item[0]}={item[1]!r}:{item[2]!r}"


def show_port_range(item: tuple[int, int]) -> str:
    """A port range as typed: first-last, or one port."""
    first, last = item
    return str(first) if first == last else f"{first}-{last}"


# ---------------------------------------------------------------------------------------------
# The flag table.

FLAGS: tuple[Flag, ...] = (
    Flag("reps", "reps", parse_reps,
         "Number of polling cycles, then flush and exit; 0 runs until SIGTERM/SIGINT. "
         "Go integer syntax (0x10, 010, 1_000).", metavar="int"),
    Flag("trace", "trace", parse_bool,
         "Profile the collector with Python's cProfile and write the statistics to the file "
         "'trace.pstats' in the output directory on exit (read it with python -m pstats).",
         kind="bool"),
    Flag("output", "output", parse_text,
         "Directory in which to put the YYYY/MM/DD/<uuid>.<seq>.jsonl.zst archives; created if "
         "missing and made the working directory, so relative paths are relative to it."),
    Flag("exclude-srcport", "exclude_srcport", parse_port,
         "Local (source) port whose connections are neither archived nor announced. "
         "Repeatable and comma-separated.", kind="list", metavar="port"),
    Flag("exclude-dstip", "exclude_dstip", parse_ip,
         "Remote (destination) IP whose connections are neither archived nor announced; an "
         "IPv4 address also matches its ::ffff: form. Repeatable and comma-separated.",
         kind="list", metavar="ip"),
    Flag("tcpinfo.eventsocket", "eventsocket", parse_socket_path,
         "Path of the Unix socket on which open/close events are served; empty: no socket."),
    Flag("tcpinfo.eventsocket-mode", "eventsocket_mode", parse_mode,
         "Permissions of the event socket file, in octal.", metavar="mode", show=format_mode),
    Flag("tcpinfo.eventsocket-replay", "eventsocket_replay", parse_bool,
         "Send a client that connects an Open event for every connection already open.",
         kind="bool"),
    Flag("tcpinfo.eventsocket-queue", "eventsocket_queue", parse_queue,
         "Events queued per event-socket client; a client that falls this far behind is "
         "disconnected (its lost events are counted) so it never stalls the collector.",
         metavar="int"),
    Flag("anonymize.ip", "anonymize_ip", parse_anonymization,
         "IP anonymization of archived records: none, or netblock (IPv4 /24, IPv6 /48; the "
         "host's own addresses are kept).", metavar="method"),
    Flag("prometheusx.listen-address", "listen_address", parse_listen_address,
         "Address of the Prometheus /metrics server (\":9990\", \"host:port\", \":0\" for any "
         "free port); empty: no server.", metavar="address"),
    Flag("uuid-prefix-file", "uuid_prefix_file", parse_text,
         "File whose exact contents are the UUID prefix; default <hostname>_<boot time>_unsafe.",
         metavar="file"),
    Flag("logx.debug", "debug", parse_bool, "Log debugging details.", kind="bool"),
    Flag("exclude-local", "exclude_local", parse_bool,
         "Skip connections from or to loopback, link-local, multicast and unspecified addresses "
         "(always on upstream).", kind="bool"),
    Flag("count-port", "count_port", parse_port,
         "Local port whose open connections are counted in the tcpinfo_port_connections metric. "
         "Repeatable and comma-separated.", kind="list", metavar="port"),
    Flag("poll-interval", "poll_interval_ns", parse_duration,
         "Target time between two polls of the kernel.", metavar="duration", show=format_duration),
    Flag("flush-age", "flush_age_ns", parse_duration,
         "Longest time a record waits in memory before it is compressed and written.",
         metavar="duration", show=format_duration),
    Flag("flush-size", "flush_size", parse_size,
         "A connection's pending records are written as one zstd frame once they reach this "
         "size.", metavar="size", show=format_size),
    Flag("conn-buffer-limit", "conn_buffer_limit", parse_size,
         "Most pending bytes held for one connection while writes fail; older records beyond "
         "it are dropped and counted.", metavar="size", show=format_size),
    Flag("buffer-limit", "buffer_limit", parse_size,
         "Most pending bytes held for all connections together; reaching it forces writes, and "
         "while writes fail the oldest records are dropped and counted.", metavar="size", show=format_size),
    Flag("rotate-interval", "rotate_interval_ns", parse_duration,
         "Age at which a connection's archive is closed and the next sequence file started.",
         metavar="duration", show=format_duration),
    Flag("include-ip", "include_ip", parse_cidr,
         "Record only connections with a local or remote address in one of these prefixes "
         "(exclusions still apply). Repeatable and comma-separated.", kind="list",
         metavar="cidr"),
    Flag("include-port", "include_port", parse_port_range,
         "Record only connections with a local or remote port in one of these ports or ranges "
         "(first-last; exclusions still apply). Repeatable and comma-separated.", kind="list",
         metavar="ports", show=show_port_range),
    Flag("kernel-filter", "kernel_filter", parse_bool,
         "Compile the exclusions and include lists to inet_diag bytecode so the kernel skips "
         "unwanted sockets; if the kernel rejects the program, filter in userspace.",
         kind="bool"),
    Flag("destroy-events", "destroy_events", parse_bool,
         "Subscribe to the kernel's TCP destroy notifications: each connection's final tcp_info "
         "ends its archive, its Close is sent at once, and connections shorter than a poll are "
         "recorded. false: upstream's poll-only behaviour.", kind="bool"),
    Flag("dump-threads", "dump_threads", parse_threads,
         "Threads that dump sockets in parallel, each a share of the ports: with 2, a poll "
         "takes about 0.6-0.67x the time for about 1.1x the CPU. auto: a second thread only "
         "while sweeps of 2000 or more connections take over half of -sweep-interval (of "
         "5 ms in strict mode), with at least 2 CPUs and no -cpu-budget.", metavar="auto|int",
         show=show_threads),
    Flag("strict", "strict", parse_bool,
         "Strict mode: dump every socket every -poll-interval, as upstream does, one dump per "
         "address family. Default: sweep the whole socket table every -sweep-interval at most and "
         "in between look up only the connections that are active.", kind="bool"),
    Flag("sweep-interval", "sweep_interval_ns", parse_duration,
         "Longest time between two sweeps of the kernel's whole socket table: the bound on how "
         "late a new connection, or an idle one that starts moving, is found (sweeps come sooner "
         "while they find some); raised to -poll-interval if shorter. Ignored in strict mode.",
         metavar="duration", show=format_duration),
    Flag("active-linger", "active_linger_ns", parse_duration,
         "How long a connection with no change stays in the fast tier, looked up every "
         "-poll-interval; after it only the sweeps watch it. Ignored in strict mode.",
         metavar="duration", show=format_duration),
    Flag("cpu-budget", "cpu_budget", parse_cpu_budget,
         "Most CPU the collector may use, as a share of one CPU (0.25 or 25%); polls are spaced "
         "further apart than -poll-interval when they cost more. 0: no budget.",
         metavar="share"),
    Flag("output-mode", "output_mode", parse_mode,
         "Permissions of archive files, in octal, whatever the umask; their directories get the "
         "same bits plus x wherever r is set (0640 gives 0750).", metavar="mode", show=format_mode),
    Flag("tcpinfo.eventsocket-max-clients", "eventsocket_max_clients", parse_cap,
         "Most clients served at once on the event socket; one more is closed at once and "
         "counted. At most a quarter of the open-file limit.", metavar="int"),
    Flag("prometheusx.max-connections", "max_connections", parse_cap,
         "Most connections open at once to the /metrics server; one more replaces the oldest "
         "still sending its request, or is closed if all are being answered (both counted). At "
         "most a quarter of the open-file limit.", metavar="int"),
    Flag("health", "health", parse_bool,
         "Keep low-cardinality histograms and gauges of the connections' RTT, jitter, "
         "retransmissions, delivery rate, duration and bytes, and why-slow counts, by the groups "
         "of -health.labels, with the UUID of a connection as each bucket's exemplar.",
         kind="bool"),
    Flag("health.labels", "health_labels", healthconf.parse_label,
         "Labels of the health aggregates: family, service, port, remote, cc (default family). "
         "Repeatable and comma-separated.", kind="list", metavar="label"),
    Flag("health.service", "health_services", healthconf.parse_service,
         "A named port range for the service label: name=port or name=first-last; the local port "
         "is matched first, then the remote one, else the service is 'unlisted'. Repeatable.",
         kind="list", metavar="name=ports", show=show_service),
    Flag("health.remote-prefix", "health_remote_prefix", healthconf.parse_remote_prefix,
         "IPv4,IPv6 prefix lengths of the remote label.", metavar="v4,v6", show=show_prefix),
    Flag("health.remote-cidr", "health_remote_cidrs", healthconf.parse_remote_cidr,
         "Prefixes the remote label takes instead of -health.remote-prefix (first match; else "
         "'unlisted'). Repeatable and comma-separated.", kind="list", metavar="cidr"),
    Flag("health.max-groups", "health_max_groups", healthconf.parse_max_groups,
         "Most label sets; connections beyond them are counted in the 'other' group.",
         metavar="int"),
    Flag("health.group-ttl", "health_group_ttl_ns", parse_duration,
         "A label set with no open connection and no event for this long is dropped.",
         metavar="duration", show=format_duration),
    Flag("health.sample-interval", "health_sample_interval_ns", parse_duration_or_zero,
         "Least time between two RTT samples of one open connection in the snapshot histograms "
         "and open-RTT gauges; 0: every changed snapshot.", metavar="duration",
         show=format_duration),
    Flag("health.buckets-per-decade", "health_per_decade", healthconf.parse_per_decade,
         "Histogram boundaries per factor of ten.", metavar="int"),
    Flag("health.bucket-range", "health_ranges", healthconf.parse_bucket_range,
         "quantity=low:high of a histogram kind (rtt, ratio, rate, duration, bytes) in base "
         "units; values at or below low are the first (underflow) bucket, above high only +Inf. "
         "Repeatable.", kind="list", metavar="range", show=show_range),
    Flag("remote-write.url", "remote_write_url", remotewrite.parse_url,
         "Prometheus remote-write endpoint to push every metric to (http or https; "
         "user:password@ for basic auth); empty: no push.", metavar="url"),
    Flag("remote-write.interval", "remote_write_interval_ns", parse_duration,
         "Time between two pushes, 1s to 1h.", metavar="duration", show=format_duration),
    Flag("remote-write.instance", "remote_write_instance", parse_instance,
         "instance label of every pushed series; empty: the host name.", metavar="string"),
    Flag("remote-write.job", "remote_write_job", remotewrite.parse_label_value,
         "job label of every pushed series.", metavar="string"),
    Flag("remote-write.buffer", "remote_write_buffer", parse_size,
         "Most compressed bytes held while the endpoint does not accept them; older batches "
         "beyond it are dropped and counted.", metavar="size", show=format_size),
    Flag("remote-write.max-age", "remote_write_max_age_ns", parse_duration,
         "Batches older than this are dropped and counted instead of sent.", metavar="duration",
         show=format_duration),
    Flag("remote-write.timeout", "remote_write_timeout_ns", parse_duration,
         "Longest wait for the endpoint's answer to one push, at most 1m.", metavar="duration",
         show=format_duration),
)


def usage(prog: str = "tcp-info") -> str:
    """Go-style PrintDefaults text, plus the environment variable of each flag."""
    return goflag.usage(prog, FLAGS, Config())


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parses the arguments (without the program name), then the environment for flags not given."""
    config = Config()
    rest, config.notes = goflag.parse(FLAGS, config, argv, environ)
    if rest:
        raise FlagError(f"unexpected argument {rest[0]!r}: tcp-info takes only flags")
    if config.uuid_prefix_file:
        try:
            config.uuid_prefix = read_prefix_file(config.uuid_prefix_file)
        except ValueError as err:
            raise FlagError(f"invalid value {quoted(config.uuid_prefix_file)} for flag "
                            f"-uuid-prefix-file: {err}") from None
    if not config.flush_size <= config.conn_buffer_limit <= config.buffer_limit:
        raise FlagError("want -flush-size <= -conn-buffer-limit <= -buffer-limit")
    try:
        config.health_config()
        config.remote_write_config()
    except ValueError as err:
        raise FlagError(str(err)) from None
    config.arguments = [f"{f.name}={show(f, getattr(config, f.attr))}" for f in FLAGS]
    return config
