"""Parallel dumps: several threads, each a share of the ports, report what one thread reports."""
from __future__ import annotations

import os
import socket
import subprocess
import time
from pathlib import Path

import pytest

from helpers.daemon import metric, scrape, wait_until
from lab.bench import poll as bench
from lab.netns import cookie_of
from tcpinfo.collector import shares
from tcpinfo.collector.poller import Poller
from tcpinfo.collector.sockfilter import Filter, compile_filter
from tcpinfo.core.binding import ffi, lib


def poller_in(topo, threads: int, sockets: Filter | None = None) -> Poller:
    with topo.inside(topo.ns_b):
        poller = Poller(sockets)
        assert poller.set_threads(threads) is None
    return poller


def reported(result) -> set[int]:
    return {change.cookie for change in result.changes}


def test_two_and_three_threads_report_exactly_what_one_thread_reports(testnet):
    pairs = testnet.open_many(1500) + testnet.open_many(300, socket.AF_INET6)
    pollers = [poller_in(testnet, n) for n in (1, 2, 3)]
    before = time.time_ns()
    results = [p.poll() for p in pollers]
    first = [reported(r) for r in results]
    assert first[0] == first[1] == first[2] == {cookie_of(server) for _, server in pairs}
    for result in results:   # every record carries the end of the dump it came in
        ends = {result.inet.end_ns, result.inet6.end_ns}
        assert all(before < c.timestamp_ns <= max(ends) for c in result.changes)
    for poller in pollers:
        poller._rebalance_at = 0       # move the shares to where the connections are
        for _ in range(3):
            idle = poller.poll()
            assert idle.changes == [] and idle.vanished == [], poller.threads
            assert idle.inet.messages + idle.inet6.messages >= 1800
    closing = pairs[::9]
    gone = {cookie_of(server) for _, server in closing}
    for client, server in closing:
        client.close()
        server.close()
    for poller in pollers:
        assert {v.cookie for v in poller.poll().vanished} == gone
        poller.close()


def test_threads_with_a_kernel_filter_keep_what_the_userspace_filter_keeps(testnet):
    listener = testnet.listen()
    port = listener.getsockname()[1]
    kept = [testnet.connect(listener=listener)[1] for _ in range(50)]
    _others = testnet.open_many(400)
    sockets = Filter(include_ports=[(port, port)])
    threaded = poller_in(testnet, 2, sockets)
    assert threaded.filter_in_kernel(sockets) is None
    assert reported(threaded.poll()) == {cookie_of(s) for s in kept}
    threaded._rebalance_at = 0
    assert threaded.poll().changes == []


def _spread(servers) -> shares.Spread:
    local, remote = [0] * 256, [0] * 256
    for server in servers:
        local[server.getsockname()[1] >> 8] += 1
        remote[server.getpeername()[1] >> 8] += 1
    return shares.Spread(tuple(local), tuple(remote))


@pytest.mark.parametrize("v4,v6", [(600, 60), (200, 400)])
def test_plans_partition_every_family_whatever_the_shares_and_the_spread(testnet, v4, v6):
    pairs = {socket.AF_INET: testnet.open_many(v4), socket.AF_INET6: testnet.open_many(v6, socket.AF_INET6)}
    with testnet.inside(testnet.ns_b):
        probe = Poller()
    everything = reported(probe.poll())
    real = {family: _spread(server for _, server in pairs[family]) for family in pairs}
    base = compile_filter(Filter())
    for n, spreads, first_share in ((2, real, 0.5), (2, real, 0.0), (2, real, 0.93),
                                    (3, real, 0.2), (2, {}, 0.5), (4, real, 0.25)):
        plan = shares.plan(base, n, spreads or {f: shares.Spread() for f in pairs}, first_share)
        for family in pairs:
            assert any(thread[family] is not None for thread in plan), (n, family)
        kept = []
        for thread in plan:
            with testnet.inside(testnet.ns_b):
                one = Poller(Filter(local=False))
            for family, program in thread.items():
                one.set_bytecode(program, 0, (family,))
            kept.append(reported(one.poll()))
            one.close()
        assert set().union(*kept) == everything, (n, first_share)
        assert sum(len(k) for k in kept) == len(everything), f"a socket fell in two shares {n}"
        if spreads and 0 < first_share < 1:   # shares drawn from the real spread follow the targets
            assert len(kept[0]) <= len(everything) * first_share * 1.3 + max(v4, v6) / 4 + 5


