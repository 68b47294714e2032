"""What the collector can see with its privileges, and how far its clock can be trusted.

Basic collection needs no capability: a sock_diag dump shows every TCP socket of the network
namespace with its tcp_info, congestion control, memory, CLASS_ID, CGROUP_ID and SOCKOPT.  Two
things do: the kernel adds INET_DIAG_MARK only for a requester with CAP_NET_ADMIN (in the
namespace's user namespace, see inet_diag_msg_attrs_fill), and entering another network
namespace (setns) needs CAP_SYS_ADMIN.  The effective set is read from /proc/self/status, so a
container with dropped capabilities reports what it really lacks.  (CLASS_ID, sometimes said to
need CAP_NET_ADMIN, is sent to anyone who asks for TCLASS, as the collector does.)

Records are joined with other tools' by time, so the archive says whether the clock was
synchronised: adjtimex(2) with no modes set only reads the kernel's NTP state (no privilege),
its STA_UNSYNC flag and its maximum and estimated error.
"""
from __future__ import annotations

import ctypes
import os
from collections.abc import Iterator
from dataclasses import dataclass

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector, CollectorRegistry

CAP_NET_ADMIN = 12
CAP_SYS_ADMIN = 21
CAPABILITY_NAMES = {CAP_NET_ADMIN: "CAP_NET_ADMIN", CAP_SYS_ADMIN: "CAP_SYS_ADMIN"}

STA_UNSYNC = 0x0040
TIME_ERROR = 5
CLOCK_STATES = ("TIME_OK", "TIME_INS", "TIME_DEL", "TIME_OOP", "TIME_WAIT", "TIME_ERROR")


@dataclass(frozen=True)
class Feature:
    """Something a record may hold only with a capability."""

    name: str
    capability: int
    what: str
    available: bool

    @property
    def capability_name(self) -> str:
        return CAPABILITY_NAMES[self.capability]


FEATURES: tuple[tuple[str, int, str], ...] = (
    ("mark", CAP_NET_ADMIN, "INET_DIAG_MARK (the socket mark) in records"),
    ("netns", CAP_SYS_ADMIN, "sockets of other network namespaces"),
)


def effective_capabilities(status_path: str = "/proc/self/status") -> int:
    """The CapEff mask of the process (0 if the file has none, as without procfs support)."""
    with open(status_path) as f:
        for line in f:
            if line.startswith("CapEff:"):
                return int(line.split()[1], 16)
    return 0


def features(capabilities: int) -> tuple[Feature, ...]:
    return tuple(Feature(name, cap, what, bool(capabilities >> cap & 1))
                 for name, cap, what in FEATURES)


class _Timex(ctypes.Structure):
    """struct timex (include/uapi/linux/timex.h) as glibc declares it, C alignment."""

    _fields_ = [("modes", ctypes.c_uint), ("offset", ctypes.c_long), ("freq", ctypes.c_long),
                ("maxerror", ctypes.c_long), ("esterror", ctypes.c_long),
                ("status", ctypes.c_int), ("constant", ctypes.c_long),
                ("precision", ctypes.c_long), ("tolerance", ctypes.c_long),
                ("time_sec", ctypes.c_long), ("time_usec", ctypes.c_long),
                ("tick", ctypes.c_long), ("ppsfreq", ctypes.c_long), ("jitter", ctypes.c_long),
                ("shift", ctypes.c_int), ("stabil", ctypes.c_long), ("jitcnt", ctypes.c_long),
                ("calcnt", ctypes.c_long), ("errcnt", ctypes.c_long), ("stbcnt", ctypes.c_long),
                ("tai", ctypes.c_int), ("_reserved", ctypes.c_int * 11)]


_libc = ctypes.CDLL(None, use_errno=True)
_libc.adjtimex.argtypes = [ctypes.POINTER(_Timex)]


