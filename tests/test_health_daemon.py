"""The health features in the real tcp-info: aggregates with exemplars over HTTP in both text
formats, why-slow counts at close, the connection query, the clock in the archives, the start-up
self-report, and remote write into a real Prometheus."""
from __future__ import annotations

import json
import signal
import socket
import subprocess
import threading
import urllib.error
import urllib.request

from helpers.daemon import PREFIX, archives, read_archive, uuid_of, wait_until
from helpers.health import Prometheus, promtool_check, samples
from helpers.paths import script
from tcpinfo.kernel.tcp import decode_tcp_info

METRICS = "127.0.0.1:9990"
TCP_CLOSE = 7


def get(topo, ns: str, path: str, accept: str = "") -> tuple[int, str, str]:
    """(status, content type, body) of GET http://127.0.0.1:9990<path> from inside `ns`."""
    request = urllib.request.Request(f"http://{METRICS}{path}", headers={"Accept": accept} if accept else {})
    with topo.inside(ns):
        try:
            with urllib.request.urlopen(request, timeout=10) as reply:
                return reply.status, reply.headers["Content-Type"], reply.read().decode()
        except urllib.error.HTTPError as err:
            return err.code, err.headers["Content-Type"], err.read().decode()


def bulk(server: socket.socket, client: socket.socket, size: int) -> threading.Thread:
    """The server side sends `size` bytes over the shaped link; the client reads them all."""
    def read() -> None:
        got = 0
        while got < size:
            got += len(client.recv(1 << 16))
    reader = threading.Thread(target=read)
    reader.start()
    server.sendall(b"x" * size)
    return reader


def test_aggregates_query_and_why_slow_follow_a_real_transfer_over_a_shaped_link(
        shaped_testnet, tmp_path, daemons):
    net, out = shaped_testnet, tmp_path / "out"
    daemon = daemons(net, net.ns_b, out, f"-prometheusx.listen-address={METRICS}",
                     "-health.sample-interval=0")
    daemon.wait_for("First poll done")
    client, server, _ = net.connect()
    uuid = uuid_of(server)
    reader = bulk(server, client, 400_000)            # ~1.6 s at 2 Mbit/s: queueing delay

    status, kind, body = get(net, net.ns_b, f"/v1/connections/{uuid}")
    assert (status, kind) == (200, "application/json"), body
    answer = json.loads(body)
    kernel = decode_tcp_info(server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))
    snap, derived = answer["snapshot"], answer["derived"]
    assert answer["uuid"] == uuid and answer["state"] == "open"
    assert snap["idm.sport"] == server.getsockname()[1] and snap["idm.dport"] == client.getsockname()[1]
    assert 0 < snap["tcp.bytes_acked"] <= kernel["bytes_acked"]
    assert derived["rtt_min_ms"] <= derived["rtt_mean_ms"] <= derived["rtt_max_ms"]
    assert derived["rtt_max_ms"] >= 5   # queueing on the 2 Mbit/s link, far above a veth's RTT

    reader.join(30)
    final_kernel = decode_tcp_info(server.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))
    client.close()
    server.close()
    wait_until(lambda: json.loads(get(net, net.ns_b, f"/v1/connections/{uuid}")[2])
               .get("state") == "closed", timeout=10)
    closed = json.loads(get(net, net.ns_b, f"/v1/connections/{uuid}")[2])
    assert closed["snapshot"]["idm.state"] == TCP_CLOSE             # the kernel's last word
    assert closed["snapshot"]["tcp.bytes_acked"] >= final_kernel["bytes_acked"]
    assert closed["derived"]["why_slow"] in ("network", "application", "receive_window",
                                             "send_buffer", "unknown")

    _, kind, text = get(net, net.ns_b, "/metrics")
    assert kind.startswith("text/plain; version=0.0.4")
    lint = promtool_check(text)
    problems = {line.strip() for line in (lint.stdout + lint.stderr).splitlines() if line.strip()}
    assert all("should not include type 'histogram'" in p and "_histogram" in p for p in problems), \
        problems   # upstream's names only (see test_metrics): the health series lint clean
    assert "# {" not in text                                          # no exemplars in 0.0.4
    closes = samples(text, "tcpinfo_health_closed_connections_total", family="ipv4")
    classes = samples(text, "tcpinfo_health_closed_why_slow_total", family="ipv4")
    assert closes and closes[0].value >= 1
    assert sum(s.value for s in classes) == closes[0].value          # every close has a class
    assert samples(text, "tcpinfo_health_closed_why_slow_total", family="ipv4",
                   **{"class": closed["derived"]["why_slow"]})[0].value >= 1

    _, kind, om = get(net, net.ns_b, "/metrics", accept="application/openmetrics-text; version=1.0.0")
    assert kind.startswith("application/openmetrics-text") and om.endswith("# EOF\n")
    buckets = samples(om, "tcpinfo_health_closed_acked_bytes_bucket", openmetrics=True,
                      family="ipv4")
    assert uuid in {b.exemplar.labels["uuid"] for b in buckets if b.exemplar is not None}

    assert daemon.stop() == 0, daemon.text()
    (path,) = archives(out)[uuid]
    header = read_archive(path)[0].metadata
    assert set(header["Clock"]) == {"Synchronised", "State", "MaxErrorMicroseconds",
                                    "EstErrorMicroseconds"}
    assert "Visible: sockets of other network namespaces" in daemon.text()
    assert "Clock " in daemon.text()


