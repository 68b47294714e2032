"""Python face of the C core: sweep every TCP socket or look up the active ones, get back only
what changed.

The per-socket loop (receive, exclude, diff against the previous poll) runs in C
(`cffi_build/`, through `tcpinfo.core.binding`).  This module turns the core's result into Python
objects, touching only the sockets that are new, changed or gone, so an idle host
costs the interpreter nothing per socket.  Two kinds of poll: `poll` sweeps the kernel's whole
table (a dump), `refresh` looks up the fast tier's active connections one by one; when to do
which is `tiers`' policy.
"""
from __future__ import annotations

import logging
import os
import socket
import time
from dataclasses import dataclass
from typing import NamedTuple

from tcpinfo.collector import shares
from tcpinfo.collector.sockfilter import Filter, compile_filter
from tcpinfo.core.binding import CHANGE_NAMES, FINAL, PREVIOUS_WAS_NIL, SHORT, STATUS_NAMES, ffi, lib

__all__ = ["CHANGE_NAMES", "FINAL", "PREVIOUS_WAS_NIL", "SHORT", "Change", "DestroyStats",
           "FamilyStats", "LookupStats", "PollResult", "Poller", "compare"]

log = logging.getLogger(__name__)

# Upstream's request (UPSTREAM.md 2.3): all eight extension bits, every state but
# SYN_RECV, TIME_WAIT and CLOSE.
DEFAULT_EXT = 0xFF
DEFAULT_STATES = 0x0F37

REBALANCE_NS = 2_000_000_000   # how often dump threads' shares follow the connections


class Change(NamedTuple):
    """One socket that is new or changed (or, in `vanished` and `destroyed`, gone)."""

    payload: bytes      # 72-byte inet_diag_msg followed by its attributes
    cookie: int
    family: int         # socket.AF_INET or socket.AF_INET6
    kind: int           # upstream ChangeType, FINAL or SHORT; 0 for vanished sockets
    timestamp_ns: int   # wall clock: end of the family's dump, or receipt of the notification


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


class DestroyStats(NamedTuple):
    """What became of the destroy notifications one poll or drain handled."""

    received: int
    final: int       # closed a connection the polls had seen
    shortflow: int   # a connection no poll had seen
    excluded: int    # filtered out, or a socket that never connected
    late: int        # for a connection a poll had already closed
    bad: int
    overruns: int    # ENOBUFS: the kernel dropped notifications (polls cover the closes)
    remnants: int    # short flows' time-wait remnants under cookies of their own, not reported
    errno_value: int  # last unexpected receive error, 0 if none


class LookupStats(NamedTuple):
    """What one refresh of the fast tier did (all zero for a sweep)."""

    asked: int
    changed: int
    unchanged: int
    missing: int     # ENOENT, or a state the sweeps skip: left to the sweep and destroy notices
    left: int        # connections that left the fast tier
    bad: int
    sends: int
    error: str | None
    errno: int
    duration_ns: int


@dataclass
class PollResult:
    changes: list[Change]
    vanished: list[Change]
    destroyed: list[Change]
    inet6: FamilyStats
    inet: FamilyStats
    destroy: DestroyStats
    tracked: int
    active: int = 0          # connections in the fast tier afterwards
    joined: int = 0          # connections that joined it in this poll (new, or active again)
    one_walk: bool = False   # a sweep that walked the kernel's table once for both families
    lookup: LookupStats | None = None   # a refresh's look-ups; None for a sweep
    bytes_sent: int = 0      # bytes_sent the reported records moved (each since its previous one)
    bytes_received: int = 0


def _family_stats(st) -> FamilyStats:
    return FamilyStats(st.messages, st.excluded, st.bad, st.recvs,
                       STATUS_NAMES.get(st.status) if st.status else None, st.errno_value,
                       bool(st.interrupted), st.duration_ns, st.end_realtime_ns)


def _lookup_stats(st) -> LookupStats:
    return LookupStats(st.asked, st.changed, st.unchanged, st.missing, st.left, st.bad, st.sends,
                       STATUS_NAMES.get(st.status) if st.status else None, st.errno_value,
                       st.duration_ns)


def _records(res, records, count: int) -> list[Change]:
    data, unpack = ffi.cast("char *", res.data), ffi.unpack  # one copy per reported socket
    out = []
    last = None
    for i in range(count):
        r = records[i]
        ts = r.realtime_ns
        if ts == last:   # one int for a dump's records: the saver and the health aggregates
            ts = last    # keep it per connection, 48 bytes each at 200,000 connections
        else:
            last = ts
        out.append(Change(unpack(data + r.offset, r.length), r.cookie, r.family, r.kind, ts))
    return out


