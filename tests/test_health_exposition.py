"""The health metrics over HTTP in both text formats: linted by promtool, parsed strictly as
OpenMetrics, and scraped by a real Prometheus that keeps the exemplars linking to connections."""
from __future__ import annotations

import time

import pytest
from prometheus_client import CollectorRegistry

from helpers.health import Prometheus, families, feed, promtool_check, samples, scrape, serve, uuid_of
from helpers.poller import drain_until, listening_poller
from lab.netns import cookie_of
from tcpinfo.collector.selfcheck import SelfCheckMetrics, self_report
from tcpinfo.health.aggregate import HISTOGRAMS, Aggregator
from tcpinfo.health.config import HealthConfig
from tcpinfo.remotewrite.writer import RemoteWriteConfig, RemoteWriter


@pytest.fixture
def closed_connection(testnet):
    """A registry with every health metric, after one real connection moved data and closed."""
    registry = CollectorRegistry()
    agg = Aggregator(HealthConfig(labels=("family", "cc")), registry, uuid_of)
    SelfCheckMetrics(self_report(), registry)
    RemoteWriter(RemoteWriteConfig("http://127.0.0.1:9/api/v1/write"), registry, registry)
    poller = listening_poller(testnet, testnet.ns_a)
    client, server, listener = testnet.connect()
    feed(poller, agg)
    client.sendall(b"m" * 100_000)
    received = 0
    while received < 100_000:
        received += len(server.recv(1 << 16))
    time.sleep(0.05)
    feed(poller, agg)
    cookie = cookie_of(client)
    client.close()
    server.close()
    listener.close()
    final = drain_until(poller, {cookie})[cookie]
    agg.observe_close(final.cookie, final.payload, final.timestamp_ns)
    url, http = serve(registry)
    yield url, cookie
    http.shutdown()


def test_plain_text_exposition_passes_promtool(closed_connection):
    url, _ = closed_connection
    content_type, text = scrape(url)
    assert content_type.startswith("text/plain; version=0.0.4")
    result = promtool_check(text)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    assert " # {" not in text            # exemplars exist only in OpenMetrics
    found = families(text)
    for name, _, _ in HISTOGRAMS:
        assert found[name].type == "histogram"
    assert samples(text, "tcpinfo_health_closed_connections_total", family="ipv4")[0].value == 1


def test_openmetrics_exposition_is_strictly_valid_and_carries_the_connections_uuid(
        closed_connection):
    url, cookie = closed_connection
    content_type, text = scrape(url, openmetrics=True)
    assert content_type.startswith("application/openmetrics-text")
    assert text.endswith("# EOF\n")
    parsed = families(text, openmetrics=True)      # the strict parser raises on any flaw
    assert parsed["tcpinfo_health_closed_connections"].type == "counter"
    for name in ("tcpinfo_health_closed_min_rtt_seconds", "tcpinfo_health_closed_acked_bytes",
                 "tcpinfo_health_closed_duration_seconds"):
        hit = [s for s in parsed[name].samples if s.exemplar is not None]
        assert len(hit) == 1, name
        assert hit[0].exemplar.labels == {"uuid": uuid_of(cookie)}


def test_prometheus_scrapes_openmetrics_and_stores_the_exemplars(closed_connection, tmp_path):
    url, cookie = closed_connection
    prom = Prometheus(tmp_path / "prom", "--enable-feature=exemplar-storage", scrape=url)
    try:
        deadline = time.monotonic() + 30
        while True:
            got = prom.query('tcpinfo_health_closed_connections_total{family="ipv4"}')
            exemplars = prom.api("/api/v1/query_exemplars",
                                 query="tcpinfo_health_closed_min_rtt_seconds_bucket",
                                 start=time.time() - 600, end=time.time() + 60)
            if got and exemplars:
                break
            assert time.monotonic() < deadline, "Prometheus never scraped the exposition"
            time.sleep(0.5)
        assert got[0][1] == "1"
        (series,) = exemplars
        assert [e["labels"] for e in series["exemplars"]] == [{"uuid": uuid_of(cookie)}]
    finally:
        prom.stop()


def test_uuids_too_long_for_an_exemplar_are_left_out_with_a_warning(testnet, caplog):
    registry = CollectorRegistry()
    long_uuid = "p" * 200 + "_{:016X}"
    agg = Aggregator(HealthConfig(), registry, long_uuid.format)
    assert "carry no exemplars" in caplog.text
    keep = testnet.connect()
    feed(listening_poller(testnet, testnet.ns_a), agg)
    url, http = serve(registry)
    try:
        _, text = scrape(url, openmetrics=True)
    finally:
        http.shutdown()
    assert samples(text, "tcpinfo_health_rtt_seconds_count", True, family="ipv4")[0].value == 1
    assert " # {" not in text
    del keep
