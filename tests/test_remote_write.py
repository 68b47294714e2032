"""Remote write against a real Prometheus (--web.enable-remote-write-receiver), through a small
real HTTP proxy that can answer 503 or 400 instead of passing a push on."""
from __future__ import annotations

import http.server
import os
import threading
import time
import urllib.request

import cramjam
import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

from helpers.health import Prometheus, feed, uuid_of
from helpers.poller import drain_until, listening_poller
from lab.netns import cookie_of
from tcpinfo.health.aggregate import Aggregator
from tcpinfo.health.config import HealthConfig
from tcpinfo.remotewrite import snappy
from tcpinfo.remotewrite.writer import HEADERS, RemoteWriteConfig, RemoteWriter, parse_url, redacted

SECOND = 1_000_000_000


@pytest.fixture(scope="module")
def prom(tmp_path_factory):
    server = Prometheus(tmp_path_factory.mktemp("prometheus"))
    yield server
    server.stop()


class Proxy:
    """Forwards pushes to Prometheus, except those ``answer(n)`` (n counts from 1) gives a
    status for; keeps every request's headers and body."""

    def __init__(self, target: str, answer=lambda n: None) -> None:
        self.requests: list[tuple[dict, bytes, int]] = []
        proxy = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers["Content-Length"]))
                status = answer(len(proxy.requests) + 1)
                if status is None:
                    forward = urllib.request.Request(target, body, dict(self.headers))
                    try:
                        with urllib.request.urlopen(forward, timeout=10) as r:
                            status = r.status
                    except urllib.error.HTTPError as err:
                        status = err.code
                proxy.requests.append((dict(self.headers), body, status))
                self.send_response(status)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/api/v1/write"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


class Pushes(Collector):
    """tcpinfo_test_collections: how many times the writer collected, so a gap shows a loss;
    plus ``padding`` series of incompressible label values to make batches big."""

    def __init__(self, padding: int = 0) -> None:
        self.count = 0
        self.padding = [os.urandom(24).hex() for _ in range(padding)]

    def collect(self):
        self.count += 1
        gauge = GaugeMetricFamily("tcpinfo_test_collections", "Collections so far.")
        gauge.add_metric([], self.count)
        yield gauge
        if self.padding:
            pad = GaugeMetricFamily("tcpinfo_test_padding", "Bulk.", labels=["blob"])
            for blob in self.padding:
                pad.add_metric([blob], 1)
            yield pad


def writer_for(url: str, instance: str, source: CollectorRegistry, **settings) -> RemoteWriter:
    config = RemoteWriteConfig(url, interval_ns=SECOND, instance=instance, **settings)
    return RemoteWriter(config, source, CollectorRegistry())


def wait_for(check, timeout: float = 30, what: str = "condition"):
    deadline = time.monotonic() + timeout
    while True:
        value = check()
        if value:
            return value
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        time.sleep(0.2)


def collections(prom: Prometheus, instance: str) -> list[int]:
    raw = prom.raw(f'tcpinfo_test_collections{{instance="{instance}"}}')
    return [int(v) for series in raw.values() for _, v in series]


def counter(metric, **labels) -> float:
    return (metric.labels(**labels) if labels else metric)._value.get()


# --- the wire format ----------------------------------------------------------------------------

def _varint(b: bytes, i: int) -> tuple[int, int]:
    shift = value = 0
    while True:
        value |= (b[i] & 0x7F) << shift
        shift += 7
        i += 1
        if b[i - 1] < 0x80:
            return value, i


def _fields(b: bytes):
    """(field number, value) of a protobuf message: bytes for length-delimited, ints, or the 8
    bytes of a fixed64."""
    i = 0
    while i < len(b):
        key, i = _varint(b, i)
        kind = key & 7
        if kind == 0:
            value, i = _varint(b, i)
        elif kind == 1:
            value, i = b[i:i + 8], i + 8
        else:
            assert kind == 2, kind
            n, i = _varint(b, i)
            value, i = b[i:i + n], i + n
        yield key >> 3, value