def _family(addr) -> int:
    return socket.AF_INET if addr.version == 4 else socket.AF_INET6


COMPARE_BY = {"messages": 0, "images": 1, "walked images": 2}
"""What compare() holds the current message against: the previous message (the table keeps
messages), its image as polls take it, or images of both walked in full."""


def compare(current: bytes, previous: bytes, by: str = "messages") -> int:
    """Upstream's Compare rules as the C core applies them (a ChangeType value).

    Raises ValueError if either payload is not a well-formed inet_diag message.
    """
    kind = lib.tcpi_compare(current, len(current), previous, len(previous), COMPARE_BY[by])
    if kind < 0:
        raise ValueError("malformed inet_diag message")
    return kind


class Poller:
    """Netlink sock_diag sockets kept open across polls, and the C snapshot table.

    Bytecode programs go to the kernel with every dump: the filter, if the kernel takes it,
    and with several dump threads each thread's share of the ports.
    """

    def __init__(self, sockets: Filter | None = None, recv_size: int = 65536,
                 ext: int = DEFAULT_EXT, states: int = DEFAULT_STATES) -> None:
        err = ffi.new("int *")
        core = lib.tcpi_core_new(recv_size, err)
        if core == ffi.NULL:
            raise OSError(err[0], f"cannot open NETLINK_SOCK_DIAG socket: {os.strerror(err[0])}")
        self._core = ffi.gc(core, lib.tcpi_core_free)
        self._out = ffi.new("struct tcpi_poll_result **")
        self._snapshot_buf = ffi.new("uint8_t[]", 2048)
        lib.tcpi_set_request(self._core, ext, states)
        self.destroy_fd = -1
        self.threads = 1
        self._kernel_filter = b""        # the filter program the kernel accepted
        self._plan: shares.Plan = shares.plan(b"", 1, {}, 1.0)   # what each thread sends now
        self.first_share = 1.0           # the poll thread's part of each split family
        self._rebalance_at = 0
        self.auto_most = 0               # -dump-threads auto: most threads; 0: fixed
        self._auto_limits: tuple[float, float] = (shares.ENGAGE_NS, shares.RELEASE_NS)
        self._split_min = shares.SPLIT_MIN
        self._poll_ns = 0.0              # poll wall time, smoothed
        self._polled = False             # the first poll was seen (and left out of _poll_ns)
        self._adapt_at = 0
        self.set_filter(sockets or Filter())

    def set_filter(self, f: Filter) -> None:
        """Replaces the userspace filter (bad ports, addresses or prefixes raise ValueError)."""
        addresses, networks = f.addresses(), f.networks()
        core = self._core
        lib.tcpi_filter_clear(core)
        lib.tcpi_exclude_local(core, int(f.local))
        for port in f.srcports:
            lib.tcpi_exclude_srcport(core, port)
        for addr in addresses:
            if lib.tcpi_exclude_dstip(core, _family(addr), addr.packed) != 0:
                raise ValueError("too many excluded destination addresses (limit 1024)")
        for net in networks:
            if lib.tcpi_include_net(core, _family(net), net.network_address.packed,
                                    net.prefixlen) != 0:
                raise ValueError("too many included networks (limit 1024)")
        for first, last in f.include_ports:
            lib.tcpi_include_ports(core, first, last)

    @property
    def bytecode_size(self) -> int:
        """Size of the filter program the kernel runs (0: filtering is userspace only)."""
        return len(self._kernel_filter)

    def set_bytecode(self, program: bytes | None, thread: int = 0,
                     families: tuple[int, ...] = shares.FAMILIES) -> None:
        """Sets the inet_diag bytecode program one dump thread sends for some families.

        b"" sends none; None skips the family on that thread.  The kernel audits a program
        per dump; a rejected one makes the dumps fail with NLMSG_ERROR (EINVAL), which `poll`
        reports in the family stats.  `filter_in_kernel` and `set_threads` manage the
        programs; this is the raw access.
        """
        code = program or b""
        for family in families:
            if lib.tcpi_set_program(self._core, thread, family, program is None, code,
                                    len(code)) != 0:
                raise ValueError(f"bytecode of {len(code)} bytes is too long, thread {thread} "
                                 "does not exist, or memory ran out")
        self._plan = []   # no longer what _install sent

    def check_bytecode(self, thread: int = 0, family: int = socket.AF_INET) -> int:
        """0 if the kernel accepts a thread's program for a family, else the errno it gives.

        Costs one dump that selects no state, so no socket is walked.
        """
        return lib.tcpi_check_bytecode(self._core, thread, family)

    def filter_in_kernel(self, sockets: Filter) -> str | None:
        """Has the kernel apply `sockets` while it dumps; returns None, or why it cannot.

        The userspace filter stays in place either way, so a refusal (a program too long, or
        one the kernel's audit rejects) costs speed, never correctness.
        """
        try:
            self._kernel_filter = compile_filter(sockets)
        except ValueError as err:
            self._kernel_filter = b""
            return str(err)
        refusal = self._install()
        if refusal:
            self._kernel_filter = b""
            self._install()
        return refusal

    def set_threads(self, n: int) -> str | None:
        """Dumps with n threads, each serializing a share of the ports; returns None, or why not.

        A poll then takes about 1/n of the kernel's time (plus the diff, which stays on the
        polling thread).  If the kernel refuses the share programs, polling stays on one thread.
        """
        err = ffi.new("int *")
        if lib.tcpi_set_threads(self._core, n, err) != 0:
            raise OSError(err[0], f"cannot start {n} dump threads: {os.strerror(err[0])}")
        self.threads = n
        self.first_share = 1 / n
        lib.tcpi_thread_busy(self._core, ffi.new("int64_t[]", n), n)   # a fresh start
        refusal = self._install()
        if refusal:
            lib.tcpi_set_threads(self._core, 1, err)
            self.threads = 1
            self._install()
        return refusal

    def auto_threads(self, most: int, engage_ns: float = shares.ENGAGE_NS,
                     release_ns: float = shares.RELEASE_NS,
                     split_min: int = shares.SPLIT_MIN) -> None:
        """Dumps on one thread while polls are quick and on `most` while they are slow.

        Checked every 2 s against the smoothed poll time (`shares.threads_wanted`), and never
        more than one thread while fewer than `split_min` connections are tracked.  A machine
        that cannot start the threads, or a kernel that refuses their programs, leaves polling
        on one thread for good (logged).
        """
        self.auto_most = most
        self._auto_limits = (engage_ns, release_ns)
        self._split_min = split_min

    def _adapt(self, poll_ns: int, tracked: int) -> None:
        if not self._polled:        # the first poll records every connection: not a measure,
            self._polled = True     # and the first decision waits for REBALANCE_NS of polls
            self._adapt_at = time.monotonic_ns() + REBALANCE_NS   # (one slow one is no trend)
            return
        self._poll_ns = poll_ns if not self._poll_ns else 0.8 * self._poll_ns + 0.2 * poll_ns
        now = time.monotonic_ns()
        if now < self._adapt_at:
            return
        self._adapt_at = now + REBALANCE_NS
        wanted = shares.threads_wanted(self.threads, self.auto_most, self._poll_ns,
                                       *self._auto_limits, tracked >= self._split_min)
        if wanted == self.threads:
            return
        log.info("Polls take %.1f ms: dumping on %d thread%s", self._poll_ns / 1e6, wanted,
                 "s" if wanted > 1 else "")
        try:
            refusal = self.set_threads(wanted)
        except OSError as err:
            refusal = str(err)
        if refusal:
            log.warning("Dumping on one thread from now on: %s", refusal)
            self.auto_most = 0

    def _spreads(self) -> dict[int, shares.Spread]:
        spreads: dict[int, shares.Spread] = {}
        for family in shares.FAMILIES:
            local, remote = ffi.new("uint32_t[256]"), ffi.new("uint32_t[256]")
            lib.tcpi_port_histogram(self._core, family, local, remote)
            spreads[family] = shares.Spread(tuple(local), tuple(remote))
        return spreads

    def _install(self) -> str | None:
        """Sends each dump thread its programs: the kernel filter within the thread's shares."""
        spreads = self._spreads() if self.threads > 1 else {}
        plan = shares.plan(self._kernel_filter, self.threads, spreads, self.first_share)
        if plan == self._plan:
            return None
        for thread, programs in enumerate(plan):
            for family, program in programs.items():
                self.set_bytecode(program, thread, (family,))
                errno_value = self.check_bytecode(thread, family) if program else 0
                if program and errno_value:
                    return (f"the kernel rejected a {len(program)}-byte inet_diag program "
                            f"({os.strerror(errno_value)})")
        self._plan = plan
        return None

    def _rebalance(self) -> None:
        """Every few seconds, moves the threads' shares to where the connections are and away
        from the thread that was busiest."""
        now = time.monotonic_ns()
        if now < self._rebalance_at:
            return
        self._rebalance_at = now + REBALANCE_NS
        busy = ffi.new("int64_t[]", self.threads)
        lib.tcpi_thread_busy(self._core, busy, self.threads)
        self.first_share = shares.rebalanced(self.first_share, list(busy))
        refusal = self._install()
        if refusal:
            log.warning("Dumping on one thread from now on: %s", refusal)
            self.set_threads(1)

    def listen_destroyed(self, rcvbuf: int = 8 << 20, grace_ns: int = 1_000_000_000) -> int:
        """Subscribes to the kernel's TCP destroy notifications; returns the fd to wait on.

        From then on every poll (and `drain`) reports each dying socket's final record in
        `destroyed`, and a connection that merely went missing from the dumps is reported
        vanished only after `grace_ns` without its notification.
        """
        err = ffi.new("int *")
        fd = lib.tcpi_destroy_listen(self._core, rcvbuf, grace_ns, err)
        if fd < 0:
            raise OSError(err[0], "cannot subscribe to sock_diag destroy notifications: "
                          f"{os.strerror(err[0])}")
        self.destroy_fd = fd
        return fd

    def destroy_rcvbuf(self) -> int:
        """The receive buffer the kernel granted the destroy listener, in bytes."""
        return lib.tcpi_destroy_rcvbuf(self._core)

    def set_one_walk(self, on: bool) -> None:
        """Sweeps walk the kernel's table once for both families (the compat TCPDIAG_GETSOCK
        request) when one thread dumps both with one program, instead of once per family."""
        lib.tcpi_set_one_walk(self._core, int(on))

    def set_fast_tier(self, idle_lookups: int) -> None:
        """Connections that a poll finds new or changed join the active set that `refresh` looks
        up; each leaves after `idle_lookups` look-ups in a row found it unchanged.  0: no tier."""
        if idle_lookups < 0:
            raise ValueError("idle_lookups cannot be negative")
        lib.tcpi_set_fast_tier(self._core, idle_lookups)

    def refresh(self) -> PollResult:
        """Looks up the active connections exactly; returns the changed ones (and what the destroy
        notifications ended meanwhile).  A connection a look-up misses only leaves the tier: the
        next poll or its destroy notification says whether it closed."""
        lib.tcpi_refresh(self._core, self._out)
        return self._result(lookup=True)

    def poll(self) -> PollResult:
        """Dumps IPv6 then IPv4 sockets (or both in one walk); returns only new, changed,
        vanished and destroyed ones."""
        if self.threads > 1:
            self._rebalance()
        start = time.monotonic_ns()
        lib.tcpi_poll(self._core, self._out)
        if self.auto_most > 1:
            self._adapt(time.monotonic_ns() - start, self._out[0].tracked)
        return self._result()

    def drain(self) -> PollResult:
        """Handles pending destroy notifications without dumping (when the fd is readable)."""
        lib.tcpi_drain(self._core, self._out)
        return self._result()

    def _result(self, lookup: bool = False) -> PollResult:
        res = self._out[0]
        return PollResult(_records(res, res.records, res.n_records),
                          _records(res, res.vanished, res.n_vanished),
                          _records(res, res.destroyed, res.n_destroyed),
                          _family_stats(res.inet6), _family_stats(res.inet),
                          DestroyStats(*(getattr(res.destroy, name)   # same names as in C
                                         for name in DestroyStats._fields)),
                          res.tracked, res.active, res.joined, bool(res.one_walk),
                          _lookup_stats(res.lookup) if lookup else None, res.bytes_sent,
                          res.bytes_received)

    def snapshot(self, cookie: int) -> bytes | None:
        """An open connection's message, or None (not open, or not tracked): while destroy
        notifications are heard the table keeps no messages and the kernel is asked now, else
        the last message the polls reported.  From the poll thread only, which owns the core's
        table and its netlink socket."""
        n = lib.tcpi_snapshot(self._core, cookie, self._snapshot_buf, len(self._snapshot_buf))
        if n < 0:
            self._snapshot_buf = ffi.new("uint8_t[]", -n)
            n = lib.tcpi_snapshot(self._core, cookie, self._snapshot_buf, len(self._snapshot_buf))
        return ffi.unpack(ffi.cast("char *", self._snapshot_buf), n) if n > 0 else None

    def forget_all(self) -> None:
        """Drops every snapshot: the next poll reports every socket as new."""
        lib.tcpi_forget_all(self._core)

    @staticmethod
    def release_memory() -> None:
        """Hands freed heap back to the kernel (glibc malloc_trim), e.g. once a second."""
        lib.tcpi_release_memory()

    def count_dump(self, family: int) -> int:
        """The kernel's floor: the same dump, only received and counted (benchmarks); family 0
        (AF_UNSPEC) is one walk of both families."""
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
