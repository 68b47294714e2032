"""Python face of the C core: poll every TCP socket, get back only what changed.

The per-socket loop (receive, exclude, diff against the previous poll) runs in C
(`cffi_build/tcpinfo_core.c`).  This module turns the core's result into Python
objects, touching only the sockets that are new, changed or gone, so an idle host
costs the interpreter nothing per socket.
"""
from __future__ import annotations

import ipaddress
import os
import socket
from dataclasses import dataclass, field
from typing import NamedTuple

from tcpinfo._native import ffi, lib

# Upstream's request (UPSTREAM.md 2.3): all eight extension bits, every state but
# SYN_RECV, TIME_WAIT and CLOSE.
DEFAULT_EXT = 0xFF
DEFAULT_STATES = 0x0F37

# Upstream's ChangeType names, indexed by value.
CHANGE_NAMES = ("NoMajorChange", "IDiagStateChange", "NoTCPInfo", "NewAttribute",
                "LostAttribute", "AttributeLength", "StateOrCounterChange",
                "PacketCountChange", "PreviousWasNil", "Other")
PREVIOUS_WAS_NIL = 8

# Why a family's dump failed, by tcpi_status value (metric label values).
STATUS_NAMES = {1: "syscall", 2: "wrong seq num", 3: "wrong pid", 4: "NLMSG_ERROR",
                5: "truncated", 6: "out of memory"}


@dataclass
class Exclusions:
    """Which sockets are never recorded (upstream's ExcludeConfig, bugs fixed).

    Any port 0-65535 can be excluded, and an IPv4 destination also matches the
    v4-mapped form that dual-stack AF_INET6 sockets carry.
    """

    local: bool = True
    srcports: set[int] = field(default_factory=set)
    dstips: list[str] = field(default_factory=list)


class Change(NamedTuple):
    """One socket that is new or changed (or, in `vanished`, gone)."""

    payload: bytes      # 72-byte inet_diag_msg followed by its attributes
    cookie: int
    family: int         # socket.AF_INET or socket.AF_INET6
    kind: int           # upstream ChangeType; 0 for vanished sockets
    timestamp_ns: int   # wall clock when this family's dump finished


class FamilyStats(NamedTuple):
    """What one family's dump cost and whether it can be trusted."""

    messages: int
    excluded: int
    bad: int
    recvs: int
    error: str | None       # None when the dump completed
    errno: int
    interrupted: bool       # NLM_F_DUMP_INTR: the kernel's view changed mid-dump
    duration_ns: int
    end_ns: int


@dataclass
class PollResult:
    changes: list[Change]
    vanished: list[Change]
    inet6: FamilyStats
    inet: FamilyStats
    tracked: int


def _family_stats(st) -> FamilyStats:
    return FamilyStats(st.messages, st.excluded, st.bad, st.recvs,
                       STATUS_NAMES.get(st.status) if st.status else None, st.errno_value,
                       bool(st.interrupted), st.duration_ns, st.end_realtime_ns)


def dstip_key(text: str) -> bytes:
    """The 16-byte key the core matches destinations against (IPv4 as v4-mapped)."""
    addr = ipaddress.ip_address(text)
    if addr.version == 4:
        return bytes(10) + b"\xff\xff" + addr.packed
    return addr.packed


def compare(current: bytes, previous: bytes) -> int:
    """Upstream's Compare rules as the C core applies them (a ChangeType value).

    Raises ValueError if either payload is not a well-formed inet_diag message.
    """
    kind = lib.tcpi_compare(current, len(current), previous, len(previous))
    if kind < 0:
        raise ValueError("malformed inet_diag message")
    return kind


class Poller:
    """A netlink sock_diag socket kept open across polls, and the C snapshot table."""

    def __init__(self, exclusions: Exclusions | None = None, recv_size: int = 65536,
                 ext: int = DEFAULT_EXT, states: int = DEFAULT_STATES) -> None:
        err = ffi.new("int *")
        core = lib.tcpi_core_new(recv_size, err)
        if core == ffi.NULL:
            raise OSError(err[0], f"cannot open NETLINK_SOCK_DIAG socket: {os.strerror(err[0])}")
        self._core = ffi.gc(core, lib.tcpi_core_free)
        self._out = ffi.new("struct tcpi_poll_result **")
        lib.tcpi_set_request(self._core, ext, states)
        self.set_exclusions(exclusions or Exclusions())

    def set_exclusions(self, ex: Exclusions) -> None:
        """Replaces the exclusion rules (bad ports or addresses raise ValueError)."""
        keys = [dstip_key(ip) for ip in ex.dstips]
        for port in ex.srcports:
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} is outside 0-65535")
        lib.tcpi_exclude_clear(self._core)
        lib.tcpi_exclude_local(self._core, int(ex.local))
        for port in ex.srcports:
            lib.tcpi_exclude_srcport(self._core, port)
        for key in keys:
            if lib.tcpi_exclude_dstip(self._core, key) != 0:
                raise ValueError("too many excluded destination addresses (limit 1024)")

    def set_bytecode(self, program: bytes) -> None:
        """Attaches an inet_diag bytecode filter to every dump (b"" removes it).

        The kernel audits it per dump; a rejected program makes the dumps fail with
        NLMSG_ERROR (EINVAL), which `poll` reports in the family stats.
        """
        if lib.tcpi_set_bytecode(self._core, program, len(program)) != 0:
            raise ValueError(f"bytecode of {len(program)} bytes is too long or memory ran out")

    def poll(self) -> PollResult:
        """Dumps IPv6 then IPv4 sockets; returns only new, changed and vanished ones."""
        lib.tcpi_poll(self._core, self._out)
        res = self._out[0]
        data, unpack = ffi.cast("char *", res.data), ffi.unpack  # one copy per reported socket
        t6, t4 = res.inet6.end_realtime_ns, res.inet.end_realtime_ns
        changes = []
        for i in range(res.n_records):
            r = res.records[i]
            changes.append(Change(unpack(data + r.offset, r.length), r.cookie, r.family,
                                  r.kind, t6 if r.family == socket.AF_INET6 else t4))
        vanished = []
        for i in range(res.n_vanished):
            r = res.vanished[i]
            vanished.append(Change(unpack(data + r.offset, r.length), r.cookie, r.family, 0, t4))
        return PollResult(changes, vanished, _family_stats(res.inet6), _family_stats(res.inet),
                          res.tracked)

    def forget_all(self) -> None:
        """Drops every snapshot: the next poll reports every socket as new."""
        lib.tcpi_forget_all(self._core)

    @staticmethod
    def release_memory() -> None:
        """Hands freed heap back to the kernel (glibc malloc_trim), e.g. once a second."""
        lib.tcpi_release_memory()

    def count_dump(self, family: int) -> int:
        """The kernel's floor: the same dump, only received and counted (benchmarks)."""
        err = ffi.new("int *")
        n = lib.tcpi_count_dump(self._core, family, err)
        if n < 0:
            raise OSError(err[0], f"dump failed: {os.strerror(err[0])}")
        return n

    def close(self) -> None:
        if self._core is not None:
            ffi.release(self._core)  # runs tcpi_core_free now
            self._core = None

    def __enter__(self) -> Poller:
        return self

    def __exit__(self, *exc) -> None:
        self.close()
