"""The poll loop: kernel snapshots in, archives, flow events and metrics out; clean shutdown.

The C poller hands back only the sockets that are new, changed or gone, and this loop touches only
those, so a host with 100,000 idle connections costs Python nothing per socket per poll.  Each
tick either sweeps the kernel's whole table or looks up the fast tier's active connections, as
`tiers` decides; with nothing active the loop sleeps until the next sweep.  Per changed
record the work is split, anonymize, encode and append to the saver's buffer.  Unlike upstream, which
has no signal handling, a stop signal (see `stopsignals`) ends the loop between polls; the saver
then writes every buffer and the event socket tells its clients every open flow closed, so nothing
recorded is lost.

With the kernel's destroy notifications (the default), a dying socket's final tcp_info is the last
record of its archive and its Close event is sent as soon as the notification arrives, also between
polls; a connection that opened and closed between two polls still gets its archive and its
Open/Close pair.
"""
from __future__ import annotations

import logging
import os
import select
import socket
import time
from collections.abc import Callable

import tcpinfo
from tcpinfo.archive.encode import encode_message
from tcpinfo.archive.uuids import make_uuid
from tcpinfo.base.ratelog import RateLimitedLog
from tcpinfo.collector.anonymize import Anonymizer
from tcpinfo.collector.cadence import Cadence
from tcpinfo.collector.metrics import AF_LABELS, LOOKUP_OUTCOMES, Metrics
from tcpinfo.collector.poller import (
    PREVIOUS_WAS_NIL,
    SHORT,
    Change,
    DestroyStats,
    FamilyStats,
    LookupStats,
    Poller,
    PollResult,
)
from tcpinfo.collector.query import ConnectionQueries
from tcpinfo.collector.saver import Saver
from tcpinfo.collector.selfcheck import read_clock
from tcpinfo.collector.stopsignals import StopSignals
from tcpinfo.collector.tiers import Tiers
from tcpinfo.health.aggregate import Aggregator
from tcpinfo.kernel.inetdiag import IDM, IDM_LEN
from tcpinfo.servers.eventserver import EventServer, NullServer

log = logging.getLogger(__name__)

NS = 1_000_000_000
_SPORT = IDM["sport"]


def kernel_tcp_info_length() -> int:
    """sizeof(struct tcp_info) of the running kernel, i.e. the length of every INFO attribute."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        return len(s.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1024))


def archive_metadata(poll_interval: str) -> Callable[[], dict]:
    """Metadata keys added after upstream's UUID/Sequence/StartTime; upstream readers ignore them.

    Asked for at every new archive file, so that its Clock key is the kernel's view of the clock
    when the file was started (one adjtimex call), not at start-up.
    """
    fixed = {"ToolVersion": f"tcpinfo {tcpinfo.__version__}", "KernelRelease": os.uname().release,
             "TCPInfoLength": kernel_tcp_info_length(), "PollInterval": poll_interval}

    def metadata() -> dict:
        try:
            clock = read_clock().metadata()
        except OSError as err:
            clock = {"Clock": {"Error": str(err)}}
        return {**fixed, **clock}
    return metadata


class ByteRates:
    """Upstream's send/receive rate histograms, from the byte counts the C core adds up.

    Upstream sums bytes_sent over every socket each second; the core instead adds, for each record
    it reports, how far the connection's bytes_sent and bytes_received moved since its previous
    record (a new connection from zero).  Counters only move when a connection does, and any
    transfer changes the compared fields, so the totals agree without visiting idle sockets, and
    without a per-connection dict in Python.
    """

    def __init__(self, metrics: Metrics) -> None:
        self._metrics = metrics
        self.sent = 0
        self.received = 0

    def add(self, result: PollResult) -> None:
        self.sent += result.bytes_sent
        self.received += result.bytes_received

    def report(self) -> None:
        self._metrics.send_rate.observe(8 * self.sent)
        self._metrics.receive_rate.observe(8 * self.received)
        self.sent = self.received = 0


class RecordWriter:
    """The per-record step of the hot path: anonymize, encode (in C), hand the line to the saver.
    The benchmark of the write path drives this same object."""

    def __init__(self, saver: Saver, metrics: Metrics, anonymize: Anonymizer | None = None) -> None:
        self.saver = saver
        self._metrics = metrics
        self._anonymize = anonymize
        self._log = RateLimitedLog(log)

    def write(self, payload: bytes, cookie: int, ts: int) -> None:
        """Appends one snapshot to its connection's archive."""
        anonymize = self._anonymize
        try:
            line, _ = encode_message(
                ts, payload if anonymize is None else anonymize(payload[:IDM_LEN]), payload)
        except ValueError as err:
            self._log(logging.WARNING, "malformed",
                      "Skipping a record that cannot be archived: %s", err)
            self._metrics.dropped_records.labels(reason="malformed").inc()
            return
        self.saver.write(cookie, ts, line)


