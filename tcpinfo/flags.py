"""tcp-info's command line: Go `flag` syntax, upstream's flag names, env-var fallback.

Upstream parses with Go's `flag` package and then `flagx.ArgsFromEnv` (UPSTREAM.md §1); scripts and
container specs written for it must work unchanged, so this module reproduces that syntax exactly:
`-x=v`, `-x v`, `--x`, booleans only as `-b` or `-b=value`, parsing stops at the first non-flag or
after `--`, repeated list flags accumulate and each value is split on commas.  Deliberate
differences, each an error where upstream goes on with a value nobody asked for: an invalid value,
whether from the command line or from the environment (upstream silently ignores a bad environment
value, so a mistyped ANONYMIZE_IP leaks addresses); a word left after the flags (Go ignores it, so
`-trace true -reps=3` silently runs forever); and values beyond sane bounds (durations over 24h,
more than 1,024 list items, a UUID prefix that cannot start a file name).
"""
from __future__ import annotations

import decimal
import ipaddress
import os
import re
import stat
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field

from tcpinfo import metrics, sockfilter

MS = 1_000_000
SECOND = 1_000_000_000
MAX_DURATION_NS = 24 * 3600 * SECOND   # longer would overflow timers, and means a mistake
MAX_SIZE = 64 << 30
MAX_LIST_ITEMS = 1024                  # per list flag: the C filter holds 1,024 networks
MAX_QUEUE = 1_000_000
MAX_CLIENTS = 65_536                   # more than any fd limit lets a server hold
MAX_PREFIX_BYTES = 200                 # NAME_MAX 255 minus "_<cookie>.<seq>.jsonl.zst"
MAX_SOCKET_PATH_BYTES = 107            # sun_path holds 108 bytes with the final NUL


class FlagError(Exception):
    """A bad command line or environment value: the caller prints it and exits 2."""


class HelpRequested(Exception):
    """-h or -help was given: the caller prints usage() and exits 0, as Go does."""


class VersionRequested(Exception):
    """-version was given: the caller prints its name and version and exits 0."""


@dataclass
class Config:
    """Everything the daemon was asked to do, after flags and environment were applied."""
    reps: int = 0
    trace: bool = False
    output: str = ""
    exclude_srcport: list[int] = field(default_factory=list)
    exclude_dstip: list[str] = field(default_factory=list)
    eventsocket: str = ""
    eventsocket_mode: int = 0o666
    eventsocket_replay: bool = False
    eventsocket_queue: int = 10000
    anonymize_ip: str = "none"
    listen_address: str = ":9990"
    uuid_prefix: str | None = None
    uuid_prefix_file: str = ""
    debug: bool = False
    exclude_local: bool = True
    count_port: list[int] = field(default_factory=list)
    poll_interval_ns: int = 10 * MS
    flush_age_ns: int = 5 * SECOND
    flush_size: int = 128 * 1024
    conn_buffer_limit: int = 1024 * 1024
    buffer_limit: int = 32 * 1024 * 1024
    rotate_interval_ns: int = 600 * SECOND
    include_ip: list[str] = field(default_factory=list)
    include_port: list[tuple[int, int]] = field(default_factory=list)
    kernel_filter: bool = True
    destroy_events: bool = True
    cpu_budget: float = 0.0
    dump_threads: int = 0   # auto
    output_mode: int = 0o640
    eventsocket_max_clients: int = 100
    max_connections: int = 32
    # For the startup log: "name=value" of every flag, and where a value came from.
    arguments: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------------------------------------
# Value parsers.  Each takes the text and returns the value or raises ValueError(reason).

_GO_BOOLS = {"1": True, "t": True, "T": True, "TRUE": True, "true": True, "True": True,
             "0": False, "f": False, "F": False, "FALSE": False, "false": False, "False": False}


def parse_bool(text: str) -> bool:
    """Go's strconv.ParseBool."""
    try:
        return _GO_BOOLS[text]
    except KeyError:
        raise ValueError("parse error") from None


_GO_INT = re.compile(r"[+-]?(0[xX][_0-9a-fA-F]+|0[oO][_0-7]+|0[bB][_01]+|0[_0-7]*|[1-9][_0-9]*)")