def decode_write_request(body: bytes) -> list[tuple[list[tuple[str, str]], list[tuple[bytes, int]]]]:
    """The series of a snappy-compressed WriteRequest, decoded independently of the encoder."""
    out = []
    for number, ts in _fields(bytes(cramjam.snappy.decompress_raw(body))):
        assert number == 1
        labels, points = [], []
        for field, value in _fields(ts):
            pairs = dict(_fields(value))
            if field == 1:
                labels.append((pairs[1].decode(), pairs[2].decode()))
            else:
                points.append((pairs[1], pairs[2]))
        out.append((labels, points))
    return out


def test_snappy_blocks_decode_with_an_independent_implementation():
    import random
    rng = random.Random(16)
    inputs = [b"", b"a", b"abcd" * 5000, bytes(300_000), os.urandom(200_000),
              b"".join(b'{__name__="x_bucket",le="%d"} ' % i + os.urandom(4) for i in range(5000))]
    for _ in range(200):
        alphabet = bytes(rng.sample(range(256), rng.randrange(1, 5)))
        inputs.append(bytes(rng.choice(alphabet) for _ in range(rng.randrange(0, 3000))))
    for data in inputs:
        packed = snappy.compress(data)
        assert bytes(cramjam.snappy.decompress_raw(packed)) == data
    assert len(snappy.compress(b"abcd" * 5000)) < 1000      # copies, not literals


