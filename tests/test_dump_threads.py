"""Parallel dumps: several threads, each a share of the ports, report what one thread reports."""
from __future__ import annotations

import socket

from tcpinfo.netlink import Poller
from tcpinfo.sockfilter import Filter, compile_filter, share_programs
from topology import cookie_of


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
    first = [reported(p.poll()) for p in pollers]
    assert first[0] == first[1] == first[2] == {cookie_of(server) for _, server in pairs}
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


def test_share_programs_partition_the_sockets_whatever_the_port_spread(testnet):
    pairs = testnet.open_many(600)
    with testnet.inside(testnet.ns_b):
        probe = Poller()
    everything = reported(probe.poll())
    local, remote = [0] * 256, [0] * 256
    for _, server in pairs:
        local[server.getsockname()[1] >> 8] += 1
        remote[server.getpeername()[1] >> 8] += 1
    base = compile_filter(Filter())
    for n, hist in ((2, (local, remote)), (3, (local, remote)), (2, ((), ())), (4, (local, [0] * 256))):
        shares = []
        for program in share_programs(base, n, *hist):
            with testnet.inside(testnet.ns_b):
                one = Poller(Filter(local=False))
            one.set_bytecode(program)
            shares.append(reported(one.poll()))
            one.close()
        assert set().union(*shares) == everything
        assert sum(len(s) for s in shares) == len(everything), "a socket fell in two shares"
        if any(hist[1]):   # shares drawn from the real spread are even
            assert max(len(s) for s in shares) <= len(everything) / n * 1.3 + 5