def parse_go_int(text: str) -> int:
    """Go's strconv.ParseInt(text, 0, 64): base prefixes, legacy leading-zero octal, underscores."""
    if not _GO_INT.fullmatch(text):
        raise ValueError("parse error")
    sign, digits = (text[0], text[1:]) if text[0] in "+-" else ("", text)
    if len(digits) > 1 and digits[0] == "0" and digits[1] not in "xXoObB":
        digits = "0o" + digits[1:]          # Go reads 010 as octal 8; Python needs 0o10
    try:
        value = int(sign + digits, 0)       # Python enforces Go's underscore placement rules
    except ValueError:
        raise ValueError("parse error") from None
    if not -(1 << 63) <= value < (1 << 63):
        raise ValueError("value out of range")
    return value


def parse_reps(text: str) -> int:
    value = parse_go_int(text)
    if value < 0:
        raise ValueError("must be 0 (run forever) or a positive number of polls")
    return value


_DURATION_UNITS = {"ns": 1, "us": 1000, "µs": 1000, "μs": 1000, "ms": MS, "s": SECOND,
                   "m": 60 * SECOND, "h": 3600 * SECOND}
_DURATION_PART = re.compile(r"(\d+\.?\d*|\.\d+)(ns|us|µs|μs|ms|s|m|h)")


def parse_duration(text: str) -> int:
    """Go's time.ParseDuration ("10ms", "1.5s", "1h2m"), in nanoseconds; must be positive."""
    pos, total = 0, decimal.Decimal(0)
    while pos < len(text):
        part = _DURATION_PART.match(text, pos)
        if part is None:
            break
        total += decimal.Decimal(part[1]) * _DURATION_UNITS[part[2]]
        pos = part.end()
    if pos != len(text) or not text:
        raise ValueError('want a duration such as "10ms", "5s" or "10m"')
    if total < 1:
        raise ValueError("must be positive")
    if total > MAX_DURATION_NS:
        raise ValueError("must be at most 24h")
    return int(total)


_SIZE = re.compile(r"(\d+)(|KiB|MiB|GiB)")
_SIZE_UNITS = {"": 1, "KiB": 1 << 10, "MiB": 1 << 20, "GiB": 1 << 30}


def parse_size(text: str) -> int:
    """A positive byte count, optionally with a KiB/MiB/GiB suffix."""
    match = _SIZE.fullmatch(text)
    if match is None or int(match[1]) == 0:
        raise ValueError('want a positive size such as "65536", "256KiB" or "64MiB"')
    size = int(match[1]) * _SIZE_UNITS[match[2]]
    if size > MAX_SIZE:
        raise ValueError("must be at most 64GiB")
    return size


def format_size(size: int) -> str:
    for unit in ("GiB", "MiB", "KiB"):
        if size % _SIZE_UNITS[unit] == 0:
            return f"{size // _SIZE_UNITS[unit]}{unit}"
    return str(size)


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
        metrics.parse_listen_address(text)
    return text


def parse_mode(text: str) -> int:
    """File permissions in octal, as chmod takes them (0660, 660)."""
    try:
        mode = int(text, 8)
    except ValueError:
        raise ValueError(f"invalid file mode {text!r}: want octal such as 0660") from None
    if not 0 <= mode <= 0o777:
        raise ValueError(f"file mode {text!r} is outside 0-0777")
    return mode


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


def parse_text(text: str) -> str:
    return text


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


# ---------------------------------------------------------------------------------------------
# The flag table.