def test_a_small_family_goes_whole_to_the_poll_thread_and_the_helpers_skip_its_walk():
    many, few = shares.Spread(remote=(10,) * 256, local=(10,) * 256), shares.Spread(
        remote=(1,) * 100 + (0,) * 156, local=(1,) * 100 + (0,) * 156)
    plan = shares.plan(b"", 2, {socket.AF_INET: many, socket.AF_INET6: few}, 0.4)
    assert plan[0][socket.AF_INET6] == b"" and plan[1][socket.AF_INET6] is None
    assert plan[0][socket.AF_INET] and plan[1][socket.AF_INET]   # the big one is split
    nothing = shares.plan(b"", 2, {socket.AF_INET: many, socket.AF_INET6: few}, 0.0)
    assert nothing[0][socket.AF_INET] is None and nothing[1][socket.AF_INET] == b""


def test_the_busier_thread_gives_up_part_of_its_share():
    assert shares.rebalanced(0.5, [8_000_000, 4_000_000]) < 0.5
    assert shares.rebalanced(0.5, [4_000_000, 8_000_000]) > 0.5
    assert shares.rebalanced(0.5, [6_000_000, 6_000_000]) == 0.5
    assert shares.rebalanced(0.5, [0, 0]) == 0.5                 # no polls: nothing to go by
    assert shares.rebalanced(0.05, [9_000_000, 0]) == 0.0        # clamped to [0, 1]
    assert 0 <= shares.rebalanced(0.3, [5, 1, 1]) < 0.3


def test_a_family_that_no_thread_dumps_is_never_reported_vanished(testnet):
    pairs = testnet.open_many(20)
    with testnet.inside(testnet.ns_b):
        poller = Poller()
    assert reported(poller.poll()) == {cookie_of(server) for _, server in pairs}
    poller.set_bytecode(None, 0, (socket.AF_INET,))
    result = poller.poll()
    assert result.changes == [] and result.vanished == []
    assert result.inet.messages == 0


def test_threads_share_the_work_by_how_long_each_was_busy(testnet):
    testnet.open_many(1200)
    poller = poller_in(testnet, 2)
    poller.poll()
    for _ in range(4):
        poller._rebalance_at = 0
        poller.poll()
    # Each rebalance reads what both threads did since the last one: the helper dumped.
    assert 0.0 <= poller.first_share <= 1.0
    busy = ffi.new("int64_t[2]")
    poller.poll()
    lib.tcpi_thread_busy(poller._core, busy, 2)
    assert busy[0] > 0 and busy[1] > 0


def test_auto_thread_count_moves_with_hysteresis():
    assert shares.threads_wanted(1, 2, 6e6) == 2          # slow polls: a helper joins
    assert shares.threads_wanted(2, 2, 3e6) == 2          # between the limits: stay
    assert shares.threads_wanted(1, 2, 3e6) == 1
    assert shares.threads_wanted(2, 2, 1e6) == 1          # quick polls: back to one


def test_auto_threads_never_add_a_thread_with_little_to_split():
    slow = 1e9   # a poll of a second: the kernel's walk of a huge table, not the sockets
    assert shares.threads_wanted(1, 2, slow, worth_splitting=False) == 1
    assert shares.threads_wanted(2, 2, slow, worth_splitting=False) == 1
    assert shares.engage_ns(100_000_000) == 50_000_000   # half of a 100 ms sweep period
    assert shares.engage_ns(10_000_000) == shares.ENGAGE_NS


def test_an_empty_namespace_stays_on_one_thread_however_slow_its_sweeps(testnet):
    with testnet.inside(testnet.ns_b):
        poller = Poller()
    poller.auto_threads(2, engage_ns=0, release_ns=0)      # any poll is "slow" ...
    for _ in range(3):
        poller._adapt_at = 0
        poller.poll()
    assert poller.threads == 1                             # ... but there is nothing to split


def test_auto_threads_first_decision_waits_for_a_trend_not_one_slow_poll(testnet):
    """The polls just after the first (the saver busy with every new connection) can be slow
    once; auto's first check comes REBALANCE_NS after the first poll, over the smoothed time."""
    pairs = testnet.open_many(50)
    with testnet.inside(testnet.ns_b):
        poller = Poller()
    poller.auto_threads(2, engage_ns=0, release_ns=0, split_min=0)   # any poll is "slow"
    assert len(poller.poll().changes) == len(pairs)
    for _ in range(2):
        poller.poll()
    assert poller.threads == 1
    poller._adapt_at = 0      # the two seconds are over
    poller.poll()
    assert poller.threads == 2


