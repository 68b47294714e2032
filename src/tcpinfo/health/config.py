"""What the operator chose for the health aggregates: which labels, which groups, which buckets.

Each ``parse_*`` takes one flag value (or one item of a list flag) as typed and returns it parsed,
or raises ValueError with a one-line reason, as the daemon's flag table expects; ``HealthConfig``
checks the choices against each other; tcp-info's flag table (tcpinfo.collector.flags) names the
flags and reads its defaults from HealthConfig.

Cardinality is the reason for every limit here: each label set costs about 230 series (nine
histograms, four gauges, a counter), so the set of label names is small and closed, a service is
a named port range rather than every port, and ``max_groups`` caps the label sets outright.
"""
from __future__ import annotations

import ipaddress
import re
from dataclasses import dataclass

from tcpinfo.base.goflag import parse_count, parse_port_range
from tcpinfo.health.buckets import log_buckets

SECOND = 1_000_000_000

LABELS = ("family", "service", "port", "remote", "cc")
"""Label names a group may be made of: address family on the wire (a v4-mapped IPv6 socket is
ipv4), named local port range, local port, remote prefix, congestion control."""

OTHER = "other"
"""Every label value of the overflow group (connections beyond ``max_groups`` label sets)."""
UNLISTED = "unlisted"
"""Service or remote value of a connection in no named port range / no given CIDR."""
UNKNOWN = "unknown"
"""Congestion control of a connection whose snapshots never carried INET_DIAG_CONG."""
RESERVED_VALUES = (OTHER, UNLISTED, UNKNOWN)

QUANTITIES: dict[str, tuple[float, float]] = {
    "rtt": (1e-5, 10.0),          # seconds: 10 µs to 10 s (min_rtt, rtt, rttvar)
    "ratio": (1e-4, 1.0),         # share of bytes sent that were retransmissions
    "rate": (1e3, 1e10),          # bytes per second: 8 kbit/s to 80 Gbit/s
    "duration": (1e-3, 1e5),      # seconds: 1 ms to ~28 h
    "bytes": (1e2, 1e11),         # bytes acknowledged or received: 100 B to 100 GB
}
"""Default range (lowest, highest finite boundary) of each kind of histogram, in base units."""

MAX_GROUPS = 10_000
_NAME = re.compile(r"[A-Za-z0-9_.:-]{1,64}")


@dataclass(frozen=True)
class Service:
    """A named range of local ports (a remote port is used when the local one is in none)."""

    name: str
    first: int
    last: int


def parse_label(text: str) -> str:
    """One -health.labels item: a label name from LABELS."""
    if text not in LABELS:
        raise ValueError(f"unknown health label {text!r}: want one of {', '.join(LABELS)}")
    return text


def parse_service(text: str) -> Service:
    """One -health.service item: ``name=port`` or ``name=first-last`` (``https=443``)."""
    name, eq, ports = text.partition("=")
    if not eq or not _NAME.fullmatch(name) or name in RESERVED_VALUES:
        raise ValueError(f"bad service {text!r}: want name=port or name=first-last, the name "
                         f"1-64 of A-Z a-z 0-9 _ . : - and not {', '.join(RESERVED_VALUES)}")
    low, high = parse_port_range(ports)
    return Service(name, low, high)


def parse_remote_prefix(text: str) -> tuple[int, int]:
    """-health.remote-prefix: the IPv4 and IPv6 prefix lengths of the remote label (``24,48``)."""
    v4, comma, v6 = text.replace("/", "").partition(",")
    if not comma or not v4.isdigit() or not v6.isdigit() or int(v4) > 32 or int(v6) > 128:
        raise ValueError(f"bad remote prefix {text!r}: want IPv4,IPv6 prefix lengths such as "
                         f"24,48 (0-32 and 0-128)")
    return int(v4), int(v6)


def parse_remote_cidr(text: str) -> str:
    """One -health.remote-cidr item: a prefix the remote label may take (``10.0.0.0/8``)."""
    try:
        return str(ipaddress.ip_network(text, strict=False))
    except ValueError:
        raise ValueError(f"cannot convert network {text!r}: want a CIDR prefix such as "
                         f"10.0.0.0/8 or 2001:db8::/32") from None


def parse_max_groups(text: str) -> int:
    """-health.max-groups: label sets kept before connections overflow into ``other``."""
    return parse_count(text, "max groups", 1, MAX_GROUPS)


def parse_per_decade(text: str) -> int:
    """-health.buckets-per-decade: histogram boundaries per factor of ten."""
    return parse_count(text, "buckets per decade", 1, 10)


def parse_bucket_range(text: str) -> tuple[str, float, float]:
    """One -health.bucket-range item: ``quantity=low:high`` in base units (``rtt=5e-5:2``)."""
    quantity, eq, bounds = text.partition("=")
    low_text, colon, high_text = bounds.partition(":")
    if quantity not in QUANTITIES or not eq or not colon:
        raise ValueError(f"bad bucket range {text!r}: want quantity=low:high with quantity one "
                         f"of {', '.join(QUANTITIES)}, in seconds, bytes, bytes/s or a ratio")
    try:
        low, high = float(low_text), float(high_text)
    except ValueError:
        raise ValueError(f"bad bucket range {text!r}: low and high must be numbers") from None
    log_buckets(low, high, 1)   # the range itself must be usable
    return quantity, low, high


@dataclass(frozen=True)
class HealthConfig:
    """The aggregator's settings, checked against each other when made (ValueError)."""

    labels: tuple[str, ...] = ("family",)
    services: tuple[Service, ...] = ()
    remote_prefix: tuple[int, int] = (24, 48)
    remote_cidrs: tuple[str, ...] = ()
    max_groups: int = 50
    group_ttl_ns: int = 600 * SECOND
    sample_interval_ns: int = SECOND
    per_decade: int = 3
    ranges: tuple[tuple[str, float, float], ...] = ()

    def __post_init__(self) -> None:
        for label in self.labels:
            parse_label(label)
        if len(set(self.labels)) != len(self.labels):
            raise ValueError(f"-health.labels {','.join(self.labels)}: a label is named twice")
        if self.services and "service" not in self.labels:
            raise ValueError("-health.service is given but -health.labels has no service")
        if "service" in self.labels and not self.services:
            raise ValueError("-health.labels has service but no -health.service names a port "
                             "range (e.g. -health.service=https=443)")
        names = [s.name for s in self.services]
        if len(set(names)) != len(names):
            raise ValueError(f"-health.service: a service name is given twice ({','.join(names)})")
        if self.remote_cidrs and "remote" not in self.labels:
            raise ValueError("-health.remote-cidr is given but -health.labels has no remote")
        if not 1 <= self.max_groups <= MAX_GROUPS:
            raise ValueError(f"-health.max-groups {self.max_groups}: want 1 to {MAX_GROUPS}")
        if self.group_ttl_ns < SECOND:
            raise ValueError("-health.group-ttl must be at least 1s")
        if self.sample_interval_ns < 0:
            raise ValueError("-health.sample-interval must not be negative")
        for quantity in QUANTITIES:
            self.buckets(quantity)   # every histogram's boundaries must be makeable

    def buckets(self, quantity: str) -> tuple[float, ...]:
        """The boundaries of one kind of histogram (the last -health.bucket-range for it wins)."""
        low, high = QUANTITIES[quantity]
        for name, first, last in self.ranges:
            if name == quantity:
                low, high = first, last
        return log_buckets(low, high, self.per_decade)