def test_the_query_refuses_malformed_paths_and_does_not_know_other_uuids(testnet, tmp_path, daemons):
    daemon = daemons(testnet, testnet.ns_b, tmp_path / "out", f"-prometheusx.listen-address={METRICS}")
    daemon.wait_for("First poll done")
    for path in ("/v1/connections/", "/v1/connections/a%ZZb", "/v1/connections/%ff%fe",
                 "/v1/connections/" + "a" * 300):
        status, kind, body = get(testnet, testnet.ns_b, path)
        assert (status, kind) == (400, "application/json"), (path, body)
    for uuid in (f"{PREFIX}_00000000DEADBEEF", "somebody-else_0000000000000001", f"{PREFIX}_xyz"):
        status, _, body = get(testnet, testnet.ns_b, f"/v1/connections/{uuid}")
        assert status == 404 and "error" in json.loads(body), body


def test_health_off_serves_no_health_series(testnet, tmp_path, daemons):
    daemon = daemons(testnet, testnet.ns_b, tmp_path / "out", f"-prometheusx.listen-address={METRICS}",
                     "-health=false")
    daemon.wait_for("First poll done")
    _, _, text = get(testnet, testnet.ns_b, "/metrics")
    assert "tcpinfo_health_" not in text and "tcpinfo_snapshot_total" in text


def test_remote_write_pushes_the_daemons_series_into_a_real_prometheus(tmp_path):
    """tcp-info in this namespace (where the test's Prometheus listens on loopback), pushing
    every second; after it stops, every series it pushed reads as stale."""
    prometheus = Prometheus(tmp_path / "prom")
    (tmp_path / "prefix").write_text(PREFIX)
    with open(tmp_path / "tcp-info.log", "wb") as log:
        daemon = subprocess.Popen(
            [script("tcp-info"), "-output", str(tmp_path / "out"), "-uuid-prefix-file",
             str(tmp_path / "prefix"), "-prometheusx.listen-address=", "-poll-interval=100ms",
             f"-remote-write.url={prometheus.write_url}", "-remote-write.interval=1s",
             "-remote-write.instance=probe"], stdout=subprocess.DEVNULL, stderr=log)
    try:
        wait_until(lambda: prometheus.query('tcpinfo_snapshot_total{instance="probe",job="tcp-info"}'),
                   timeout=30)
        assert prometheus.query('tcpinfo_health_groups{instance="probe"}')
        daemon.send_signal(signal.SIGTERM)
        assert daemon.wait(30) == 0, (tmp_path / "tcp-info.log").read_text()
        assert not prometheus.query('tcpinfo_snapshot_total{instance="probe"}')   # stale now
    finally:
        if daemon.poll() is None:
            daemon.kill()
        prometheus.stop()
