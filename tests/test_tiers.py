"""The two tiers: sweeps of the whole table at an adaptive cadence, exact look-ups of the active set.

Real connections in namespaces; the schedule's own rules are checked without sockets.
"""
from __future__ import annotations

import socket
import time

import pytest

from helpers.daemon import archives, metric, read_archive, records, scrape
from lab.netns import cookie_of
from tcpinfo.collector.poller import Poller
from tcpinfo.collector.tiers import SWEEP_SHARE, Tiers

MS = 1_000_000


# ---- the schedule -----------------------------------------------------------------------------

def test_an_idle_host_is_swept_every_sweep_interval_and_never_woken_in_between():
    tiers = Tiers(10 * MS, 100 * MS)
    assert tiers.sweep_due(0)
    tiers.swept(0, 1 * MS, joined=0)
    assert tiers.period_ns == 100 * MS
    # The ticks between are skipped; the next sweep starts early by 1.25 times its length and a
    # tick, so that it ends within 100 ms of this one's start.
    assert tiers.next_wake(10 * MS, active=0) == 88_750_000
    assert not tiers.sweep_due(50 * MS)
    assert tiers.sweep_due(84 * MS)                          # a tick half a tick early is on time


def test_with_active_connections_the_sweep_falls_on_a_tick_and_ends_within_the_bound():
    tiers = Tiers(10 * MS, 100 * MS)
    tiers.swept(0, 17 * MS, joined=0)                        # a 17 ms sweep of a busy table
    start = next(t for t in range(0, 200 * MS, 10 * MS) if tiers.sweep_due(t))
    assert start + 17 * MS <= 100 * MS
    late = start + 9 * MS                                    # a tick woken 9 ms late
    assert late + 1.2 * 17 * MS <= 100 * MS                  # and a sweep a fifth longer


