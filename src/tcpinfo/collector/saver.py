"""Archive storage: one `<YYYY>/<MM>/<DD>/<uuid>.<seq>.jsonl.zst` series per connection.

Upstream keeps one zstd process, pipe and file descriptor per open connection and runs out of file
descriptors on busy hosts (its issue #17).  Here a connection costs a small object and, while it has
unwritten records, one bytearray.  Pending lines are compressed as one complete zstd frame (level 3,
with checksum) and appended to the connection's file, opened and closed for that one write, when they
are big enough, old enough, when the connection closes or rotates, when the global cap is reached,
and at shutdown.  Every file is therefore a sequence of whole frames that any zstd decoder reads; a
crash loses only what was never flushed.

Nothing already written is ever overwritten: a file is created with O_EXCL, and when the name is
taken (an earlier run of the collector, or a connection seen again) the next free sequence number is
used.  A failed write is undone (partial bytes truncated, a new file removed), counted, logged once
per cause and retried a second later; while writes fail, records wait in memory within the
per-connection and global caps, beyond which the oldest are dropped and counted.

Files and directories are reached through tcpinfo.collector.outtree: relative to the output root's and the
day directory's descriptors, following no link, with the operator's modes.  An archive found to be
something other than the file this process created (a link, a FIFO, another file) is left alone,
and the connection goes on in its next sequence file, as when an uploader took the file away.
"""
from __future__ import annotations

import errno
import logging
import os
import struct
import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass

import zstandard

from tcpinfo.archive.record import encode_header
from tcpinfo.archive.uuids import make_uuid
from tcpinfo.collector.metrics import Metrics
from tcpinfo.collector.outtree import FILE_MODE, OutputTree

log = logging.getLogger(__name__)

NS_PER_DAY = 86_400 * 1_000_000_000
RETRY_NS = 1_000_000_000
SHUTDOWN_FAILURE_LIMIT = 100   # consecutive failed writes after which shutdown stops trying
ZSTD_LEVEL = 3                 # what upstream's `zstd` CLI uses by default


@dataclass(frozen=True)
class Limits:
    """When pending records are written, and how much may wait in memory."""
    flush_size: int = 128 * 1024
    flush_age_ns: int = 5_000_000_000
    conn_limit: int = 1024 * 1024
    total_limit: int = 32 * 1024 * 1024
    rotate_ns: int = 600_000_000_000


# An idle connection (nothing pending, its file written) is kept packed, not as a _Connection:
# start_ns, expires_ns, inode, day (days since the epoch), seq.  With 200,000 idle connections
# that is about 130 bytes less each.
_IDLE = struct.Struct("<qqqqI")


class _Connection:
    """What the saver remembers about one connection; small, because there may be 100,000."""
    __slots__ = ("cookie", "start_ns", "seq", "day", "expires_ns", "inode", "lines", "size",
                 "first_ns")

    def __init__(self, cookie: int, start_ns: int, day: str, expires_ns: int) -> None:
        self.cookie = cookie
        self.start_ns = start_ns        # Metadata StartTime: first record seen by this process
        self.seq = 0                    # sequence of the current file
        self.day = day                  # "YYYY/MM/DD" directory of the current file
        self.expires_ns = expires_ns    # a record at or after this time starts the next file
        self.inode = 0                  # the current file's, once it exists with its header
        self.lines: list[bytes] | None = None  # pending lines, None when there are none
        self.size = 0                   # their total length
        self.first_ns = 0               # timestamp of the oldest pending line

    def pack(self, day_key: int) -> bytes:
        """The idle form: what a connection with nothing pending needs to go on later."""
        return _IDLE.pack(self.start_ns, self.expires_ns, self.inode, day_key, self.seq)

    @classmethod
    def unpack(cls, cookie: int, packed: bytes, day: Callable[[int], str]) -> _Connection:
        start_ns, expires_ns, inode, day_key, seq = _IDLE.unpack(packed)
        conn = cls(cookie, start_ns, day(day_key * NS_PER_DAY), expires_ns)
        conn.inode = inode
        conn.seq = seq
        return conn


