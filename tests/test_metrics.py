"""/metrics over real HTTP: upstream's series exactly, ours alongside, a clean lint, a real
Prometheus scraping it, and the server's limits against real slow and misbehaving clients."""
from __future__ import annotations

import gzip
import http.client
import json
import math
import os
import re
import select
import socket
import subprocess
import time
import urllib.parse
import urllib.request

import pytest
from prometheus_client import CollectorRegistry, Counter
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_openmetrics
from prometheus_client.parser import text_string_to_metric_families

from helpers.paths import tool
from tcpinfo.collector.metrics import Metrics, daemon_registry
from tcpinfo.servers import httpserver

_SYSCALL = [0.001, 0.00125, 0.0016, 0.002, 0.0025, 0.0032, 0.004, 0.005, 0.0063, 0.0079,
            0.01, 0.0125, 0.016, 0.02, 0.025, 0.032, 0.04, 0.05, 0.063, 0.079,
            0.1, 0.125, 0.16, 0.2]
_POLLING = [i * 0.001 for i in range(30)]
_COUNT = [1, 2, 3, 4, 5, 6, 8, 10, 12.5, 16, 20, 25, 32, 40, 50, 63, 79, 100, 125, 160, 200,
          250, 320, 400, 500, 630, 790, 1000, 1250, 1600, 2000, 2500, 3200, 4000, 5000, 6300,
          7900, 10000, 12500, 16000, 20000, 25000, 32000, 40000, 50000, 63000, 79000, 10000000]
_RATE = [0, 1, 10, 100, 1000, 1580, 2510, 3980, 6310, 1e4, 15800, 25100, 39800, 63100, 1e5,
         158000, 251000, 398000, 631000, 1e6, 1.58e6, 2.51e6, 3.98e6, 6.31e6, 1e7, 1.58e7,
         2.51e7, 3.98e7, 6.31e7, 1e8, 1.58e8, 2.51e8, 3.98e8, 6.31e8, 1e9, 1.26e9, 1.58e9, 2e9,
         2.51e9, 3.16e9, 3.98e9, 5.01e9, 6.31e9, 7.94e9, 1e10]

# UPSTREAM.md section 9: exposed name -> (type, label names, finite bucket bounds or None).
UPSTREAM = {
    "tcpinfo_syscall_time_histogram": ("histogram", {"af"}, _SYSCALL),
    "tcpinfo_polling_interval_histogram": ("histogram", set(), _POLLING),
    "tcpinfo_connection_count_histogram": ("histogram", {"af"}, _COUNT),
    "tcpinfo_cache_count_histogram": ("histogram", set(), _COUNT),
    "tcpinfo_error_total": ("counter", {"type"}, None),
    "tcpinfo_new_file_total": ("counter", set(), None),
    "tcpinfo_send_rate_histogram": ("histogram", set(), _RATE),
    "tcpinfo_receive_rate_histogram": ("histogram", set(), _RATE),
    "tcpinfo_snapshot_total": ("counter", set(), None),
    "large_netlink_total": ("counter", {"type"}, None),
    "netlink_skipped_total": ("counter", {"type"}, None),
    "tcpinfo_flow_events_total": ("counter", {"event"}, None),
    "git_short_commit": ("gauge", {"commit"}, None),
}
OURS = {
    "tcpinfo_cache_total": ("counter", {"op"}, None),
    "tcpinfo_poll_interval_achieved_seconds": ("gauge", set(), None),
    "tcpinfo_dump_errors_total": ("counter", {"af", "reason"}, None),
    "tcpinfo_write_errors_total": ("counter", {"cause"}, None),
    "tcpinfo_dropped_bytes_total": ("counter", {"reason"}, None),
    "tcpinfo_dropped_records_total": ("counter", {"reason"}, None),
    "tcpinfo_open_connections": ("gauge", set(), None),
    "tcpinfo_buffered_bytes": ("gauge", set(), None),
    "tcpinfo_event_clients": ("gauge", set(), None),
    "tcpinfo_event_drops_total": ("counter", set(), None),
    "tcpinfo_event_disconnects_total": ("counter", set(), None),
    "tcpinfo_build_info": ("gauge", {"version", "python", "kernel"}, None),
    "tcpinfo_port_connections": ("gauge", {"port"}, None),
    "tcpinfo_event_refused_total": ("counter", set(), None),
    "tcpinfo_event_accept_errors_total": ("counter", {"error"}, None),
    "tcpinfo_http_connections": ("gauge", set(), None),
    "tcpinfo_http_requests_total": ("counter", {"code"}, None),
    "tcpinfo_http_dropped_total": ("counter", {"reason"}, None),
    "tcpinfo_http_accept_errors_total": ("counter", {"error"}, None),
}
METRICS = Metrics(daemon_registry())
"""The daemon's series on the daemon's registry, as tcp-info builds them at start."""
REGISTRY = METRICS.registry
# Vectors whose label values are open-ended appear once a value is used; the rest are
# created with the Metrics (see tcpinfo/collector/metrics.py).
for _vector in (METRICS.large_netlink, METRICS.netlink_skipped, METRICS.write_errors,
                METRICS.dropped_bytes, METRICS.dropped_records):
    _vector.labels("test")
