"""The health aggregates against real connections: values the kernel reported, groups, the cap."""
from __future__ import annotations

import socket
import struct
import threading
import time

import pytest
from prometheus_client import CollectorRegistry

from helpers.health import feed, promtool_check, samples, scrape, serve, uuid_of
from helpers.poller import drain_until, listening_poller
from lab.netns import cookie_of
from tcpinfo.collector.poller import FINAL, SHORT
from tcpinfo.collector.sockfilter import Filter
from tcpinfo.health.aggregate import Aggregator
from tcpinfo.health.config import HealthConfig, Service
from tcpinfo.kernel.inetdiag import INET_DIAG_INFO, split_message
from tcpinfo.kernel.tcp import decode_tcp_info

NS = 1_000_000_000
TRANSFER = 400_000   # 1.6 s over the 2 Mbit/s tbf link


def tcp_info(sock: socket.socket) -> dict:
    """The kernel's view through getsockopt(TCP_INFO), decoded by the project's table."""
    return decode_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))


def info_of(payload: bytes) -> dict:
    return decode_tcp_info(split_message(payload)[1][INET_DIAG_INFO])


def ss_rtt_ms(topo, ns: str, port: int) -> float:
    """rtt of the connection with local port ``port`` as `ss -tin` prints it (ms)."""
    out = topo.exec(ns, "ss", "-tinH", "state", "established", f"sport = :{port}").stdout
    return float(out.split(" rtt:", 1)[1].split("/", 1)[0])


def one(text: str, name: str, openmetrics: bool = False, **labels: str) -> float:
    found = samples(text, name, openmetrics, **labels)
    assert len(found) == 1, (name, labels, found)
    return found[0].value


def bulk_transfer(topo, cc: str = "cubic"):
    """A cubic sender in b pushing TRANSFER bytes over b's shaped egress to a reader in a.

    Returns (client, server, listener, reader thread); cubic fills the small tbf queue, so the
    transfer has real drops and retransmits, and tens of ms of queueing delay."""
    listener = topo.listen()
    with topo.inside(topo.ns_a):
        client = socket.create_connection(listener.getsockname()[:2])
    server, _ = listener.accept()
    server.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, cc.encode())
    got = []

    def read() -> None:
        n = 0
        while n < TRANSFER:
            n += len(client.recv(1 << 16))
        got.append(n)

    reader = threading.Thread(target=read)
    reader.start()
    server.setblocking(False)
    return client, server, listener, reader, got