def test_bad_urls_and_settings_are_refused_with_a_reason():
    for url in ("localhost:9090", "ftp://host/x", "http://", "http://host:99999/x",
                "http://host:x/", "http://ho st/", "http://host/#frag", "http://host/\n"):
        with pytest.raises(ValueError, match="bad remote-write URL"):
            parse_url(url)
    assert parse_url("https://user:pw@[::1]:9090/api/v1/write?tenant=a")
    assert redacted("https://user:pw@[::1]:9090/w") == "https://[::1]:9090/w"
    for settings, message in (({"interval_ns": SECOND // 2}, "between 1s and 1h"),
                              ({"max_age_ns": 1}, "max-age"),
                              ({"buffer_bytes": 10}, "buffer"),
                              ({"instance": ""}, "bad label value")):
        with pytest.raises(ValueError, match=message):
            RemoteWriteConfig("http://127.0.0.1:9/api/v1/write", **settings)


# --- against Prometheus -------------------------------------------------------------------------

def test_pushed_health_series_read_back_with_sorted_labels_then_go_stale(prom, testnet, tmp_path):
    source = CollectorRegistry()
    agg = Aggregator(HealthConfig(group_ttl_ns=SECOND), source, uuid_of)
    poller = listening_poller(testnet, testnet.ns_a)
    client, server, listener = testnet.connect()
    feed(poller, agg)
    proxy = Proxy(prom.write_url)
    writer = writer_for(proxy.url, "push-test", source)
    writer.start()
    try:
        open_v4 = 'tcpinfo_health_open_connections{instance="push-test",family="ipv4"}'
        got = wait_for(lambda: prom.query(open_v4), what="the pushed gauge")
        assert got[0][0] == {"__name__": "tcpinfo_health_open_connections", "family": "ipv4",
                             "instance": "push-test", "job": "tcp-info"}
        assert got[0][1] == "1"
        headers, body, status = proxy.requests[0]
        assert status == 204
        for name, value in HEADERS.items():
            assert headers[name] == value
        for labels, points in decode_write_request(body):
            names = [name for name, _ in labels]
            assert names == sorted(names) and "__name__" in names
            assert dict(labels)["instance"] == "push-test" and len(points) == 1

        # The connection closes and its group outlives its TTL: the next push marks every
        # series of the group stale, so an instant query no longer finds them.
        cookie = cookie_of(client)
        client.close()
        server.close()
        listener.close()
        final = drain_until(poller, {cookie})[cookie]
        agg.observe_close(final.cookie, final.payload, final.timestamp_ns)
        wait_for(lambda: prom.query(f"{open_v4} == 0"), what="the close")
        agg.expire(time.time_ns() + SECOND)
        pushed = len(proxy.requests)
        wait_for(lambda: len(proxy.requests) > pushed, what="a push after the group went away")
        time.sleep(0.5)
        assert prom.query(open_v4) == []
        assert prom.query('tcpinfo_health_closed_rtt_seconds_count{instance="push-test"}') == []
        assert prom.query('tcpinfo_health_groups{instance="push-test"}')[0][1] == "0"
        history = prom.raw(open_v4)
        assert [v for _, v in next(iter(history.values()))][-1] == "0"   # stored, then stale
    finally:
        writer.stop()
        proxy.close()
    # At shutdown every series is marked stale.
    assert prom.query('{instance="push-test"}', at=time.time() + 1) == []
    assert counter(writer.sent_samples) > 0 and writer.last_success._value.get() > 0
    assert all(counter(writer.dropped, reason=r) == 0 for r in ("rejected", "buffer_full",
                                                                "too_old", "shutdown"))


def push_through_outage(prom: Prometheus, instance: str, seconds: float, pushes: Pushes,
                        **settings) -> tuple[RemoteWriter, Proxy, list[int], list[int]]:
    """Pushes every second while the receiver answers 503 for ``seconds``, then until the
    latest collection has arrived (so the backlog has drained), then stops the writer.
    Returns the writer, the proxy, the collections that arrived and those lost."""
    source = CollectorRegistry()
    source.register(pushes)
    outage_until = time.monotonic() + seconds
    proxy = Proxy(prom.write_url, lambda n: 503 if time.monotonic() < outage_until else None)
    writer = writer_for(proxy.url, instance, source, **settings)
    writer.start()
    try:
        time.sleep(seconds + 0.5)
        assert collections(prom, instance) == []
        wait_for(lambda: pushes.count in collections(prom, instance), what="the backlog")
    finally:
        writer.stop()
        proxy.close()
    arrived = collections(prom, instance)
    return writer, proxy, arrived, [n for n in range(1, pushes.count + 1) if n not in arrived]


def test_a_receiver_answering_503_for_a_while_loses_nothing_that_fits_the_buffer(prom):
    pushes = Pushes()
    writer, proxy, arrived, lost = push_through_outage(prom, "outage-test", 4, pushes)
    assert lost == [] and arrived == list(range(1, pushes.count + 1)) and pushes.count >= 6
    assert counter(writer.failed, reason="5xx") >= 3
    assert sum(1 for *_, status in proxy.requests if status == 503) == \
        counter(writer.failed, reason="5xx")
    assert all(counter(writer.dropped, reason=r) == 0 for r in ("rejected", "buffer_full",
                                                                "too_old", "shutdown"))
    assert writer.queued_samples._value.get() == 0


def test_a_full_buffer_drops_the_oldest_batches_and_counts_them(prom):
    pushes = Pushes(padding=100)
    writer, proxy, arrived, lost = push_through_outage(prom, "buffer-test", 4.5, pushes,
                                                       buffer_bytes=8 << 10)
    assert 3 * len(proxy.requests[0][1]) > 8 << 10, "a batch should be a large share of it"
    assert lost and lost == list(range(1, len(lost) + 1))       # the oldest ones, in a run
    assert counter(writer.dropped, reason="buffer_full") == len(lost) * (len(pushes.padding) + 1)
    assert counter(writer.dropped, reason="too_old") == 0


def test_batches_older_than_max_age_are_dropped_and_counted(prom):
    pushes = Pushes()
    writer, _, _, lost = push_through_outage(prom, "age-test", 5, pushes,
                                             max_age_ns=2 * SECOND)
    assert len(lost) >= 2 and lost == list(range(1, len(lost) + 1))
    assert counter(writer.dropped, reason="too_old") == len(lost)


def test_a_rejected_batch_is_dropped_and_counted_and_the_next_ones_arrive(prom):
    source, pushes = CollectorRegistry(), Pushes()
    source.register(pushes)
    proxy = Proxy(prom.write_url, lambda n: 400 if n == 2 else None)
    writer = writer_for(proxy.url, "reject-test", source)
    writer.start()
    try:
        wait_for(lambda: len(collections(prom, "reject-test")) >= 3, what="three pushes")
    finally:
        writer.stop()
        proxy.close()
    arrived = collections(prom, "reject-test")
    assert 2 not in arrived and arrived == [1, *range(3, pushes.count + 1)]
    assert counter(writer.failed, reason="rejected") == 1
    assert counter(writer.dropped, reason="rejected") == 1
    assert [status for *_, status in proxy.requests][:3] == [204, 400, 204]