def test_sweeps_come_sooner_while_they_find_connections_and_back_off_when_they_do_not():
    tiers = Tiers(10 * MS, 100 * MS)
    start, periods = 0, []
    for joined in (1, 1, 1, 1, 0, 0, 0, 0):
        tiers.swept(start, start + 1 * MS, joined)
        periods.append(tiers.period_ns // MS)
        start += tiers.period_ns
    assert periods == [50, 25, 12, 10, 20, 40, 80, 100]


def test_the_discovery_speed_up_never_costs_more_than_its_share_of_a_cpu():
    tiers = Tiers(10 * MS, 100 * MS)
    tiers.swept(0, 4 * MS, joined=5)
    tiers.swept(50 * MS, 54 * MS, joined=5)      # 4 ms sweeps: no closer than 40 ms apart
    assert tiers.period_ns == int(4 * MS / SWEEP_SHARE)
    tiers.swept(90 * MS, 120 * MS, joined=5)     # a sweep longer than a tenth of the bound
    assert tiers.period_ns == 100 * MS


def test_active_connections_are_looked_up_at_every_tick():
    tiers = Tiers(10 * MS, 100 * MS)
    tiers.swept(0, 1 * MS, joined=1)
    assert tiers.next_wake(10 * MS, active=3) == 10 * MS
    assert not tiers.sweep_due(10 * MS)


def test_strict_mode_sweeps_at_every_tick():
    tiers = Tiers(10 * MS, 100 * MS, strict=True)
    for now in range(0, 100 * MS, 10 * MS):
        assert tiers.sweep_due(now)
        tiers.swept(now, now + MS, joined=0)
        assert tiers.next_wake(now + 10 * MS, active=0) == now + 10 * MS


def test_the_discovery_bound_is_the_worst_sweep_end_after_the_previous_start():
    tiers = Tiers(10 * MS, 100 * MS)
    tiers.swept(0, 2 * MS, 0)
    tiers.swept(100 * MS, 103 * MS, 0)
    tiers.swept(200 * MS, 201 * MS, 0)
    assert tiers.take_bound() == 103 * MS
    assert tiers.take_bound() == 0
    assert tiers.achieved_ns == 100 * MS


def test_a_sweep_interval_below_the_poll_interval_is_refused():
    with pytest.raises(ValueError):
        Tiers(100 * MS, 10 * MS)


# ---- the core's sweeps and look-ups on real sockets --------------------------------------------

def _poller(topo, ns: str, idle_lookups: int = 3, destroy: bool = False) -> Poller:
    with topo.inside(ns):
        poller = Poller()
        if destroy:
            poller.listen_destroyed()
    poller.set_one_walk(True)
    poller.set_fast_tier(idle_lookups)
    return poller


def _send(client: socket.socket, server: socket.socket, n: int = 3000) -> None:
    client.sendall(b"x" * n)
    got = 0
    while got < n:
        got += len(server.recv(65536))


def _messages(result) -> dict[int, bytes]:
    return {c.cookie: c.payload for c in result.changes}


def test_one_walk_sees_every_socket_of_both_families_as_the_two_family_dumps_do(testnet):
    pairs = testnet.open_many(3) + testnet.open_many(2, socket.AF_INET6)
    with testnet.inside(testnet.ns_b):
        two, one = Poller(), Poller()
    one.set_one_walk(True)
    first_two, first_one = two.poll(), one.poll()
    assert first_one.one_walk and not first_two.one_walk
    assert _messages(first_one).keys() == _messages(first_two).keys()
    assert len(first_one.changes) == 5
    assert {c.family for c in first_one.changes} == {socket.AF_INET, socket.AF_INET6}
    assert (first_one.inet.messages, first_one.inet6.messages) == (
        first_two.inet.messages, first_two.inet6.messages)
    for cookie, payload in _messages(first_one).items():   # the same attributes, in the same shape
        assert payload[:8] == _messages(first_two)[cookie][:8]
        assert len(payload) == len(_messages(first_two)[cookie])
    for poller in (one, two):
        poller.close()
    for pair in pairs:
        for s in pair:
            s.close()


def test_a_new_connection_is_followed_by_look_ups_until_it_goes_idle(testnet):
    poller = _poller(testnet, testnet.ns_a, idle_lookups=3)
    poller.poll()
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    swept = poller.poll()
    assert cookie in _messages(swept) and swept.joined == 1 and swept.active == 1
    _send(client, server)
    moved = poller.refresh()
    assert [c.cookie for c in moved.changes] == [cookie]
    assert moved.lookup.asked == 1 and moved.lookup.changed == 1
    assert moved.vanished == [] and moved.inet.messages == 0   # no walk of the table
    quiet = [poller.refresh() for _ in range(3)]
    assert [r.active for r in quiet] == [1, 1, 0]
    assert quiet[-1].lookup.left == 1 and all(r.changes == [] for r in quiet)
    assert poller.refresh().lookup.asked == 0                  # idle: nothing to look up
    poller.close()


def test_an_idle_connection_that_moves_is_caught_by_the_next_sweep_then_followed_at_once(testnet):
    poller = _poller(testnet, testnet.ns_a, idle_lookups=1)
    poller.poll()
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    poller.poll()
    assert poller.refresh().active == 0          # one idle look-up: out of the fast tier
    _send(client, server)
    assert poller.refresh().changes == []        # not looked up any more ...
    caught = poller.poll()                       # ... until a sweep sees it changed
    assert cookie in _messages(caught) and caught.joined == 1
    _send(client, server)
    assert cookie in _messages(poller.refresh())
    poller.close()


def test_a_look_up_of_a_socket_that_died_meanwhile_is_a_miss_not_a_close(testnet):
    poller = _poller(testnet, testnet.ns_a)          # no destroy listener: only polls close
    poller.poll()
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    poller.poll()
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, b"\x01\0\0\0\0\0\0\0")   # RST: gone now
    client.close()
    server.close()
    time.sleep(0.05)
    missed = poller.refresh()
    assert missed.lookup.missing == 1 and missed.lookup.error is None
    assert missed.changes == [] and missed.vanished == [] and missed.destroyed == []
    assert missed.active == 0
    closed = poller.poll()                           # the sweep decides: vanished
    assert cookie in {c.cookie for c in closed.vanished}
    poller.close()


def test_a_connection_closed_between_look_ups_is_closed_once_by_its_destroy_notification(testnet):
    poller = _poller(testnet, testnet.ns_a, destroy=True)
    poller.poll()
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    poller.poll()
    client.close()
    server.close()
    seen: list = []
    deadline = time.monotonic() + 3
    while time.monotonic() < deadline and not seen:
        result = poller.refresh()
        assert result.vanished == [] and cookie not in _messages(result)
        seen += [c for c in result.destroyed if c.cookie == cookie]
        time.sleep(0.01)
    assert len(seen) == 1
    later = [poller.poll(), poller.refresh(), poller.poll()]
    assert all(cookie not in {c.cookie for c in r.changes + r.vanished + r.destroyed} for r in later)
    poller.close()


def test_the_first_sweep_finds_every_connection_new_but_none_active(testnet):
    pairs = testnet.open_many(4)
    poller = _poller(testnet, testnet.ns_a)
    first = poller.poll()
    assert len(first.changes) == 4 and first.active == 0 and first.joined == 0
    _send(*pairs[0])
    assert poller.poll().active == 1                 # the one that moved
    poller.close()
    for pair in pairs:
        for s in pair:
            s.close()


def test_turning_the_fast_tier_off_empties_it(testnet):
    poller = _poller(testnet, testnet.ns_a)
    poller.poll()
    pairs = testnet.open_many(4)
    assert poller.poll().active == 4
    poller.set_fast_tier(0)
    assert poller.refresh().lookup.asked == 0
    assert poller.poll().active == 0
    poller.close()
    for pair in pairs:
        for s in pair:
            s.close()