class Saver:
    """Buffers each connection's record lines and appends them to its archive as zstd frames.

    Times are passed in by the caller (record timestamps and the poll's wall clock), so the saver
    itself never reads a clock on the hot path and tests can drive it through days in a moment.
    """

    def __init__(self, root: str, prefix: str, metrics: Metrics, limits: Limits = Limits(),
                 extra_metadata: dict | Callable[[], dict] | None = None,
                 file_mode: int = FILE_MODE) -> None:
        """`extra_metadata`: Metadata keys after upstream's three, or what makes them, asked
        for at every new file (a clock reading belongs to the file it starts)."""
        self._metrics = metrics
        self._tree = OutputTree(root, metrics.unsafe_paths, file_mode)
        self._prefix = prefix
        self._limits = limits
        self._flush_size = limits.flush_size      # the two limits checked on every write
        self._total_limit = limits.total_limit
        self._extra = extra_metadata
        self._conns: dict[int, _Connection | bytes] = {}   # bytes: packed while idle
        self._dirty: OrderedDict[_Connection, None] = OrderedDict()  # oldest pending line first
        self._pending = 0
        self._retry_ns = 0              # no write is attempted before this time (after a failure)
        self._failing: set[str] = set()  # causes logged since the last successful write
        self._days: dict[int, str] = {}
        self._day_keys: dict[str, int] = {}
        self._zstd = zstandard.ZstdCompressor(level=ZSTD_LEVEL, write_checksum=True)

    # ----------------------------------------------------------------------------- public API

    @property
    def open_connections(self) -> int:
        return len(self._conns)

    @property
    def buffered_bytes(self) -> int:
        return self._pending

    def cookies(self) -> list[int]:
        return list(self._conns)

    def write(self, cookie: int, ts_ns: int, line: bytes) -> None:
        """Queues one record line (from encode_record) of a connection; its first line opens it."""
        found = self._conns.get(cookie)
        if isinstance(found, bytes):
            found = self._conns[cookie] = _Connection.unpack(cookie, found, self._day)
        conn = found
        if conn is None or ts_ns >= conn.expires_ns:
            conn = self._open_or_rotate(cookie, conn, ts_ns)
        n = len(line)
        lines = conn.lines
        if lines is None:
            conn.lines = [line]   # a list, joined once per frame: appending to one buffer
            conn.size = size = n  # would copy it over and over as it grows
            conn.first_ns = ts_ns
            self._dirty[conn] = None
        else:
            lines.append(line)
            conn.size = size = conn.size + n
        self._pending += n
        if size >= self._flush_size or self._pending > self._total_limit:
            self._enforce_limits(conn, ts_ns)

    def close_connection(self, cookie: int, now_ns: int) -> None:
        """The connection is gone: write what it has pending and forget it.

        If the write fails, its records stay queued and are retried like any other.
        """
        conn = self._conns.pop(cookie, None)
        if isinstance(conn, _Connection) and conn.lines is not None and now_ns >= self._retry_ns:
            self._flush(conn, now_ns)

    def flush_due(self, now_ns: int) -> None:
        """Writes every buffer whose oldest line is older than the flush age; call once per poll."""
        if now_ns < self._retry_ns:
            return
        oldest_allowed = now_ns - self._limits.flush_age_ns
        dirty = self._dirty
        while dirty:
            conn = next(iter(dirty))
            if conn.first_ns > oldest_allowed or not self._flush(conn, now_ns):
                return
            self._pack(conn)

    def close(self, now_ns: int) -> None:
        """Shutdown: writes everything pending, giving up (and counting) after repeated failures."""
        self._conns.clear()
        failures = 0
        while self._dirty and failures < SHUTDOWN_FAILURE_LIMIT:
            conn = next(iter(self._dirty))
            if self._flush(conn, now_ns):
                failures = 0
            else:
                failures += 1
                self._drop(conn, len(conn.lines), "shutdown")  # type: ignore[arg-type]
        while self._dirty:
            conn = next(iter(self._dirty))
            self._drop(conn, len(conn.lines), "shutdown")  # type: ignore[arg-type]
        self._tree.close()

    # -------------------------------------------------------------------------- buffer policy

    def _day(self, ts_ns: int) -> str:
        """UTC "YYYY/MM/DD" (Go layout 2006/01/02), shared between connections of the same day."""
        key = ts_ns // NS_PER_DAY
        day = self._days.get(key)
        if day is None:
            day = self._days[key] = time.strftime("%Y/%m/%d", time.gmtime(key * 86_400))
            self._day_keys[day] = key
        return day

    def _open_or_rotate(self, cookie: int, conn: _Connection | None, ts_ns: int) -> _Connection:
        """A connection's first record opens it; a record past its file's expiration rotates it.

        Rotation ends the current file and starts the next sequence, dated today, lasting from
        now.  Upstream adds the interval to the previous expiration, so after an idle hour every
        record starts yet another file; counting from now gives one new file per active interval.
        """
        if conn is None:
            conn = self._conns[cookie] = _Connection(cookie, ts_ns, self._day(ts_ns),
                                                     ts_ns + self._limits.rotate_ns)
            return conn
        if conn.lines is not None and ts_ns >= self._retry_ns:
            self._flush(conn, ts_ns)
        if conn.inode:
            conn.seq += 1
            conn.inode = 0
        conn.day = self._day(ts_ns)
        conn.expires_ns = ts_ns + self._limits.rotate_ns
        return conn

    def _enforce_limits(self, conn: _Connection, now_ns: int) -> None:
        """After an append: write a buffer that reached the flush size, relieve the global cap."""
        if conn.size >= self._flush_size:
            self._flush_big(conn, now_ns)
        if self._pending > self._total_limit:
            self._relieve(now_ns)

    def _pack(self, conn: _Connection) -> None:
        """A connection whose lines were written goes back to its idle form (a few hundred bytes
        less each: at 100,000 connections that is most of the saver's memory).  Only after the
        write() that queued into it is done with it."""
        if self._conns.get(conn.cookie) is conn:
            self._conns[conn.cookie] = conn.pack(self._day_keys[conn.day])

    def _flush_big(self, conn: _Connection, now_ns: int) -> None:
        """A buffer reached the flush size: write it, or while writes fail keep only the newest."""
        if now_ns >= self._retry_ns and self._flush(conn, now_ns):
            self._pack(conn)
            return
        excess = conn.size - self._limits.conn_limit
        if excess > 0:
            count = 0
            for line in conn.lines:  # type: ignore[union-attr]
                if excess <= 0:
                    break
                excess -= len(line)
                count += 1
            self._drop(conn, count, "connection limit")

    def _relieve(self, now_ns: int) -> None:
        """Global cap reached: write the oldest buffers, and drop the oldest if writes fail."""
        target = self._total_limit * 3 // 4
        dirty = self._dirty
        while self._pending > target and dirty:
            conn = next(iter(dirty))
            if now_ns < self._retry_ns or not self._flush(conn, now_ns):
                self._drop(conn, len(conn.lines or ()), "buffer limit")
            else:
                self._pack(conn)

    def _drop(self, conn: _Connection, count: int, reason: str) -> None:
        """Discards the oldest `count` of a connection's pending lines."""
        lines = conn.lines
        if lines is None:
            return
        nbytes = sum(map(len, lines[:count]))
        self._metrics.dropped_records.labels(reason=reason).inc(min(count, len(lines)))
        self._metrics.dropped_bytes.labels(reason=reason).inc(nbytes)
        self._pending -= nbytes
        if count >= len(lines):
            conn.lines = None
            conn.size = 0
            del self._dirty[conn]
        else:
            del lines[:count]
            conn.size -= nbytes

    # ----------------------------------------------------------------------------- file I/O

    def _flush(self, conn: _Connection, now_ns: int) -> bool:
        """Writes a connection's pending lines as one frame; False (and retry later) on failure."""
        lines = conn.lines
        try:
            if conn.inode:
                self._append(conn, lines, now_ns)  # type: ignore[arg-type]
            else:
                self._create(conn, lines, now_ns)  # type: ignore[arg-type]
        except OSError as err:
            self._write_failed(err, now_ns)
            return False
        self._pending -= conn.size
        conn.lines = None
        conn.size = 0
        del self._dirty[conn]
        if self._failing:
            log.warning("Archive writes work again (after %s)", ", ".join(sorted(self._failing)))
            self._failing.clear()
        return True

    def _name(self, conn: _Connection) -> str:
        return f"{make_uuid(self._prefix, conn.cookie)}.{conn.seq:05d}.jsonl.zst"

    def _create(self, conn: _Connection, lines: list[bytes], now_ns: int) -> None:
        """Creates the connection's next file (never an existing one) with its header line."""
        try:
            fd, inode, dir_fd, name = self._new_file(conn, now_ns)
        except FileNotFoundError:   # the open day directory was removed: look it up again
            self._tree.forget(conn.day)
            fd, inode, dir_fd, name = self._new_file(conn, now_ns)
        extra = self._extra() if callable(self._extra) else self._extra
        header = encode_header(make_uuid(self._prefix, conn.cookie), conn.seq, conn.start_ns, extra)
        try:
            _write_all(fd, self._zstd.compress(b"".join([header, *lines])))
            conn.inode = inode   # appends check that the file is still this one
        except OSError:
            os.unlink(name, dir_fd=dir_fd)
            raise
        finally:
            os.close(fd)
        self._metrics.new_files.inc()

    def _new_file(self, conn: _Connection, now_ns: int) -> tuple[int, int, int, str]:
        """Creates the first free sequence's file: its descriptor and inode, its directory's
        descriptor and its name."""
        dir_fd, _ = self._tree.day(conn.day, now_ns)
        while True:
            name = self._name(conn)
            try:
                return (*self._tree.create(dir_fd, name), dir_fd, name)
            except FileExistsError:
                conn.seq += 1

    def _append(self, conn: _Connection, lines: list[bytes], now_ns: int) -> None:
        """Appends one frame; a partial write is cut off again so the file stays whole frames."""
        opened = self._tree.reopen(conn.day, self._name(conn), conn.inode, now_ns)
        if opened is None:
            # Taken away (an uploader) or replaced: go on in a new file, with a header.
            conn.seq += 1
            conn.inode = 0
            conn.day = self._day(now_ns)
            self._create(conn, lines, now_ns)
            return
        fd, size = opened
        try:
            try:
                _write_all(fd, self._zstd.compress(b"".join(lines)))
            except OSError:
                os.ftruncate(fd, size)
                raise
        finally:
            os.close(fd)

    def _write_failed(self, err: OSError, now_ns: int) -> None:
        cause = errno.errorcode.get(err.errno or 0, type(err).__name__)
        self._metrics.write_errors.labels(cause=cause).inc()
        self._retry_ns = now_ns + RETRY_NS
        if cause not in self._failing:
            self._failing.add(cause)
            log.error("Cannot write archives: %s; keeping records in memory (up to %d bytes) "
                      "and retrying every second", err, self._limits.total_limit)


def _write_all(fd: int, data: bytes) -> None:
    view = memoryview(data)
    while view:
        view = view[os.write(fd, view):]
