"""Health settings: parsing and cross-checks refuse bad values with a reason; log-spaced buckets
with their underflow and overflow bins, filled by a real connection."""
from __future__ import annotations

import math

import pytest
from prometheus_client import CollectorRegistry

from helpers.health import feed, samples, scrape, serve, uuid_of
from helpers.poller import listening_poller
from tcpinfo.health import config
from tcpinfo.health.aggregate import Aggregator
from tcpinfo.health.buckets import MAX_BUCKETS, log_buckets
from tcpinfo.health.config import HealthConfig, Service
from tcpinfo.remotewrite import writer as remotewrite


def test_buckets_are_log_spaced_from_low_to_the_first_boundary_past_high():
    bounds = log_buckets(1e-5, 10.0, 3)
    assert bounds[0] == 1e-5 and bounds[-1] == 10.0 and len(bounds) == 19
    assert bounds[:4] == (1e-5, 2.15e-5, 4.64e-5, 1e-4)
    for a, b in zip(bounds, bounds[1:]):
        assert b / a == pytest.approx(10 ** (1 / 3), rel=0.01)
    assert log_buckets(1.0, 1000.0, 1) == (1.0, 10.0, 100.0, 1000.0)
    assert log_buckets(3.0, 40.0, 1) == (3.0, 30.0, 300.0)   # the last is the first >= high
    assert len(log_buckets(1.0, 10.0, 10)) == 11


@pytest.mark.parametrize("low, high, per_decade, message", [
    (0, 1, 3, "0 < low < high"), (2, 1, 3, "0 < low < high"), (1, math.inf, 3, "infinity"),
    (1, 10, 0, "want 1 to 10"), (1, 10, 11, "want 1 to 10"),
    (1e-30, 1e30, 3, f"at most {MAX_BUCKETS}"),
])
def test_unusable_bucket_settings_are_refused(low, high, per_decade, message):
    with pytest.raises(ValueError, match=message):
        log_buckets(low, high, per_decade)


def test_rtt_below_the_range_fills_the_underflow_bin_and_above_it_only_inf(testnet):
    """The veth link's RTT is tens of µs: under a 1-10 ms range it is all in the first bucket;
    under a 1-10 ns range it is above every finite boundary."""
    keep = [testnet.connect() for _ in range(3)]
    for rtt_range, where in (((1e-3, 1e-2), "underflow"), ((1e-9, 1e-8), "overflow")):
        registry = CollectorRegistry()
        agg = Aggregator(HealthConfig(ranges=(("rtt", *rtt_range),)), registry, uuid_of)
        feed(listening_poller(testnet, testnet.ns_a), agg)
        url, http = serve(registry)
        try:
            buckets = samples(scrape(url)[1], "tcpinfo_health_rtt_seconds_bucket", family="ipv4")
        finally:
            http.shutdown()
        counts = [b.value for b in buckets]
        assert buckets[0].labels["le"] == str(rtt_range[0]) and buckets[-1].labels["le"] == "+Inf"
        if where == "underflow":
            assert counts == [3.0] * len(counts)
        else:
            assert counts == [0.0] * (len(counts) - 1) + [3.0]
    del keep


@pytest.mark.parametrize("parse, text, message", [
    (config.parse_label, "peer", "unknown health label 'peer'"),
    (config.parse_service, "https", "bad service 'https'"),
    (config.parse_service, "other=443", "bad service"),
    (config.parse_service, "web=80-70", "port range '80-70' is empty"),
    (config.parse_service, "web=70000", "cannot convert port range '70000'"),
    (config.parse_service, "a b=1", "bad service"),
    (config.parse_remote_prefix, "24", "bad remote prefix"),
    (config.parse_remote_prefix, "33,48", "bad remote prefix"),
    (config.parse_remote_prefix, "24,129", "bad remote prefix"),
    (config.parse_remote_cidr, "10.0.0.0/33", "cannot convert network"),
    (config.parse_max_groups, "0", "must be at least 1"),
    (config.parse_max_groups, "1e3", "must be a whole number between 1 and 10000"),
    (config.parse_per_decade, "11", "between 1 and 10"),
    (config.parse_bucket_range, "jitter=1:2", "bad bucket range"),
    (config.parse_bucket_range, "rtt=1", "bad bucket range"),
    (config.parse_bucket_range, "rtt=a:2", "must be numbers"),
    (config.parse_bucket_range, "rtt=2:1", "0 < low < high"),
    (remotewrite.parse_url, "prometheus:9090", "bad remote-write URL"),
    (remotewrite.parse_label_value, "", "bad label value"),
])
def test_each_bad_flag_value_is_refused_with_its_reason(parse, text, message):
    with pytest.raises(ValueError, match=message):
        parse(text)


def test_flag_values_parse_to_what_the_aggregator_takes():
    assert config.parse_service("web=8000-8099") == Service("web", 8000, 8099)
    assert config.parse_service("ssh=22") == Service("ssh", 22, 22)
    assert config.parse_remote_prefix("/24,/56") == (24, 56)
    assert config.parse_remote_cidr("10.1.2.3/8") == "10.0.0.0/8"
    assert config.parse_bucket_range("rate=1e4:1e9") == ("rate", 1e4, 1e9)
    assert HealthConfig(per_decade=2, ranges=(("rtt", 1e-4, 1.0), ("rtt", 1e-3, 1.0))) \
        .buckets("rtt") == (1e-3, 3.16e-3, 1e-2, 3.16e-2, 0.1, 0.316, 1.0)


@pytest.mark.parametrize("settings, message", [
    ({"labels": ("family", "family")}, "named twice"),
    ({"labels": ("service",)}, "no -health.service"),
    ({"services": (Service("web", 80, 80),)}, "has no service"),
    ({"labels": ("service",), "services": (Service("a", 1, 1), Service("a", 2, 2))},
     "given twice"),
    ({"remote_cidrs": ("10.0.0.0/8",)}, "has no remote"),
    ({"max_groups": 0}, "max-groups"),
    ({"group_ttl_ns": 10}, "group-ttl"),
    ({"sample_interval_ns": -1}, "sample-interval"),
    ({"per_decade": 10, "ranges": (("bytes", 1.0, 1e12),)}, "at most 100"),
])
def test_settings_that_contradict_each_other_are_refused(settings, message):
    with pytest.raises(ValueError, match=message):
        HealthConfig(**settings)