@dataclass(frozen=True)
class Flag:
    name: str          # as typed after the dash
    attr: str          # Config attribute it sets
    parse: Callable[[str], object]
    usage: str
    kind: str = "value"  # "value", "bool" or "list" (repeatable, comma-split)
    metavar: str = "string"

    @property
    def env(self) -> str:
        return shell_variable_name(self.name)


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
         "Permissions of the event socket file, in octal.", metavar="mode"),
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
         "Target time between two polls of the kernel.", metavar="duration"),
    Flag("flush-age", "flush_age_ns", parse_duration,
         "Longest time a record waits in memory before it is compressed and written.",
         metavar="duration"),
    Flag("flush-size", "flush_size", parse_size,
         "A connection's pending records are written as one zstd frame once they reach this "
         "size.", metavar="size"),
    Flag("conn-buffer-limit", "conn_buffer_limit", parse_size,
         "Most pending bytes held for one connection while writes fail; older records beyond "
         "it are dropped and counted.", metavar="size"),
    Flag("buffer-limit", "buffer_limit", parse_size,
         "Most pending bytes held for all connections together; reaching it forces writes, and "
         "while writes fail the oldest records are dropped and counted.", metavar="size"),
    Flag("rotate-interval", "rotate_interval_ns", parse_duration,
         "Age at which a connection's archive is closed and the next sequence file started.",
         metavar="duration"),
    Flag("include-ip", "include_ip", parse_cidr,
         "Record only connections with a local or remote address in one of these prefixes "
         "(exclusions still apply). Repeatable and comma-separated.", kind="list",
         metavar="cidr"),
    Flag("include-port", "include_port", parse_port_range,
         "Record only connections with a local or remote port in one of these ports or ranges "
         "(first-last; exclusions still apply). Repeatable and comma-separated.", kind="list",
         metavar="ports"),
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
         "-cpu-budget).", metavar="auto|int"),
    Flag("cpu-budget", "cpu_budget", parse_cpu_budget,
         "Most CPU the collector may use, as a share of one CPU (0.25 or 25%); polls are spaced "
         "further apart than -poll-interval when they cost more. 0: no budget.",
         metavar="share"),
    Flag("output-mode", "output_mode", parse_mode,
         "Permissions of archive files, in octal, whatever the umask; their directories get the "
         "same bits plus x wherever r is set (0640 gives 0750).", metavar="mode"),
    Flag("tcpinfo.eventsocket-max-clients", "eventsocket_max_clients", parse_cap,
         "Most clients served at once on the event socket; one more is closed at once and "
         "counted. At most a quarter of the open-file limit.", metavar="int"),
    Flag("prometheusx.max-connections", "max_connections", parse_cap,
         "Most connections open at once to the /metrics server; one more replaces the oldest "
         "still sending its request, or is closed if all are being answered (both counted). At "
         "most a quarter of the open-file limit.", metavar="int"),
)
_BY_NAME = {f.name: f for f in FLAGS}


def shell_variable_name(flag_name: str) -> str:
    """flagx.MakeShellVariableName: upper case, every char outside [A-Z0-9] becomes '_'."""
    name = re.sub(r"[^A-Z0-9]", "_", flag_name.upper())
    return "_" + name if name[:1].isdigit() else name


def _show(flag: Flag, value: object) -> str:
    """A flag's value as the user would type it."""
    if flag.kind == "list":
        return ",".join(_show_item(v) for v in value)  # type: ignore[attr-defined]
    if flag.parse is parse_duration:
        return format_duration(value)  # type: ignore[arg-type]
    if flag.parse is parse_size:
        return format_size(value)  # type: ignore[arg-type]
    if flag.parse is parse_mode:
        return f"{value:04o}"
    if flag.parse is parse_threads:
        return str(value or "auto")
    if isinstance(value, bool):
        return "true" if value else "false"
    return str(value)


def _show_item(item: object) -> str:
    """One list item as typed: port ranges as first-last."""
    if isinstance(item, tuple):
        return str(item[0]) if item[0] == item[1] else f"{item[0]}-{item[1]}"
    return str(item)


def format_duration(ns: int) -> str:
    """Go's time.Duration.String ("10ms", "1.5s", "10m0s"), for usage, logs and Metadata."""
    def decimal_text(value: int, unit: int) -> str:
        whole, frac = divmod(value, unit)
        digits = str(frac).rjust(len(str(unit)) - 1, "0").rstrip("0")
        return f"{whole}.{digits}" if digits else str(whole)
    if ns < SECOND:
        for unit, name in ((MS, "ms"), (1000, "µs"), (1, "ns")):
            if ns >= unit or unit == 1:
                return decimal_text(ns, unit) + name
    hours, rest = divmod(ns, 3600 * SECOND)
    minutes, rest = divmod(rest, 60 * SECOND)
    text = decimal_text(rest, SECOND) + "s"
    if hours or minutes:
        text = f"{minutes}m" + text
    return f"{hours}h" + text if hours else text