class Collector:
    """Runs polls at the target interval until told to stop, then shuts down cleanly."""

    def __init__(self, poller: Poller, saver: Saver, events: EventServer | NullServer, prefix: str,
                 cadence: Cadence, stops: StopSignals, metrics: Metrics,
                 anonymize: Anonymizer | None = None,
                 counted_ports: frozenset[int] = frozenset(),
                 health: Aggregator | None = None, queries: ConnectionQueries | None = None,
                 tiers: Tiers | None = None) -> None:
        self._poller = poller
        self._saver = saver
        self._events = events
        self._prefix = prefix
        self._cadence = cadence
        self._tiers = tiers or Tiers(cadence.interval_ns, cadence.interval_ns, strict=True)
        self._metrics = metrics
        self._writer = RecordWriter(saver, metrics, anonymize)
        self._archive = self._writer.write
        self._rates = ByteRates(metrics)
        self._counted_ports = counted_ports
        self._health = health
        self._queries = queries
        self._port_of: dict[int, int] = {}
        self._stops = stops
        self._log = RateLimitedLog(log)   # recurring problems: once a minute per kind
        self._cpu_mark = (time.monotonic_ns(), time.process_time_ns())   # for the CPU share
        self.polls = 0

    def run(self, reps: int = 0) -> None:
        """Polls `reps` times (0: until a stop signal), then flushes and closes everything."""
        try:
            self._loop(reps)
        finally:
            self._shutdown()

    def _loop(self, reps: int) -> None:
        """Go-ticker cadence: a late poll is followed at once by the next, never by a burst.

        Between polls the loop sleeps on the signal pipe and the destroy listener, so a Close
        is announced when the kernel reports it, not at the next poll.  A tick with no active
        connection and no sweep due is skipped.
        """
        scheduled = started = time.monotonic_ns()
        cpu_mark = time.process_time_ns()
        last_report_s = 0
        last_start = 0
        while not self._stops.requested and (reps == 0 or self.polls < reps):
            begun = time.monotonic_ns()
            sweep = self._tiers.sweep_due(begun)
            result = self.poll_once(sweep)
            if self.polls == 1:
                log.info("First poll done: %d connections tracked", result.tracked)
            now = time.monotonic_ns()
            if sweep:
                self._tiers.swept(begun, now, result.joined)
                self._metrics.sweep_interval_achieved.set(self._tiers.achieved_ns / NS)
            if last_start and result.active:
                self._metrics.lookup_interval_achieved.set((begun - last_start) / NS)
            last_start = begun
            self._metrics.polling_interval.observe((now - started) / NS)
            self._metrics.poll_interval_achieved.set((now - started) / NS)
            started = now
            wall_s = time.time_ns() // NS
            if wall_s != last_report_s:
                self._report()
                last_report_s = wall_s
            cpu = time.process_time_ns()
            scheduled = self._cadence.next_start(scheduled, now, cpu - cpu_mark)
            self._metrics.cycle_cpu.set((cpu - cpu_mark) / NS)
            cpu_mark = cpu
            self._metrics.poll_period.set(self._cadence.period_ns / NS)
            self._metrics.sweep_period.set(self._tiers.period_ns / NS)
            self._wait_until(self._tiers.next_wake(scheduled, result.active))

    def _wait_until(self, deadline: int) -> None:
        """Sleeps until the monotonic deadline or a stop, handling destroy notifications."""
        destroy_fd = self._poller.destroy_fd
        wake = self._stops.wake
        fds: list[socket.socket | int] = [wake] if destroy_fd < 0 else [wake, destroy_fd]
        asked = self._queries.wake if self._queries is not None else None
        if asked is not None:
            fds.append(asked)
        now = time.monotonic_ns()
        while now < deadline and not self._stops.requested:
            readable, _, _ = select.select(fds, [], [], (deadline - now) / NS)
            if wake in readable:
                self._stops.clear_wake()   # signal bytes; the handler has done its work
            if destroy_fd in readable:
                self.drain_once()
            if asked is not None and asked in readable:
                self._queries.answer_pending(time.time_ns())   # type: ignore[union-attr]
            now = time.monotonic_ns()

    def drain_once(self) -> None:
        """Between polls: archive and announce the connections the kernel says have died."""
        result = self._poller.drain()
        self._rates.add(result)
        self._count_destroy(result.destroy)
        self._close_destroyed(result.destroyed)

    def poll_once(self, sweep: bool = True) -> PollResult:
        """One poll, a sweep or a refresh of the fast tier: archive what changed, announce what
        opened and closed, flush what is due."""
        result = self._poller.poll() if sweep else self._poller.refresh()
        self._rates.add(result)
        self.polls += 1
        events, prefix, counted = self._events, self._prefix, self._counted_ports
        new = 0
        for payload, cookie, _family, kind, ts in result.changes:
            if kind == PREVIOUS_WAS_NIL:
                new += 1
                events.flow_created(ts, make_uuid(prefix, cookie), payload)
                if counted:
                    self._count_port(cookie, payload)
            self._archive(payload, cookie, ts)
        if self._health is not None:
            self._health.observe_changes(result.changes)
        self._count_destroy(result.destroy)
        self._close_destroyed(result.destroyed)
        now_ns = time.time_ns()
        for payload, cookie, *_ in result.vanished:   # empty: no message kept (see struct image)
            self._close(cookie, now_ns, payload or None)
        self._saver.flush_due(now_ns)
        self._count(result, new)
        if self._queries is not None and self._queries.waiting:   # polls back to back: no wait
            self._queries.answer_pending(now_ns)
        return result

    def _close(self, cookie: int, ts: int, final: bytes | None) -> None:
        """Ends a connection: Close event, archive written and closed, its counters forgotten,
        and its final snapshot counted in the health aggregates."""
        self._events.flow_deleted(ts, make_uuid(self._prefix, cookie))
        if self._queries is not None:
            self._queries.remember_close(cookie, final, ts)   # before the samples are forgotten
        if self._health is not None:
            self._health.observe_close(cookie, final, ts)
        self._saver.close_connection(cookie, ts)
        port = self._port_of.pop(cookie, None)
        if port is not None:
            self._metrics.port_connections.labels(port=str(port)).dec()

    def _close_destroyed(self, destroyed: list[Change]) -> None:
        """The kernel's final record ends each archive; a short flow gets its Open first."""
        for payload, cookie, _family, kind, ts in destroyed:
            if kind == SHORT:
                self._events.flow_created(ts, make_uuid(self._prefix, cookie), payload)
            self._archive(payload, cookie, ts)
            self._close(cookie, ts, payload)

    def _count_port(self, cookie: int, payload: bytes) -> None:
        port = int.from_bytes(payload[_SPORT:_SPORT + 2], "big")
        if port in self._counted_ports:
            self._port_of[cookie] = port
            self._metrics.port_connections.labels(port=str(port)).inc()

    def _count(self, result: PollResult, new: int) -> None:
        """Per-poll metrics; all O(1) except the per-family loop of two."""
        changes = len(result.changes)
        self._metrics.snapshots.inc(changes)
        self._metrics.cache.labels(op="new").inc(new)
        self._metrics.cache.labels(op="changed").inc(changes - new)
        self._metrics.cache.labels(op="expired").inc(len(result.vanished))
        self._metrics.cache_count.observe(result.tracked)
        self._metrics.active_connections.set(result.active)
        if result.lookup is not None:
            self._count_lookups(result.lookup)
            return
        self._metrics.sweeps.inc()
        for family, stats in ((socket.AF_INET6, result.inet6), (socket.AF_INET, result.inet)):
            self._count_family(family, stats)

    def _count_lookups(self, stats: LookupStats) -> None:
        for outcome in LOOKUP_OUTCOMES:
            n = getattr(stats, outcome)
            if n:
                self._metrics.lookups.labels(outcome=outcome).inc(n)
        if stats.error is not None:
            self._metrics.lookup_failures.labels(reason=stats.error).inc()
            self._log(logging.WARNING, f"lookup {stats.error}", "Looking up the active "
                      "connections failed (%s, errno %d); the next sweep covers them", stats.error,
                      stats.errno)

    def _count_destroy(self, stats: DestroyStats) -> None:
        """Destroy notifications; the connections they end leave the cache as expired ones.

        Called before their events are sent, so a client that sees a Close and then scrapes
        /metrics finds it counted.
        """
        if stats.remnants:
            self._metrics.timewait_remnants.inc(stats.remnants)
        if not stats.received and not stats.overruns and not stats.errno_value:
            return
        self._metrics.cache.labels(op="new").inc(stats.shortflow)
        self._metrics.cache.labels(op="expired").inc(stats.final + stats.shortflow)
        for outcome, n in (("final", stats.final), ("short", stats.shortflow),
                           ("excluded", stats.excluded), ("late", stats.late), ("bad", stats.bad)):
            if n:
                self._metrics.destroy_notifications.labels(outcome=outcome).inc(n)
        if stats.overruns:
            self._metrics.destroy_overruns.inc(stats.overruns)
            self._log(logging.WARNING, "overrun", "Destroy notifications were lost (the "
                      "kernel's buffer or the core's queue was full); polls close those "
                      "connections instead")
        if stats.errno_value:
            self._log(logging.WARNING, "destroy errno",
                      "Reading destroy notifications failed: %s", os.strerror(stats.errno_value))

    def _count_family(self, family: int, stats: FamilyStats) -> None:
        af = AF_LABELS[family]
        self._metrics.syscall_time.labels(af=af).observe(stats.duration_ns / NS)
        self._metrics.connection_count.labels(af=af).observe(stats.messages)
        self._metrics.cache.labels(op="total").inc(stats.messages - stats.excluded - stats.bad)
        if stats.error is not None:
            self._metrics.count_dump_error(family, stats.error)
            self._log(logging.WARNING, f"{af} {stats.error}", "The %s dump failed (%s, errno "
                      "%d); its connections are kept until a dump succeeds", af, stats.error,
                      stats.errno)
        if stats.interrupted:
            self._metrics.count_dump_error(family, "interrupted")

    def _report(self) -> None:
        """Once a second: gauges, upstream's byte-rate histograms, and returning freed memory."""
        self._metrics.open_connections.set(self._saver.open_connections)
        self._metrics.buffered_bytes.set(self._saver.buffered_bytes)
        self._metrics.dump_threads.set(self._poller.threads)
        self._metrics.discovery_bound.set(self._tiers.take_bound() / NS)
        wall, cpu = time.monotonic_ns(), time.process_time_ns()
        self._metrics.cpu_share.set((cpu - self._cpu_mark[1]) / max(wall - self._cpu_mark[0], 1))
        self._cpu_mark = (wall, cpu)
        self._rates.report()
        if self._health is not None:
            self._health.expire(time.time_ns())
        self._poller.release_memory()

    def _shutdown(self) -> None:
        """Closes every flow for event clients, writes every buffer, releases the kernel socket."""
        now_ns = time.time_ns()
        open_cookies = self._saver.cookies()
        log.info("Stopping%s after %d polls; %d connections open, %d bytes to write",
                 f" on {self._stops.name}" if self._stops.requested else "", self.polls,
                 len(open_cookies), self._saver.buffered_bytes)
        for cookie in open_cookies:
            self._events.flow_deleted(now_ns, make_uuid(self._prefix, cookie))
        self._saver.close(now_ns)
        self._events.close()
        self._poller.close()
        self._metrics.buffered_bytes.set(0)