METRICS.port_connections.labels(port="443")


def start_http_server(address: str) -> tuple[str, int]:
    """/metrics of METRICS served as the daemon serves it; the bound host and port."""
    return httpserver.serve(address, REGISTRY, METRICS.http).address


_, PORT = start_http_server("127.0.0.1:0")


def scrape(url: str = f"http://127.0.0.1:{PORT}/metrics") -> str:
    with urllib.request.urlopen(url, timeout=10) as response:
        assert response.status == 200
        return response.read().decode()


def families() -> dict:
    """Exposed name -> family; the parser drops a counter's `_total`, so it is put back."""
    return {(f.name + "_total" if f.type == "counter" else f.name): f
            for f in text_string_to_metric_families(scrape())}


@pytest.mark.parametrize("name", sorted(UPSTREAM.keys() | OURS.keys()))
def test_metric_is_served_with_its_type_labels_and_buckets(name):
    kind, labels, buckets = {**UPSTREAM, **OURS}[name]
    family = families()[name]
    assert family.type == kind
    assert family.documentation
    for sample in family.samples:
        assert set(sample.labels) - {"le"} == labels, sample
    if buckets is not None:
        bounds = sorted({float(s.labels["le"]) for s in family.samples if "le" in s.labels})
        assert bounds[-1] == math.inf
        assert len(bounds[:-1]) == len(buckets)
        assert all(math.isclose(a, b, abs_tol=1e-12) for a, b in zip(bounds, buckets))


def test_upstream_help_strings_are_kept():
    served = families()
    assert served["tcpinfo_syscall_time_histogram"].documentation == \
        "netlink syscall latency distribution (seconds)"
    assert served["tcpinfo_error_total"].documentation == "The total number of errors encountered."


def test_polling_buckets_are_labelled_as_go_accumulates_them():
    """Go's LinearBuckets adds the width repeatedly; its `le` labels show the rounding."""
    text = scrape()
    assert 'tcpinfo_polling_interval_histogram_bucket{le="0.010000000000000002"}' in text
    assert 'tcpinfo_polling_interval_histogram_bucket{le="0.02900000000000002"}' in text


def test_known_label_values_exist_before_anything_happens():
    text = scrape()
    for series in ('tcpinfo_flow_events_total{event="close"}',
                   'tcpinfo_cache_total{op="expired"}',
                   'tcpinfo_dump_errors_total{af="ipv6",reason="interrupted"}',
                   'tcpinfo_error_total{type="NLMSG_ERROR"}',
                   'tcpinfo_syscall_time_histogram_count{af="ipv4"}'):
        assert series in text


def test_build_info_names_this_build():
    value = REGISTRY.get_sample_value("tcpinfo_build_info", {
        "version": __import__("tcpinfo").__version__,
        "python": __import__("platform").python_version(),
        "kernel": os.uname().release})
    assert value == 1


def test_git_short_commit_is_the_hash_as_a_number_in_one_series():
    METRICS.set_git_commit("4f4e9e5")
    try:
        assert REGISTRY.get_sample_value("git_short_commit", {"commit": "4f4e9e5"}) == 0x4f4e9e5
        text = scrape()
        assert text.count("\ngit_short_commit{") == 1
    finally:
        METRICS.set_git_commit("No commit specified")
    assert REGISTRY.get_sample_value("git_short_commit", {"commit": "No commit specified"}) == 0


def test_dump_error_counts_in_ours_and_upstreams_series():
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels)

    ours = value("tcpinfo_dump_errors_total", af="ipv6", reason="wrong pid")
    upstream = value("tcpinfo_error_total", type="wrong pid")
    METRICS.count_dump_error(socket.AF_INET6, "wrong pid")
    assert value("tcpinfo_dump_errors_total", af="ipv6", reason="wrong pid") == ours + 1
    assert value("tcpinfo_error_total", type="wrong pid") == upstream + 1

    interrupted = value("tcpinfo_dump_errors_total", af="ipv4", reason="interrupted")
    METRICS.count_dump_error(socket.AF_INET, "interrupted")
    assert value("tcpinfo_dump_errors_total", af="ipv4", reason="interrupted") == interrupted + 1
    assert value("tcpinfo_error_total", type="interrupted") is None

    with pytest.raises(ValueError, match="unknown dump error reason"):
        METRICS.count_dump_error(socket.AF_INET, "gremlins")