def usage(prog: str = "tcp-info") -> str:
    """Go-style PrintDefaults text, plus the environment variable of each flag."""
    defaults = Config()
    lines = [f"Usage of {prog}:"]
    for flag in sorted(FLAGS, key=lambda f: f.name):
        lines.append(f"  -{flag.name}" + ("" if flag.kind == "bool" else f" {flag.metavar}"))
        value = getattr(defaults, flag.attr)
        default = f" (default {_show(flag, value)})" if value else ""  # Go omits zero defaults
        lines.append(f"    \t{flag.usage}{default} [env {flag.env}]")
    lines.append("Every flag not given on the command line is read from its environment variable; "
                 "an invalid value in either is an error (exit status 2).")
    lines.append("-version prints the version and exits.")
    return "\n".join(lines) + "\n"


# ---------------------------------------------------------------------------------------------
# Parsing.

def _quoted(value: str, limit: int = 60) -> str:
    """A value for an error message: quoted, and cut short if long (a list may be kilobytes)."""
    return repr(value) if len(value) <= limit else repr(value[:limit]) + f"... ({len(value)} characters)"


def _apply(config: Config, flag: Flag, text: str) -> None:
    """Flag.Set: scalars overwrite, lists append each comma-separated item (blank items skipped)."""
    if flag.kind == "list":
        items = [item.strip() for item in text.split(",")]
        values = getattr(config, flag.attr)
        values.extend(flag.parse(item) for item in items if item)
        if len(values) > MAX_LIST_ITEMS:
            raise ValueError(f"at most {MAX_LIST_ITEMS} values in all")
    else:
        setattr(config, flag.attr, flag.parse(text))


def _parse_command_line(config: Config, args: Sequence[str]) -> tuple[set[str], list[str]]:
    """Go's FlagSet.Parse: returns the names set and the words left after the flags."""
    given: set[str] = set()
    args = list(args)
    while args:
        arg = args[0]
        if len(arg) < 2 or arg[0] != "-":
            break
        if arg == "--":
            args.pop(0)
            break
        name = arg[2:] if arg[1] == "-" else arg[1:]
        if not name or name[0] in "-=":
            raise FlagError(f"bad flag syntax: {arg}")
        args.pop(0)
        name, has_value, value = name.partition("=")
        flag = _BY_NAME.get(name)
        if flag is None:
            if name in ("h", "help"):
                raise HelpRequested()
            if name == "version":
                raise VersionRequested()
            raise FlagError(f"flag provided but not defined: -{name}")
        if flag.kind == "bool" and not has_value:
            value = "true"
        elif not has_value:
            if not args:
                raise FlagError(f"flag needs an argument: -{name}")
            value = args.pop(0)
        try:
            _apply(config, flag, value)
        except ValueError as err:
            raise FlagError(f"invalid value {_quoted(value)} for flag -{name}: {err}") from None
        given.add(name)
    return given, args


def parse(argv: Sequence[str], environ: Mapping[str, str]) -> Config:
    """Parses the arguments (without the program name), then the environment for flags not given."""
    config = Config()
    given, rest = _parse_command_line(config, argv)
    for flag in FLAGS:
        if flag.env not in environ:
            continue
        if flag.name in given:
            config.notes.append(f"Not overriding flag -{flag.name} with environment variable "
                                f"{flag.env}")
            continue
        value = environ[flag.env]
        try:
            _apply(config, flag, value)
        except ValueError as err:
            raise FlagError(f"invalid value {_quoted(value)} for environment variable {flag.env} "
                            f"(flag -{flag.name}): {err}") from None
    if rest:
        raise FlagError(f"unexpected argument {rest[0]!r}: tcp-info takes only flags")
    if config.uuid_prefix_file:
        try:
            config.uuid_prefix = read_prefix_file(config.uuid_prefix_file)
        except ValueError as err:
            raise FlagError(f"invalid value {_quoted(config.uuid_prefix_file)} for flag "
                            f"-uuid-prefix-file: {err}") from None
    if not config.flush_size <= config.conn_buffer_limit <= config.buffer_limit:
        raise FlagError("want -flush-size <= -conn-buffer-limit <= -buffer-limit")
    config.arguments = [f"{f.name}={_show(f, getattr(config, f.attr))}" for f in FLAGS]
    return config
