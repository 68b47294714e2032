"""Benchmark: what the health aggregates cost per record, and on the records/s path.

Per-call costs use lab.bench.saver's realistic payloads (an NDT server's attribute set, counters
moving): ``observe_snapshot`` of a connection already sampled in this interval (the common case:
one lookup; also through ``observe_changes``, one call per poll), of one due for a sample
(``-health.sample-interval 0`` makes every snapshot one), of a connection's first snapshot (its
group found), and ``observe_close``.  Then the cost of one ``collect`` (a scrape) and the memory per
open connection at 10,000 and 100,000 open connections, and the records/s path of lab.bench.saver
run alternately with and without the aggregates.  Run: ``python3 -m lab.bench.health`` from the
checkout.  Other work on the machine moves these numbers: the records/s comparison alternates the
two runs and reports medians and the spread.
"""
from __future__ import annotations

import argparse
import statistics
import time
import tracemalloc

from prometheus_client import CollectorRegistry

from lab.bench import saver as bench_saver
from tcpinfo.health.aggregate import Aggregator
from tcpinfo.health.config import HealthConfig, Service

NS = 1_000_000_000
POLL_NS = bench_saver.POLL_NS
LABELS = ("family", "service", "remote", "cc")
SERVICE = Service("ndt", 3001, 3010)


def _uuid(cookie: int) -> str:
    return f"bench-host_1700000000_unsafe_{cookie:016X}"


def _aggregator(interval_ns: int = NS, max_groups: int = 50) -> Aggregator:
    config = HealthConfig(labels=LABELS, services=(SERVICE,),
                          sample_interval_ns=interval_ns, max_groups=max_groups)
    return Aggregator(config, CollectorRegistry(), _uuid)


def _payloads(n: int) -> list[bytes]:
    return [bench_saver._payload(0x60000 + c, c % bench_saver.VARIANTS) for c in range(n)]


def per_call(n: int = 1000, rounds: int = 200) -> dict[str, float]:
    """µs per call of each aggregator entry point, over n connections."""
    payloads = _payloads(n)
    cookies = [0x60000 + c for c in range(n)]
    out = {}
    agg = _aggregator()
    ts = time.time_ns()
    start = time.perf_counter()
    for cookie, payload in zip(cookies, payloads):
        agg.observe_snapshot(cookie, payload, ts)
    out["observe_snapshot first snapshot (new connection)"] = (time.perf_counter() - start) / n
    start = time.perf_counter()
    for r in range(rounds):          # 10 ms polls within the 1 s sample interval: all skipped
        t = ts + (r % 50 + 1) * POLL_NS
        for cookie, payload in zip(cookies, payloads):
            agg.observe_snapshot(cookie, payload, t)
    out["observe_snapshot skipped (sampled this interval)"] = \
        (time.perf_counter() - start) / (n * rounds)
    changes = [[(payload, cookie, 10, 6, ts + (r % 50 + 1) * POLL_NS)
                for cookie, payload in zip(cookies, payloads)] for r in range(rounds)]
    start = time.perf_counter()
    for poll in changes:
        agg.observe_changes(poll)
    out["observe_changes per skipped snapshot (one call per poll)"] = \
        (time.perf_counter() - start) / (n * rounds)
    sampled = _aggregator(interval_ns=0)
    for cookie, payload in zip(cookies, payloads):
        sampled.observe_snapshot(cookie, payload, ts)
    start = time.perf_counter()
    for r in range(rounds // 4):
        t = ts + (r + 1) * POLL_NS
        for cookie, payload in zip(cookies, payloads):
            sampled.observe_snapshot(cookie, payload, t)
    out["observe_snapshot sampled (rtt, rttvar observed)"] = \
        (time.perf_counter() - start) / (n * (rounds // 4))
    start = time.perf_counter()
    for cookie, payload in zip(cookies, payloads):
        agg.observe_close(cookie, payload, ts + NS)
    out["observe_close (final histograms)"] = (time.perf_counter() - start) / n
    return {k: round(v * 1e6, 3) for k, v in out.items()}


def at_scale(n: int) -> dict[str, float]:
    """Memory per open connection and the time of one collect() with n open connections."""
    payloads = _payloads(bench_saver.CONNECTIONS)
    agg = _aggregator()
    ts = time.time_ns()
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    for c in range(n):
        agg.observe_snapshot(0x100000 + c, payloads[c % len(payloads)], ts)
    per_conn = (tracemalloc.get_traced_memory()[0] - before) / n
    tracemalloc.stop()
    times = []
    for _ in range(5):
        start = time.perf_counter()
        list(agg.collect())
        times.append(time.perf_counter() - start)
    return {"open": n, "bytes_per_open_connection": round(per_conn),
            "collect_ms": round(statistics.median(times) * 1e3, 1)}


def records_path(n_records: int, pairs: int) -> dict[str, object]:
    """bench_saver's records/s without and with observe_snapshot, alternated ``pairs`` times."""
    off, on = [], []
    for _ in range(pairs):
        off.append(bench_saver.run(n_records)["records_per_s"])
        on.append(bench_saver.run(n_records, observe=_aggregator().observe_snapshot)
                  ["records_per_s"])
    ratios = [b / a for a, b in zip(off, on)]
    return {"records_per_s_off": statistics.median(off), "records_per_s_on": statistics.median(on),
            "on_vs_off_median": round(statistics.median(ratios), 3),
            "on_vs_off_range": (round(min(ratios), 3), round(max(ratios), 3))}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records", type=int, default=200_000)
    parser.add_argument("--pairs", type=int, default=5)
    args = parser.parse_args()
    for name, us in per_call().items():
        print(f"{name}: {us} µs")
    for n in (10_000, 100_000):
        print(at_scale(n))
    print(records_path(args.records, args.pairs))


if __name__ == "__main__":
    main()