@pytest.mark.parametrize("address, bound, url_host", [(":0", "::", "127.0.0.1"),
                                                      (":0", "::", "[::1]"),
                                                      ("[::1]:0", "::1", "[::1]"),
                                                      ("localhost:0", "127.0.0.1", "127.0.0.1")])
def test_go_listen_addresses_are_served_and_the_bound_address_returned(address, bound, url_host):
    host, port = start_http_server(address)
    assert host == bound and port > 0
    assert "tcpinfo_snapshot_total" in scrape(f"http://{url_host}:{port}/metrics")


@pytest.mark.parametrize("address", ["9990", "", "::1:9990", "[::1:9990", "host:http",
                                     ":65536", "[not-v6]:9990"])
def test_bad_listen_address_is_a_value_error(address):
    with pytest.raises(ValueError, match="listen address|IPv6"):
        start_http_server(address)


def test_listen_failure_is_an_os_error_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot serve metrics on '{address}'"):
            start_http_server(address)


def test_the_daemon_logs_the_address_it_serves_and_answers_there_on_ipv4_and_ipv6(testnet,
                                                                                  tmp_path, daemons):
    # ":0" is the default ":9990" with a free port: every interface, one dual-stack socket.
    daemon = daemons(testnet, testnet.ns_b, tmp_path / "out", "-prometheusx.listen-address=:0")
    daemon.wait_for("/metrics (every interface, IPv4 and IPv6)")
    match = re.search(r"Serving metrics on http://\[::\]:(\d+)/metrics \(every interface, "
                      r"IPv4 and IPv6\)\n", daemon.text())
    assert match, daemon.text()
    with testnet.inside(testnet.ns_b):
        for host in ("127.0.0.1", "[::1]"):
            assert "tcpinfo_snapshot_total" in scrape(f"http://{host}:{match[1]}/metrics")
    assert daemon.stop() == 0, daemon.text()


# promtool (Debian package `prometheus`) flags upstream's `_histogram` suffix; those names
# are kept for dashboards, so exactly these problems are expected and nothing else.
UPSTREAM_LINT = {f"{name} metric name should not include type 'histogram'"
                 for name, (kind, _, _) in UPSTREAM.items() if kind == "histogram"}


def test_exposition_passes_promtool_apart_from_upstreams_names():
    promtool = tool("promtool")
    proc = subprocess.run([promtool, "check", "metrics"], input=scrape(),
                          capture_output=True, text=True, timeout=60)
    problems = {line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip()}
    assert problems == UPSTREAM_LINT


def test_a_real_prometheus_scrapes_the_server(tmp_path):
    prometheus = tool("prometheus")
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        web = f"127.0.0.1:{probe.getsockname()[1]}"
    config = tmp_path / "prometheus.yml"
    config.write_text("global: {scrape_interval: 1s, scrape_timeout: 1s}\n"
                      "scrape_configs:\n"
                      f"  - {{job_name: tcpinfo, static_configs: [{{targets: ['127.0.0.1:{PORT}']}}]}}\n")
    with open(tmp_path / "prometheus.log", "wb") as out:
        server = subprocess.Popen([prometheus, f"--config.file={config}",
                                   f"--storage.tsdb.path={tmp_path / 'data'}",
                                   f"--web.listen-address={web}"], stdout=out, stderr=out)
    try:
        def query(expr: str) -> list:
            url = f"http://{web}/api/v1/query?query={urllib.parse.quote(expr)}"
            with urllib.request.urlopen(url, timeout=5) as reply:
                return json.load(reply)["data"]["result"]

        deadline = time.monotonic() + 60
        while True:
            try:
                scraped = query('scrape_samples_scraped{job="tcpinfo"}')
                if scraped and query('tcpinfo_build_info{job="tcpinfo"}'):
                    break
            except OSError:
                pass   # still starting
            assert time.monotonic() < deadline, (tmp_path / "prometheus.log").read_text()
            time.sleep(0.5)
        assert query('up{job="tcpinfo"}')[0]["value"][1] == "1"
        assert float(scraped[0]["value"][1]) > 100
    finally:
        server.terminate()
        server.wait(30)


def request(method: str, path: str, headers: dict | None = None,
            port: int = PORT) -> tuple[http.client.HTTPResponse, bytes]:
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request(method, path, headers=headers or {})
        response = conn.getresponse()
        return response, response.read()
    finally:
        conn.close()


