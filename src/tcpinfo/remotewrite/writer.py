"""Push a registry to a Prometheus remote-write endpoint, for hosts no Prometheus can scrape.

Semantics are Tailscale stunstamp's (LANDSCAPE.md §2.2): a protobuf WriteRequest (encoded here by
hand: the collector has no protobuf dependency) compressed with snappy's block format (``snappy``),
every series' label names sorted, ``instance`` defaulting to the host name, the remote-write 0.1.0
headers.  Each ``interval`` the registry is collected on the writer's own thread; its samples,
all stamped with that moment, become one batch, compressed at once and queued.  Batches are sent
oldest first (Prometheus refuses a sample older than one it has): a 5xx or 429 answer, or no
answer, is retried with a backoff doubling up to 30 s; any other answer that is not 2xx drops that
batch (counted, logged).  The queue is bounded by bytes and by age; what does not fit is dropped
oldest first, and counted.  A series present in one collection and gone in the next (a health
group dropped after its TTL) gets a stale marker, Prometheus' special NaN, so queries stop seeing
it at once instead of five minutes later; at shutdown every series does.

The writer's own health is in ``tcpinfo_remote_write_*`` on the registry it is given.
"""
from __future__ import annotations

import base64
import http.client
import logging
import socket
import struct
import threading
import time
import urllib.parse
from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from prometheus_client import Counter, Gauge
from prometheus_client.registry import CollectorRegistry

from tcpinfo import __version__
from tcpinfo.base.ratelog import RateLimitedLog
from tcpinfo.remotewrite import snappy

log = logging.getLogger(__name__)

SECOND = 1_000_000_000
MIN_INTERVAL_NS = SECOND
MAX_INTERVAL_NS = 3600 * SECOND
MAX_BACKOFF_S = 30.0
FIRST_BACKOFF_S = 0.5
STALE_NAN = struct.pack("<Q", 0x7FF0000000000002)
"""Prometheus' stale marker (value.StaleNaN), as the 8 little-endian bytes of the double."""
HEADERS = {
    "Content-Encoding": "snappy",
    "Content-Type": "application/x-protobuf",
    "X-Prometheus-Remote-Write-Version": "0.1.0",
    "User-Agent": f"tcpinfo/{__version__}",
}
DROP_REASONS = ("rejected", "buffer_full", "too_old", "shutdown")
FAILURES = ("5xx", "429", "network", "rejected")

Labels = tuple[tuple[str, str], ...]
"""A series: its label pairs sorted by name, ``__name__`` included."""


def parse_url(text: str) -> str:
    """-remote-write.url: an http or https URL with a host; empty text means no remote write."""
    if not text:
        return text
    if any(c.isspace() or not c.isprintable() for c in text):
        raise ValueError(f"bad remote-write URL {text!r}: it contains a space or control "
                         f"character")
    try:
        parts = urllib.parse.urlsplit(text)
        parts.port   # noqa: B018 - raises ValueError for a port that is not 0-65535
    except ValueError as err:
        raise ValueError(f"bad remote-write URL {text!r}: {err}") from None
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValueError(f"bad remote-write URL {text!r}: want http(s)://host[:port]/path, e.g. "
                         f"http://prometheus:9090/api/v1/write")
    if parts.fragment:
        raise ValueError(f"bad remote-write URL {text!r}: a URL fragment (#...) has no meaning "
                         f"here")
    return text


def redacted(url: str) -> str:
    """The URL without its user:password, for logs."""
    parts = urllib.parse.urlsplit(url)
    return urllib.parse.urlunsplit(parts._replace(netloc=parts.netloc.rpartition("@")[2]))


def parse_label_value(text: str) -> str:
    """-remote-write.instance / -remote-write.job: a non-empty label value."""
    if not text or not text.isprintable():
        raise ValueError(f"bad label value {text!r}: want non-empty printable text")
    return text


@dataclass(frozen=True)
class RemoteWriteConfig:
    """Where and how to push; checked when made (ValueError)."""

    url: str
    interval_ns: int = 15 * SECOND
    instance: str = field(default_factory=socket.gethostname)
    job: str = "tcp-info"
    buffer_bytes: int = 64 << 20
    max_age_ns: int = 3600 * SECOND
    timeout_ns: int = 10 * SECOND

    def __post_init__(self) -> None:
        if not self.url:
            raise ValueError("-remote-write.url is empty")
        parse_url(self.url)
        parse_label_value(self.instance)
        parse_label_value(self.job)
        if not MIN_INTERVAL_NS <= self.interval_ns <= MAX_INTERVAL_NS:
            raise ValueError("-remote-write.interval must be between 1s and 1h")
        if self.max_age_ns < self.interval_ns:
            raise ValueError("-remote-write.max-age must be at least -remote-write.interval")
        if not 0 < self.timeout_ns <= 60 * SECOND:
            raise ValueError("-remote-write.timeout must be positive and at most 1m")
        if self.buffer_bytes < 4 << 10:
            raise ValueError("-remote-write.buffer must be at least 4KiB")




# --- protobuf (prometheus/prompb: WriteRequest, TimeSeries, Label, Sample) ----------------------

