"""/metrics over real HTTP: upstream's series exactly, ours alongside, and a clean lint."""
from __future__ import annotations

import math
import os
import shutil
import socket
import subprocess
import urllib.request

import pytest
from prometheus_client import REGISTRY
from prometheus_client.parser import text_string_to_metric_families

from tcpinfo import metrics

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
}
# Vectors whose label values are open-ended appear once a value is used; the rest are
# created at import (see tcpinfo/metrics.py).
for _vector in (metrics.LARGE_NETLINK, metrics.NETLINK_SKIPPED, metrics.WRITE_ERRORS,
                metrics.DROPPED_BYTES, metrics.DROPPED_RECORDS):
    _vector.labels("test")
metrics.PORT_CONNECTIONS.labels(port="443")

HOST, PORT = metrics.start_http_server("127.0.0.1:0")


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
    metrics.set_git_commit("4f4e9e5")
    try:
        assert REGISTRY.get_sample_value("git_short_commit", {"commit": "4f4e9e5"}) == 0x4f4e9e5
        text = scrape()
        assert text.count("\ngit_short_commit{") == 1
    finally:
        metrics.set_git_commit("No commit specified")
    assert REGISTRY.get_sample_value("git_short_commit", {"commit": "No commit specified"}) == 0


def test_dump_error_counts_in_ours_and_upstreams_series():
    def value(name, **labels):
        return REGISTRY.get_sample_value(name, labels)

    ours = value("tcpinfo_dump_errors_total", af="ipv6", reason="wrong pid")
    upstream = value("tcpinfo_error_total", type="wrong pid")
    metrics.count_dump_error(socket.AF_INET6, "wrong pid")
    assert value("tcpinfo_dump_errors_total", af="ipv6", reason="wrong pid") == ours + 1
    assert value("tcpinfo_error_total", type="wrong pid") == upstream + 1

    interrupted = value("tcpinfo_dump_errors_total", af="ipv4", reason="interrupted")
    metrics.count_dump_error(socket.AF_INET, "interrupted")
    assert value("tcpinfo_dump_errors_total", af="ipv4", reason="interrupted") == interrupted + 1
    assert value("tcpinfo_error_total", type="interrupted") is None

    with pytest.raises(ValueError, match="unknown dump error reason"):
        metrics.count_dump_error(socket.AF_INET, "gremlins")


@pytest.mark.parametrize("address, url_host", [(":0", "127.0.0.1"), (":0", "[::1]"),
                                               ("[::1]:0", "[::1]"),
                                               ("localhost:0", "127.0.0.1")])
def test_go_listen_addresses_are_served(address, url_host):
    host, port = metrics.start_http_server(address)
    assert port > 0 and host == {":0": "::", "[::1]:0": "::1", "localhost:0": "127.0.0.1"}[address]
    assert "tcpinfo_snapshot_total" in scrape(f"http://{url_host}:{port}/metrics")


@pytest.mark.parametrize("address", ["9990", "", "::1:9990", "[::1:9990", "host:http",
                                     ":65536", "[not-v6]:9990"])
def test_bad_listen_address_is_a_value_error(address):
    with pytest.raises(ValueError, match="listen address|IPv6"):
        metrics.start_http_server(address)


def test_listen_failure_is_an_os_error_naming_the_address():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        address = f"127.0.0.1:{taken.getsockname()[1]}"
        with pytest.raises(OSError, match=f"cannot serve metrics on '{address}'"):
            metrics.start_http_server(address)


# promtool (Debian package `prometheus`) flags upstream's `_histogram` suffix; those names
# are kept for dashboards, so exactly these problems are expected and nothing else.
UPSTREAM_LINT = {f"{name} metric name should not include type 'histogram'"
                 for name, (kind, _, _) in UPSTREAM.items() if kind == "histogram"}


def test_exposition_passes_promtool_apart_from_upstreams_names():
    promtool = shutil.which("promtool")
    if promtool is None:
        if os.environ.get("CI") == "true":
            pytest.fail("promtool is missing in CI: apt-get install -y prometheus")
        pytest.skip("promtool not installed (Debian: apt-get install -y prometheus)")
    proc = subprocess.run([promtool, "check", "metrics"], input=scrape(),
                          capture_output=True, text=True, timeout=60)
    problems = {line.strip() for line in (proc.stdout + proc.stderr).splitlines()
                if line.strip()}
    assert problems == UPSTREAM_LINT