def sample(name: str, **labels: str) -> float:
    return REGISTRY.get_sample_value(name, labels) or 0.0


def wait_for(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.01)


@pytest.mark.parametrize("path", ["/", "/metric", "/metrics/", "/metricsx", "/debug/pprof/"])
def test_any_other_path_is_404(path):
    before = sample("tcpinfo_http_requests_total", code="404")
    response, body = request("GET", path)
    assert (response.status, body) == (404, b"404 page not found\n")
    assert sample("tcpinfo_http_requests_total", code="404") == before + 1


@pytest.mark.parametrize("method", ["POST", "PUT", "DELETE", "OPTIONS"])
def test_any_other_method_is_405_naming_get_and_head(method):
    response, _ = request(method, "/metrics")
    assert response.status == 405 and response.getheader("Allow") == "GET, HEAD"


def test_head_gets_the_headers_of_the_exposition_and_no_body():
    response, body = request("HEAD", "/metrics")
    assert response.status == 200 and body == b""
    assert response.getheader("Content-Type") == "text/plain; version=0.0.4; charset=utf-8"
    assert int(response.getheader("Content-Length")) > 10_000


def test_each_response_is_whole_and_ends_its_connection():
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as s:
        s.sendall(b"GET /metrics?name[]=ignored HTTP/1.1\r\nHost: x\r\n\r\n")
        reply = b""
        while chunk := s.recv(65536):   # ends at the server's FIN
            reply += chunk
    head, _, body = reply.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 200 OK\r\n") and b"\r\nConnection: close" in head
    assert f"Content-Length: {len(body)}".encode() in head
    assert b"tcpinfo_snapshot_total" in body


@pytest.mark.parametrize("accept, zipped", [
    ("gzip", True), ("deflate, gzip;q=0.5", True), ("*", True), ("GZIP", True),
    ("gzip;q=0", False), ("identity", False), ("*;q=0", False), ("gzip;q=0, *", False), ("", False),
])
def test_gzip_is_sent_exactly_when_the_client_accepts_it(accept, zipped):
    response, body = request("GET", "/metrics", {"Accept-Encoding": accept})
    assert response.getheader("Vary") == "Accept-Encoding, Accept"
    assert (response.getheader("Content-Encoding") == "gzip") == zipped
    assert int(response.getheader("Content-Length")) == len(body)
    text = (gzip.decompress(body) if zipped else body).decode()
    assert "tcpinfo_snapshot_total" in {f.name + "_total" for f in
                                         text_string_to_metric_families(text)}


@pytest.mark.parametrize("accept, openmetrics", [
    ("application/openmetrics-text; version=1.0.0", True),
    ("application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5,*/*;q=0.1", True),
    ("text/plain;version=0.0.4", False), ("*/*", False), ("", False),
])
def test_openmetrics_is_served_exactly_to_a_scraper_that_asks_for_it(accept, openmetrics):
    response, body = request("GET", "/metrics", {"Accept": accept} if accept else {})
    kind, text = response.getheader("Content-Type"), body.decode()
    if openmetrics:
        assert kind.startswith("application/openmetrics-text") and text.endswith("# EOF\n")
        names = {f.name for f in parse_openmetrics(text)}
        assert {"tcpinfo_snapshot", "tcpinfo_syscall_time_histogram"} <= names
    else:
        assert kind == "text/plain; version=0.0.4; charset=utf-8" and "# EOF" not in text


@pytest.mark.parametrize("raw, status", [
    (b"GARBAGE\r\n\r\n", 400),
    (b"GET /metrics HTTP/2.0\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nno colon\r\n\r\n", 400),
    (b"GET /metrics HTTP/1.1\r\nX-Padding: " + b"a" * 9000 + b"\r\n\r\n", 431),
])
def test_a_malformed_or_oversize_request_gets_400_or_431(raw, status):
    with socket.create_connection(("127.0.0.1", PORT), timeout=10) as s:
        s.sendall(raw)
        reply = b""
        while chunk := s.recv(65536):
            reply += chunk
    assert reply.startswith(f"HTTP/1.1 {status} ".encode())


@pytest.fixture
def servers():
    """Private HTTPServers on 127.0.0.1 (counting in the daemon's series), closed at the end."""
    started: list[httpserver.HTTPServer] = []

    def start(registry=REGISTRY, **kw) -> httpserver.HTTPServer:
        server = httpserver.HTTPServer("127.0.0.1", 0, registry, METRICS.http, **kw)
        server.start()
        started.append(server)
        return server

    yield start
    for server in started:
        server.close()