def _field(tag: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2) with a one-byte tag."""
    return bytes((tag,)) + snappy.varint(len(payload)) + payload


def encode_labels(labels: Labels) -> bytes:
    """The TimeSeries.labels fields (1) of one series, in the order given."""
    return b"".join(_field(0x0A, _field(0x0A, name.encode()) + _field(0x12, value.encode()))
                    for name, value in labels)


_DOUBLE = struct.Struct("<d")


def encode_sample(value: float | None, timestamp_ms: int) -> bytes:
    """One TimeSeries.samples field (2): double value (None: the stale marker), int64 ms."""
    bits = STALE_NAN if value is None else _DOUBLE.pack(value)
    return _field(0x12, b"\x09" + bits + b"\x10" + snappy.varint(timestamp_ms & (1 << 64) - 1))


def encode_write_request(series: Iterable[tuple[bytes, bytes]]) -> bytes:
    """WriteRequest of (encoded labels, encoded samples) pairs: one TimeSeries (field 1) each."""
    return b"".join(_field(0x0A, labels + samples) for labels, samples in series)


# --- the writer --------------------------------------------------------------------------------

@dataclass
class Batch:
    made_ns: int          # monotonic, for the age limit
    body: bytes           # snappy-compressed WriteRequest
    samples: int


class RemoteWriter:
    """Collects ``source`` every interval and pushes it; start() once, stop() at shutdown.

    ``registry`` receives the writer's own metrics (it may be ``source`` itself, so they are
    pushed too).
    """

    def __init__(self, config: RemoteWriteConfig, source: CollectorRegistry,
                 registry: CollectorRegistry) -> None:
        self._config = config
        self._source = source
        parts = urllib.parse.urlsplit(config.url)
        self._https = parts.scheme == "https"
        self._host, self._port = parts.hostname or "", parts.port   # parse_url refused no host
        self._path = (parts.path or "/") + (f"?{parts.query}" if parts.query else "")
        self._headers = dict(HEADERS)
        if parts.username is not None:
            secret = f"{urllib.parse.unquote(parts.username)}:" \
                     f"{urllib.parse.unquote(parts.password or '')}"
            self._headers["Authorization"] = "Basic " + base64.b64encode(secret.encode()).decode()
        self._target = redacted(config.url)
        self._queue: deque[Batch] = deque()
        self._queued_bytes = 0
        self._last: dict[Labels, bytes] = {}    # series of the last collection -> its labels
        self._wake = threading.Event()
        self._stopping = False
        self._stop_deadline = 0.0
        self._thread = threading.Thread(target=self._run, name="remote-write", daemon=True)
        self._log = RateLimitedLog(log)
        self.sent_samples = Counter(
            "tcpinfo_remote_write_sent_samples_total",
            "Samples the remote-write endpoint accepted.", registry=registry)
        self.failed = Counter(
            "tcpinfo_remote_write_failed_requests_total",
            "Remote-write requests that failed: 5xx, 429 and network (retried with backoff), "
            "rejected (another status: the batch is dropped).", ["reason"], registry=registry)
        self.dropped = Counter(
            "tcpinfo_remote_write_dropped_samples_total",
            "Samples never delivered: rejected by the endpoint, buffer_full (oldest dropped for "
            "-remote-write.buffer), too_old (-remote-write.max-age), shutdown (unsent at exit).",
            ["reason"], registry=registry)
        self.queued_samples = Gauge(
            "tcpinfo_remote_write_queued_samples", "Samples waiting to be sent.",
            registry=registry)
        self.queued_bytes = Gauge(
            "tcpinfo_remote_write_queued_bytes", "Compressed bytes waiting to be sent.",
            registry=registry)
        self.last_success = Gauge(
            "tcpinfo_remote_write_last_success_timestamp_seconds",
            "When the endpoint last accepted a batch (Unix time; 0: never).", registry=registry)
        for reason in FAILURES:
            self.failed.labels(reason=reason)
        for reason in DROP_REASONS:
            self.dropped.labels(reason=reason)

    def start(self) -> None:
        log.info("Pushing metrics to %s every %.3gs (instance=%s, job=%s)", self._target,
                 self._config.interval_ns / SECOND, self._config.instance, self._config.job)
        self._thread.start()

    def stop(self, timeout_s: float = 5.0) -> None:
        """Queues a stale marker for every series, sends what it can within ``timeout_s``,
        counts the rest as dropped (reason shutdown) and ends the thread.  Nothing to do if
        start() was never called: nothing was pushed."""
        if self._thread.ident is None:
            return
        self._stop_deadline = time.monotonic() + timeout_s
        self._stopping = True
        self._wake.set()
        self._thread.join(timeout_s + self._config.timeout_ns / SECOND + 1)

    # --- the writer's thread ------------------------------------------------------------------

    def _run(self) -> None:
        interval = self._config.interval_ns / SECOND
        next_collect = time.monotonic()
        retry_at = 0.0
        backoff = 0.0
        while not self._stopping:
            now = time.monotonic()
            if now >= next_collect:
                try:
                    self._collect(time.time_ns() // 1_000_000)
                except Exception:   # a broken collector must not end the pushes
                    self._log(logging.ERROR, "remote write collect",
                              "Remote write: collecting the metrics failed", exc_info=True)
                next_collect = max(next_collect + interval, now)   # no catch-up bursts
            self._expire()
            if self._queue and now >= retry_at:
                if self._send_head():
                    backoff = 0.0
                    continue
                backoff = min(max(backoff * 2, FIRST_BACKOFF_S), MAX_BACKOFF_S)
                retry_at = time.monotonic() + backoff
            wait = next_collect - time.monotonic()
            if self._queue:
                wait = min(wait, retry_at - time.monotonic())
            if wait > 0:
                self._wake.wait(wait)
        self._shutdown()

    def _shutdown(self) -> None:
        self._collect(time.time_ns() // 1_000_000, final=True)
        while self._queue and time.monotonic() < self._stop_deadline:
            if not self._send_head():
                self._wake.clear()
                self._wake.wait(min(FIRST_BACKOFF_S, max(self._stop_deadline - time.monotonic(),
                                                         0)))
        if self._queue:
            lost = sum(b.samples for b in self._queue)
            self.dropped.labels(reason="shutdown").inc(lost)
            log.warning("Remote write: %d samples not delivered to %s at shutdown", lost,
                        self._target)
            self._queue.clear()
            self._account()

    def _collect(self, timestamp_ms: int, final: bool = False) -> None:
        """One batch: every sample of the source (none if final) and stale markers for the
        series that were in the last collection and are not in this one."""
        extra = (("instance", self._config.instance), ("job", self._config.job))
        current: dict[Labels, bytes] = {}
        series: list[tuple[bytes, bytes]] = []
        if not final:
            for family in self._source.collect():
                for sample in family.samples:
                    labels = dict(extra)
                    labels.update(sample.labels)     # a sample's own job/instance are kept
                    labels["__name__"] = sample.name
                    key = tuple(sorted(labels.items()))
                    encoded = self._last.get(key) or encode_labels(key)
                    current[key] = encoded
                    series.append((encoded, encode_sample(float(sample.value), timestamp_ms)))
        stale = encode_sample(None, timestamp_ms)
        series.extend((encoded, stale) for key, encoded in self._last.items()
                      if key not in current)
        self._last = current
        if not series:
            return
        body = snappy.compress(encode_write_request(series))
        self._queue.append(Batch(time.monotonic_ns(), body, len(series)))
        self._queued_bytes += len(body)
        while self._queued_bytes > self._config.buffer_bytes and len(self._queue) > 1:
            self._drop_head("buffer_full")
        self._account()

    def _expire(self) -> None:
        oldest = time.monotonic_ns() - self._config.max_age_ns
        while self._queue and self._queue[0].made_ns < oldest:
            self._drop_head("too_old")

    def _drop_head(self, reason: str) -> None:
        batch = self._queue.popleft()
        self._queued_bytes -= len(batch.body)
        self.dropped.labels(reason=reason).inc(batch.samples)
        self._log(logging.WARNING, f"remote write {reason}",
                  "Remote write: dropped a batch of %d samples for %s (%s)", batch.samples,
                  self._target, reason)
        self._account()

    def _account(self) -> None:
        self.queued_samples.set(sum(b.samples for b in self._queue))
        self.queued_bytes.set(self._queued_bytes)

    def _send_head(self) -> bool:
        """Sends the oldest batch; True if it left the queue (accepted, or rejected for good)."""
        batch = self._queue[0]
        try:
            status, reason = self._post(batch.body)
        except (OSError, http.client.HTTPException) as err:
            self.failed.labels(reason="network").inc()
            self._log(logging.WARNING, "remote write network",
                      "Remote write to %s failed: %s; retrying", self._target, err)
            return False
        if 200 <= status < 300:
            self._queue.popleft()
            self._queued_bytes -= len(batch.body)
            self.sent_samples.inc(batch.samples)
            self.last_success.set(time.time())
            self._account()
            return True
        if status == 429 or status >= 500:
            self.failed.labels(reason="429" if status == 429 else "5xx").inc()
            self._log(logging.WARNING, f"remote write {status}",
                      "Remote write to %s answered %d %s; retrying", self._target, status, reason)
            return False
        self.failed.labels(reason="rejected").inc()
        self._log(logging.WARNING, f"remote write {status}",
                  "Remote write to %s answered %d %s; dropping the batch", self._target, status,
                  reason)
        self._drop_head("rejected")
        return True

    def _post(self, body: bytes) -> tuple[int, str]:
        """One POST on a fresh connection: (status, first line of the answer's body)."""
        timeout = self._config.timeout_ns / SECOND
        conn = (http.client.HTTPSConnection(self._host, self._port, timeout=timeout)
                if self._https else
                http.client.HTTPConnection(self._host, self._port, timeout=timeout))
        try:
            conn.request("POST", self._path, body, self._headers)
            response = conn.getresponse()
            text = response.read(512).decode("utf-8", "replace").strip().split("\n", 1)[0]
            return response.status, text or response.reason
        finally:
            conn.close()