def test_auto_threads_switch_without_losing_or_repeating_a_connection(testnet):
    pairs = testnet.open_many(800) + testnet.open_many(100, socket.AF_INET6)
    with testnet.inside(testnet.ns_b):
        poller = Poller()
    poller.auto_threads(2, engage_ns=0, release_ns=0, split_min=0)   # any poll is "slow"
    assert len(poller.poll().changes) == 900 and poller.threads == 1   # the first is no measure
    poller._adapt_at = 0
    assert poller.poll().changes == [] and poller.threads == 2
    for _ in range(3):
        poller._rebalance_at = 0
        idle = poller.poll()
        assert idle.changes == [] and idle.vanished == []
        assert idle.inet.messages + idle.inet6.messages == 900
    poller.auto_threads(2, engage_ns=float("inf"), release_ns=float("inf"), split_min=0)  # "quick"
    poller._adapt_at = 0
    assert poller.poll().changes == [] and poller.threads == 1
    client, server = pairs[0]
    gone = cookie_of(server)
    client.close()
    server.close()
    assert [v.cookie for v in poller.poll().vanished] == [gone]


def test_the_daemon_adds_a_dump_thread_when_polls_are_slow_and_not_for_far_apart_sweeps(
        testnet, tmp_path, daemons):
    # 12,000 connections (held by child processes): polls of ~15 ms here, well over strict mode's
    # 5 ms, and well under half of the tiers' 100 ms sweep period
    holders = bench.open_connections(testnet, 12000)
    try:
        tiers = daemons(testnet, testnet.ns_a, tmp_path / "tiers",
                        "-prometheusx.listen-address=127.0.0.1:9990")
        tiers.wait_for("First poll done", timeout=60)
        time.sleep(4.5)   # two of auto's checks, 2 s apart
        assert metric(scrape(testnet, testnet.ns_a), "tcpinfo_dump_threads") == 1
        assert tiers.stop(timeout=60) == 0, tiers.text()
        daemon = daemons(testnet, testnet.ns_a, tmp_path / "out", "-strict",
                         "-prometheusx.listen-address=127.0.0.1:9990")
        daemon.wait_for("First poll done", timeout=60)
        wait_until(lambda: metric(scrape(testnet, testnet.ns_a), "tcpinfo_dump_threads") == 2,
                   timeout=20)
        assert "dumping on 2 threads" in daemon.text()
        assert daemon.stop(timeout=60) == 0, daemon.text()
    finally:
        bench.close_connections(holders)


def test_dump_threads_have_no_data_race_under_thread_sanitizer(testnet, tmp_path):
    """The ring between a helper and the poll thread, built with -fsanitize=thread and rings of
    one and two buffers (so the helper also waits for room), over 1,000 real connections."""
    native = Path(__file__).parent / "native"
    build = Path(__file__).parent.parent / "cffi_build"
    for ring in (1, 2):
        exe = tmp_path / f"dump_threads_{ring}"
        subprocess.run(["gcc", f"-DRING={ring}", "-fsanitize=thread", "-g", "-O1", "-std=gnu11",
                        "-pthread", f"-I{build}", str(native / "dump_threads.c"),
                        *map(str, sorted(build.glob("*.c"))), "-o", str(exe)], check=True)
        run = testnet.exec(testnet.ns_b, "env", "TSAN_OPTIONS=halt_on_error=1 exitcode=66",
                           str(exe))
        assert run.returncode == 0, run.stderr[-3000:]


def test_auto_counts_the_cpus_a_cgroup_quota_leaves(tmp_path):
    from tcpinfo.collector.main import usable_cpus
    affinity = len(os.sched_getaffinity(0))
    quota = tmp_path / "cpu.max"
    for text, cpus in (("max 100000", affinity), ("50000 100000", 1),
                       ("150000 100000", min(affinity, 2)), ("garbage", affinity)):
        quota.write_text(text + "\n")
        assert usable_cpus(str(quota)) == cpus, text
    assert usable_cpus(str(tmp_path / "absent")) == affinity