def test_the_registry_given_is_the_one_served(servers):
    registry = CollectorRegistry()
    Counter("only_series", "The one series of this registry.", registry=registry).inc(3)
    server = servers(registry)
    _, body = request("GET", "/metrics", port=server.address[1])
    (family,) = text_string_to_metric_families(body.decode())
    assert (family.name, family.samples[0].value) == ("only_series", 3)


def test_a_silent_and_a_trickling_client_are_dropped_after_the_timeout(servers):
    server = servers(timeout=0.5)
    dropped = sample("tcpinfo_http_dropped_total", reason="timeout")
    silent = socket.create_connection(server.address)
    trickler = socket.create_connection(server.address)
    started = time.monotonic()
    closed_at = None
    for byte in b"GET /metrics HTTP/1.1\r\nHost: trickle\r\nX-Slow: " + b"s" * 100:
        if select.select([trickler], [], [], 0.05)[0]:   # readable: the server hung up
            closed_at = time.monotonic() - started
            break
        trickler.send(bytes([byte]))
    silent.settimeout(3)
    assert silent.recv(1) == b""
    assert closed_at is not None and 0.4 < closed_at < 1.5
    assert trickler.recv(1) == b""
    assert sample("tcpinfo_http_dropped_total", reason="timeout") == dropped + 2
    silent.close()
    trickler.close()


def test_beyond_the_cap_the_oldest_unfinished_request_makes_room_for_a_scrape(servers, caplog):
    server = servers(max_connections=4)
    evicted = sample("tcpinfo_http_dropped_total", reason="evicted")
    silent = [socket.create_connection(server.address) for _ in range(10)]
    response, body = request("GET", "/metrics", port=server.address[1])

    assert response.status == 200 and b"tcpinfo_http_dropped_total" in body
    wait_for(lambda: sample("tcpinfo_http_dropped_total", reason="evicted") == evicted + 7)
    for oldest in silent[:6]:
        oldest.settimeout(3)
        assert oldest.recv(1) == b""
    wait_for(lambda: "closed the oldest one still sending its request" in caplog.text)
    assert caplog.text.count("closed the oldest one still sending its request") == 1
    for s in silent:
        s.close()


class _Huge:
    """A collector whose exposition (about 8 MB) cannot fit in a client's socket buffers."""

    def collect(self):
        yield GaugeMetricFamily("huge", "x" * 8_000_000, value=1)


def test_when_every_slot_is_answering_a_new_connection_is_closed_and_counted(servers, caplog):
    registry = CollectorRegistry()
    registry.register(_Huge())
    server = servers(registry, max_connections=2)
    answered = sample("tcpinfo_http_requests_total", code="200")
    limit = sample("tcpinfo_http_dropped_total", reason="limit")
    stalled = []
    for _ in range(2):   # they ask for the exposition and never read it
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(server.address)
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        stalled.append(s)
    wait_for(lambda: sample("tcpinfo_http_requests_total", code="200") == answered + 2)
    late = socket.create_connection(server.address)
    late.settimeout(3)

    assert late.recv(1) == b""
    assert sample("tcpinfo_http_dropped_total", reason="limit") == limit + 1
    wait_for(lambda: "all 2 are being answered" in caplog.text)   # logged after the close
    for s in (*stalled, late):
        s.close()


@pytest.mark.parametrize("flag", ["-prometheusx.max-connections=0",
                                  "-tcpinfo.eventsocket-max-clients=-1"])
def test_a_cap_below_one_exits_2_naming_the_flag(testnet, flag):
    proc = testnet.exec(testnet.ns_a, "tcp-info", flag, timeout=30)
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr
    assert flag.split("=")[0] in proc.stderr and "must be at least 1" in proc.stderr


class _Counting:
    """A collector that counts how often an exposition was generated."""

    def __init__(self) -> None:
        self.calls = 0

    def collect(self):
        self.calls += 1
        yield GaugeMetricFamily("generation", "Expositions generated so far.", value=self.calls)


def test_requests_that_wait_together_share_one_exposition(servers):
    registry, counting = CollectorRegistry(), _Counting()
    registry.register(counting)
    server = servers(registry)
    clients = [socket.create_connection(server.address, timeout=10) for _ in range(20)]
    for s in clients:
        s.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
    replies = []
    for s in clients:
        replies.append(s.makefile("rb").read())
        s.close()

    assert all(reply.startswith(b"HTTP/1.1 200 OK\r\n") for reply in replies)
    assert counting.calls < 20
    assert len({reply.partition(b"\r\n\r\n")[2] for reply in replies}) == counting.calls