@dataclass(frozen=True)
class ClockState:
    """The kernel's NTP view of CLOCK_REALTIME."""

    synchronised: bool
    state: str               # adjtimex's return value: TIME_OK ... TIME_ERROR
    status: int              # STA_* bits
    max_error_us: int
    est_error_us: int

    def metadata(self) -> dict[str, object]:
        """The archive Metadata key (upstream's readers ignore keys they do not know)."""
        return {"Clock": {"Synchronised": self.synchronised, "State": self.state,
                          "MaxErrorMicroseconds": self.max_error_us,
                          "EstErrorMicroseconds": self.est_error_us}}


def read_clock() -> ClockState:
    """adjtimex with modes 0 (read only).  OSError if the call fails (a seccomp filter)."""
    tx = _Timex()
    state = _libc.adjtimex(ctypes.byref(tx))
    if state < 0:
        err = ctypes.get_errno()
        raise OSError(err, f"adjtimex: {os.strerror(err)}")
    name = CLOCK_STATES[state] if state < len(CLOCK_STATES) else f"state {state}"
    return ClockState(not tx.status & STA_UNSYNC and state != TIME_ERROR, name, tx.status,
                      tx.maxerror, tx.esterror)


@dataclass(frozen=True)
class SelfReport:
    """What the collector can see and how good its clock is, taken once at start."""

    capabilities: int
    features: tuple[Feature, ...]
    clock: ClockState | None
    clock_error: str = ""

    def log_lines(self) -> list[str]:
        lines = []
        for f in self.features:
            lines.append(f"Visible: {f.what}" if f.available else
                         f"Not visible: {f.what} (needs {f.capability_name})")
        if self.clock is None:
            lines.append(f"Clock state unknown: {self.clock_error}")
        else:
            c = self.clock
            lines.append(f"Clock {'synchronised' if c.synchronised else 'NOT synchronised'} "
                         f"({c.state}, max error {c.max_error_us} µs, estimated error "
                         f"{c.est_error_us} µs)")
        return lines

    def metadata(self) -> dict[str, object]:
        """Archive Metadata keys: the clock (a fresh reading is better per archive: read_clock)."""
        return {} if self.clock is None else self.clock.metadata()


def self_report(status_path: str = "/proc/self/status") -> SelfReport:
    caps = effective_capabilities(status_path)
    try:
        return SelfReport(caps, features(caps), read_clock())
    except OSError as err:
        return SelfReport(caps, features(caps), None, str(err))


class SelfCheckMetrics(Collector):
    """tcpinfo_feature_visible{feature,capability} from the report, and the clock read afresh
    at every collection (one syscall), registered on ``registry``."""

    def __init__(self, report: SelfReport, registry: CollectorRegistry) -> None:
        self._report = report
        self._clock_errors = 0
        registry.register(self)

    def describe(self) -> Iterator[Metric]:
        return self._families(None)

    def collect(self) -> Iterator[Metric]:
        try:
            clock = read_clock()
        except OSError:
            clock = None
            self._clock_errors += 1
        return self._families(clock)

    def _families(self, clock: ClockState | None) -> Iterator[Metric]:
        visible = GaugeMetricFamily(
            "tcpinfo_feature_visible",
            "1 if the collector's capabilities let it see this (feature: what, capability: what "
            "it needs), else 0.", labels=["feature", "capability"])
        for f in self._report.features:
            visible.add_metric([f.name, f.capability_name], int(f.available))
        yield visible
        families = (
            GaugeMetricFamily("tcpinfo_clock_synchronised",
                              "1 if the kernel says the clock is synchronised (adjtimex: no "
                              "STA_UNSYNC, not TIME_ERROR), else 0."),
            GaugeMetricFamily("tcpinfo_clock_max_error_seconds",
                              "The kernel's maximum error of the clock (adjtimex maxerror)."),
            GaugeMetricFamily("tcpinfo_clock_estimated_error_seconds",
                              "The kernel's estimated error of the clock (adjtimex esterror)."))
        if clock is not None:
            for family, value in zip(families, (int(clock.synchronised), clock.max_error_us / 1e6,
                                                clock.est_error_us / 1e6)):
                family.add_metric([], value)
        yield from families
        yield CounterMetricFamily("tcpinfo_clock_read_errors",
                                  "adjtimex calls that failed while collecting the clock gauges.",
                                  value=self._clock_errors)