def test_shaped_transfer_histograms_and_gauges_hold_the_kernels_values(shaped_testnet):
    topo = shaped_testnet
    registry = CollectorRegistry()
    agg = Aggregator(HealthConfig(labels=("family", "cc"), sample_interval_ns=0), registry,
                     uuid_of)
    poller = listening_poller(topo, topo.ns_b)
    client, server, listener, reader, got = bulk_transfer(topo)
    cookie = cookie_of(server)
    data, sent, rtts, rttvars = b"z" * 65536, 0, [], []

    def poll() -> None:
        """The collector's poll; the test decodes what the aggregator was given its own way."""
        for change in feed(poller, agg):
            if change.cookie == cookie:
                info = info_of(change.payload)
                if info["rtt"]:
                    rtts.append(info["rtt"] / 1e6)
                    rttvars.append(info["rttvar"] / 1e6)

    started = time.monotonic()
    while sent < TRANSFER or reader.is_alive():
        if sent < TRANSFER:
            try:
                sent += server.send(data[:TRANSFER - sent])
            except BlockingIOError:
                pass
        poll()
        time.sleep(0.01)
        assert time.monotonic() - started < 30, "transfer did not finish"
    reader.join()
    assert got == [TRANSFER]
    time.sleep(0.3)                # the last ACKs are in: the connection is idle
    poll()
    url, http = serve(registry)
    try:
        _, text = scrape(url)
        group = {"family": "ipv4", "cc": "cubic"}
        kernel = tcp_info(server)
        assert kernel["total_retrans"] > 0, "the shaped link should have forced retransmits"
        # Open connections: the listener is not one; the idle connection's current RTT is the
        # kernel's, as getsockopt and ss see it.
        assert one(text, "tcpinfo_health_open_connections", **group) == 1
        assert kernel["rtt"] / 1e6 == one(text, "tcpinfo_health_open_rtt_min_seconds", **group) \
            == one(text, "tcpinfo_health_open_rtt_max_seconds", **group) \
            == one(text, "tcpinfo_health_open_rtt_mean_seconds", **group)
        port = server.getsockname()[1]
        assert ss_rtt_ms(topo, topo.ns_b, port) == pytest.approx(kernel["rtt"] / 1000, abs=1e-3)
        assert kernel["rtt"] > 10_000, "tens of ms of queueing delay on the shaped link"
        # Every changed snapshot with an RTT is one observation of rtt and of rttvar.
        assert one(text, "tcpinfo_health_rtt_seconds_count", **group) == len(rtts) > 10
        assert one(text, "tcpinfo_health_rtt_seconds_sum", **group) == pytest.approx(sum(rtts))
        assert one(text, "tcpinfo_health_rttvar_seconds_sum", **group) == \
            pytest.approx(sum(rttvars))
        for bucket in samples(text, "tcpinfo_health_rtt_seconds_bucket", **group):
            le = float(bucket.labels["le"])
            assert bucket.value == sum(1 for rtt in rtts if rtt <= le), le

        opened = time.monotonic()
        server.close()
        time.sleep(0.05)
        client.close()
        final = drain_until(poller, {cookie})[cookie]
        assert final.kind == FINAL
        agg.observe_close(final.cookie, final.payload, final.timestamp_ns)
        last = info_of(final.payload)
        _, text = scrape(url)
        assert one(text, "tcpinfo_health_open_connections", **group) == 0
        assert one(text, "tcpinfo_health_closed_connections_total", **group) == 1
        assert samples(text, "tcpinfo_health_open_rtt_mean_seconds", **group) == []
        expected = {
            "tcpinfo_health_closed_min_rtt_seconds": last["min_rtt"] / 1e6,
            "tcpinfo_health_closed_rtt_seconds": last["rtt"] / 1e6,
            "tcpinfo_health_closed_retransmitted_ratio": last["bytes_retrans"] / last["bytes_sent"],
            "tcpinfo_health_closed_delivery_rate_bytes_per_second": last["delivery_rate"],
            "tcpinfo_health_closed_acked_bytes": last["bytes_acked"],
            "tcpinfo_health_closed_received_bytes": last["bytes_received"],
        }
        for name, value in expected.items():
            assert one(text, f"{name}_count", **group) == 1
            assert one(text, f"{name}_sum", **group) == pytest.approx(value), name
        # ... and those final values are the ones the socket itself reported before closing.
        assert last["min_rtt"] <= kernel["min_rtt"] and last["bytes_retrans"] >= \
            kernel["bytes_retrans"] > 0
        assert TRANSFER <= last["bytes_acked"] <= TRANSFER + 1   # the FIN takes one sequence
        duration = one(text, "tcpinfo_health_closed_duration_seconds_sum", **group)
        assert opened - started - 0.5 < duration < time.monotonic() - started + 0.5
        # OpenMetrics: each bucket that was hit names this connection.
        _, om = scrape(url, openmetrics=True)
        hit = [s for s in samples(om, "tcpinfo_health_closed_min_rtt_seconds_bucket", True,
                                  **group) if s.exemplar is not None]
        assert len(hit) == 1 and hit[0].exemplar.labels == {"uuid": uuid_of(cookie)}
        assert hit[0].exemplar.value == last["min_rtt"] / 1e6
    finally:
        http.shutdown()
        listener.close()


def test_snapshots_are_sampled_at_most_once_per_interval_per_connection(shaped_testnet):
    """Through observe_changes, the batch form of observe_snapshot."""
    topo = shaped_testnet
    registry = CollectorRegistry()
    interval = NS // 2
    agg = Aggregator(HealthConfig(sample_interval_ns=interval), registry, uuid_of)
    poller = listening_poller(topo, topo.ns_b)
    client, server, listener, reader, _ = bulk_transfer(topo)
    cookie, sent, fed, last, expected = cookie_of(server), 0, 0, None, 0
    while reader.is_alive():
        if sent < TRANSFER:
            try:
                sent += server.send(b"s" * min(65536, TRANSFER - sent))
            except BlockingIOError:
                pass
        for change in feed(poller, agg, batch=True):
            if change.cookie == cookie:
                fed += 1
                if info_of(change.payload)["rtt"] and (
                        last is None or change.timestamp_ns - last >= interval):
                    expected += 1
                    last = change.timestamp_ns
        time.sleep(0.01)
    url, http = serve(registry)
    try:
        observed = one(scrape(url)[1], "tcpinfo_health_rtt_seconds_count", family="ipv4")
        assert observed == expected and fed > 5 * expected >= 10
    finally:
        http.shutdown()
        for s in (client, server, listener):
            s.close()


