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
    parse_duration,
    parse_go_int,
    parse_mode,
    parse_size,
    parse_text,
    quoted,
    show,
)
from tcpinfo.collector import sockfilter
from tcpinfo.collector.outtree import FILE_MODE
from tcpinfo.collector.saver import Limits
from tcpinfo.servers import eventserver, httpserver

__all__ = ["Config", "FLAGS", "FlagError", "HelpRequested", "VersionRequested", "parse", "usage"]

MAX_QUEUE = 1_000_000
MAX_CLIENTS = 65_536                   # more than any fd limit lets a server hold
MAX_PREFIX_BYTES = 200                 # NAME_MAX 255 minus "_<cookie>.<seq>.jsonl.zst"
MAX_SOCKET_PATH_BYTES = 107            # sun_path holds 108 bytes with the final NUL
_LIMITS = Limits()


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
    output_mode: int = FILE_MODE
    eventsocket_max_clients: int = eventserver.MAX_CLIENTS
    max_connections: int = httpserver.MAX_CONNECTIONS
    # For the startup log: "name=value" of every flag, and where a value came from.
    arguments: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)

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



def parse_port(text: str) -> int:
    """A TCP port 0-65535 (upstream parses signed 16-bit and cannot exclude ports >= 32768)."""
    if not text.isascii() or not text.isdigit() or int(text) > 65535:
        raise ValueError(f"cannot convert port {text!r}: want 0-65535")
    return int(text)


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


def parse_port_range(text: str) -> tuple[int, int]:
    """A port ("443") or an inclusive range ("9000-9099")."""
    first, dash, last = text.partition("-")
    try:
        low, high = parse_port(first), parse_port(last if dash else first)
    except ValueError:
        raise ValueError(f"cannot convert port range {text!r}: want a port or first-last "
                         f"within 0-65535") from None
    if low > high:
        raise ValueError(f"port range {text!r} is empty (first > last)")
    return low, high


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


def _count(text: str, what: str, most: int) -> int:
    """A positive count (Go integer syntax), at most `most`."""
    value = parse_go_int(text)
    if value < 1:
        raise ValueError(f"{what} {text!r} must be at least 1")
    if value > most:
        raise ValueError(f"{what} {text!r} must be between 1 and {most}")
    return value


def parse_queue(text: str) -> int:
    """Events queued per event-socket client."""
    return _count(text, "queue length", MAX_QUEUE)


def parse_cap(text: str) -> int:
    """Clients or connections served at once (lowered further to a share of the fd limit)."""
    return _count(text, "limit", MAX_CLIENTS)


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

def show_threads(value: int) -> str:
    return str(value or "auto")


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
         "takes about 0.6-0.67x the time for about 1.1x the CPU. auto: one thread while polls "
         "take under 5 ms, two while they take longer (with at least 2 CPUs and no "
         "-cpu-budget).", metavar="auto|int", show=show_threads),
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
    config.arguments = [f"{f.name}={show(f, getattr(config, f.attr))}" for f in FLAGS]
    return config