# ---- the daemon in both modes ------------------------------------------------------------------

def _stream(client: socket.socket, server: socket.socket, seconds: float) -> None:
    """Keeps bytes flowing a -> b for `seconds`, a few KB every 5 ms."""
    end = time.monotonic() + seconds
    while time.monotonic() < end:
        _send(client, server, 2000)
        time.sleep(0.005)


def _in_time_order(stamps: list[int]) -> bool:
    """Polls' records in time order, and the last (the destroy notification's) after them but for
    the dump that overlapped it: a poll's records carry its dump's end, the notification the
    moment the core received it, which may fall within that dump."""
    return stamps[:-1] == sorted(stamps[:-1]) and (len(stamps) < 2 or stamps[-1] >= stamps[-2] - 50 * MS)


def _record_times(out, cookie: int) -> list[int]:
    return [r.ts_ns for r in records(out, cookie)]


@pytest.mark.parametrize("mode", [(), ("-strict",)], ids=["tiers", "strict"])
def test_an_active_connection_keeps_the_poll_interval_and_idle_ones_are_recorded_once(
        testnet, daemons, tmp_path, mode):
    out = tmp_path / "out"
    idle = testnet.open_many(20)
    daemon = daemons(testnet, testnet.ns_a, out, "-exclude-local=false", *mode)
    daemon.wait_for("First poll done")
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    _stream(client, server, 1.5)
    client.close()
    server.close()
    time.sleep(0.3)
    daemon.stop()
    times = _record_times(out, cookie)
    # Sweeps alone would give at most 1.5 s / 100 ms = 15 changed records (plus open and close).
    assert len(times) > 40, len(times)
    assert _in_time_order(times) and len(set(times)) == len(times)   # none twice
    for c, _s in idle:                  # each idle connection: its first record, nothing twice
        lines = records(out, cookie_of(c))
        assert 1 <= len(lines) <= 3 and len({line.ts_ns for line in lines}) == len(lines)
    for pair in idle:
        for s in pair:
            s.close()


def test_no_connection_is_lost_or_recorded_twice_across_the_tiers(testnet, daemons, tmp_path):
    """Connections open, move, idle and close while the daemon sweeps and looks up: each has one
    archive series that starts with its first record and holds no record twice."""
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-exclude-local=false", "-active-linger=50ms",
                     "-sweep-interval=60ms")
    daemon.wait_for("First poll done")
    listener = testnet.listen()
    cookies = []
    open_pairs = []
    for i in range(30):
        client, server, _ = testnet.connect(listener=listener)
        cookies.append(cookie_of(client))
        if i % 3 == 0:
            _send(client, server)
        open_pairs.append((client, server))
        if i % 5 == 4:                   # some close while others keep going
            old_c, old_s = open_pairs.pop(0)
            old_c.close()
            old_s.close()
        time.sleep(0.03)
    time.sleep(0.3)
    daemon.stop()
    series = archives(out)
    for cookie in cookies:
        uuid = f"test-host_1700000000_{cookie:016X}"
        assert uuid in series, f"connection {cookie:x} was never recorded"
        lines = [line for path in series[uuid] for line in read_archive(path)
                 if line.raw_idm is not None]
        stamps = [line.ts_ns for line in lines]
        assert _in_time_order(stamps) and len(set(stamps)) == len(stamps)
        assert lines[0].raw_idm is not None
    for pair in open_pairs:
        for s in pair:
            s.close()


def test_the_daemon_reports_its_tiers_in_metrics(testnet, daemons, tmp_path):
    client, server, _ = testnet.connect()
    daemon = daemons(testnet, testnet.ns_a, tmp_path / "out", "-exclude-local=false",
                     "-prometheusx.listen-address=127.0.0.1:9990")
    daemon.wait_for("First poll done")
    _stream(client, server, 1.2)
    text = scrape(testnet, testnet.ns_a)
    daemon.stop()
    assert metric(text, "tcpinfo_active_connections") >= 1
    assert metric(text, 'tcpinfo_lookups_total{outcome="changed"}') > 10
    assert 0 < metric(text, "tcpinfo_sweep_interval_achieved_seconds") <= 0.2
    assert 0 < metric(text, "tcpinfo_discovery_bound_seconds") < 0.25
    assert 0 < metric(text, "tcpinfo_lookup_interval_achieved_seconds") < 0.05
    assert metric(text, "tcpinfo_sweep_period_seconds") <= 0.1
    assert metric(text, "tcpinfo_sweeps_total") >= 5
    assert 0 < metric(text, "tcpinfo_cpu_seconds_per_second") < 1