def test_labels_name_the_service_family_prefix_and_congestion_control(testnet):
    registry = CollectorRegistry()
    config = HealthConfig(labels=("family", "service", "port", "remote", "cc"),
                          services=(Service("web", 8000, 8099), Service("ssh", 22, 22)))
    agg = Aggregator(config, registry, uuid_of)
    poller = listening_poller(testnet, testnet.ns_a)     # the client side: remote ports
    v4 = testnet.connect(socket.AF_INET, port=8080)
    v6 = testnet.connect(socket.AF_INET6)
    with testnet.inside(testnet.ns_a):
        mapped = socket.socket(socket.AF_INET6)
        mapped.setsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, b"reno")
        mapped.connect((f"::ffff:{testnet.b4}", v4[2].getsockname()[1]))
    v4[2].accept()
    feed(poller, agg)
    url, http = serve(registry)
    try:
        text = scrape(url)[1]
        cc_of = {s: s.getsockopt(socket.IPPROTO_TCP, socket.TCP_CONGESTION, 16).rstrip(b"\0")
                 .decode() for s in (v4[0], v6[0], mapped)}
        want = [
            dict(family="ipv4", service="web", port=str(v4[0].getsockname()[1]),
                 remote="198.18.0.0/24", cc=cc_of[v4[0]]),
            dict(family="ipv6", service="unlisted", port=str(v6[0].getsockname()[1]),
                 remote="fd00:18::/48", cc=cc_of[v6[0]]),
            dict(family="ipv4", service="web", port=str(mapped.getsockname()[1]),
                 remote="198.18.0.0/24", cc="reno"),
        ]
        got = [s.labels for s in samples(text, "tcpinfo_health_open_connections")]
        assert sorted(sorted(d.items()) for d in got) == sorted(sorted(d.items()) for d in want)
    finally:
        http.shutdown()


def test_given_cidrs_replace_the_prefixes_and_unmatched_remotes_are_unlisted(testnet):
    registry = CollectorRegistry()
    agg = Aggregator(HealthConfig(labels=("remote",), remote_cidrs=("fd00::/8",)), registry,
                     uuid_of)
    poller = listening_poller(testnet, testnet.ns_a)
    keep = [testnet.connect(socket.AF_INET), testnet.connect(socket.AF_INET6)]
    feed(poller, agg)
    url, http = serve(registry)
    try:
        text = scrape(url)[1]
        assert one(text, "tcpinfo_health_open_connections", remote="fd00::/8") == 1
        assert one(text, "tcpinfo_health_open_connections", remote="unlisted") == 1
    finally:
        http.shutdown()
        del keep


CLIENT_PORT = 40000


def test_label_sets_are_capped_under_5000_distinct_peers_and_freed_after_their_ttl(testnet):
    """5,000 peers, each its own /32, against a cap of 100 label sets.

    The peers live in b itself, on a local route over lo (AnyIP), so 5,000 addresses need no
    neighbour entries; every client binds CLIENT_PORT, which the poller's filter excludes, so
    the poller sees the 5,000 server-side connections, whose remote addresses all differ."""
    peers, cap = 5000, 100
    registry = CollectorRegistry()
    config = HealthConfig(labels=("remote",), remote_prefix=(32, 128), max_groups=cap,
                          group_ttl_ns=NS)
    agg = Aggregator(config, registry, uuid_of)
    testnet.ip(testnet.ns_b, "route", "add", "local", "198.19.0.0/16", "dev", "lo")
    poller = listening_poller(testnet, testnet.ns_b, Filter(srcports={CLIENT_PORT}))
    pairs = []
    with testnet.inside(testnet.ns_b):
        listener = socket.create_server(("198.19.255.254", 0), backlog=4096)
        for i in range(1, peers + 1):
            client = socket.socket()
            client.bind((f"198.19.{i >> 8}.{i & 255}", CLIENT_PORT))
            client.connect(listener.getsockname())
            pairs.append((client, listener.accept()[0]))
    listener.close()
    url, http = serve(registry)
    try:
        feed(poller, agg)
        text = scrape(url)[1]
        opened = {s.labels["remote"]: s.value
                  for s in samples(text, "tcpinfo_health_open_connections")}
        assert len(opened) == cap + 1 and sum(opened.values()) == peers
        assert opened["other"] == peers - cap
        assert all(v == 1 and k.endswith("/32") for k, v in opened.items() if k != "other")
        assert one(text, "tcpinfo_health_overflow_connections_total") == peers - cap
        assert one(text, "tcpinfo_health_groups") == cap + 1
        assert len(samples(text, "tcpinfo_health_rtt_seconds_count")) == cap + 1
        assert promtool_lint_ok(text)

        cookies = {cookie_of(server) for _, server in pairs}
        for client, server in pairs:
            client.close()
            server.close()
        deadline, closed = time.monotonic() + 20, 0
        while closed < peers:
            assert time.monotonic() < deadline, f"{peers - closed} closes never came"
            for change in poller.drain().destroyed:
                assert change.cookie in cookies
                agg.observe_close(change.cookie, change.payload, change.timestamp_ns)
                closed += 1
            time.sleep(0.01)
        text = scrape(url)[1]
        assert sum(s.value for s in samples(text, "tcpinfo_health_open_connections")) == 0
        assert sum(s.value for s in samples(text, "tcpinfo_health_closed_connections_total")) \
            == peers
        assert agg.open_connections == 0
        agg.expire(time.time_ns() + NS)
        text = scrape(url)[1]
        assert samples(text, "tcpinfo_health_open_connections") == []
        assert one(text, "tcpinfo_health_groups") == 0
        assert one(text, "tcpinfo_health_evicted_groups_total") == cap + 1
    finally:
        http.shutdown()
        for client, server in pairs:
            client.close()
            server.close()


def promtool_lint_ok(text: str) -> bool:
    result = promtool_check(text)
    assert result.returncode == 0 and not result.stdout.strip(), result.stdout + result.stderr
    return True


def test_short_flow_unmatched_close_and_malformed_records_are_counted(testnet):
    registry = CollectorRegistry()
    agg = Aggregator(HealthConfig(), registry, uuid_of)
    poller = listening_poller(testnet, testnet.ns_a)
    feed(poller, agg)
    client, server, listener = testnet.connect()
    cookie = cookie_of(client)
    client.sendall(b"q" * 5000)
    server.recv(65536)
    server.close()
    client.close()
    listener.close()
    short = drain_until(poller, {cookie})[cookie]
    assert short.kind == SHORT
    agg.observe_close(short.cookie, short.payload, short.timestamp_ns)
    agg.observe_close(12345, None, time.time_ns())                  # never seen: nothing to use
    agg.observe_snapshot(777, short.payload[:40], time.time_ns())   # cut inside its header
    broken = bytearray(short.payload)
    struct.pack_into("<H", broken, 72, 2)                           # an rtattr shorter than 4
    agg.observe_snapshot(778, bytes(broken), time.time_ns())
    url, http = serve(registry)
    try:
        text = scrape(url)[1]
        final = info_of(short.payload)
        assert one(text, "tcpinfo_health_closed_connections_total", family="ipv4") == 1
        assert one(text, "tcpinfo_health_closed_min_rtt_seconds_sum", family="ipv4") == \
            final["min_rtt"] / 1e6
        assert one(text, "tcpinfo_health_closed_acked_bytes_sum", family="ipv4") == \
            final["bytes_acked"] >= 5000
        # a poll never saw it open, so its duration is unknown, not zero
        assert one(text, "tcpinfo_health_closed_duration_seconds_count", family="ipv4") == 0
        assert one(text, "tcpinfo_health_skipped_records_total", reason="unmatched_close") == 1
        assert one(text, "tcpinfo_health_skipped_records_total", reason="malformed") == 2
        assert one(text, "tcpinfo_health_open_connections", family="ipv4") == 0
        assert agg.open_connections == 0
    finally:
        http.shutdown()
