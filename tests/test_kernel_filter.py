"""The filter compiled to inet_diag bytecode keeps exactly the sockets the userspace filter keeps."""
from __future__ import annotations

import ipaddress
import random
import socket

import pytest

from helpers.daemon import archives, metric, scrape, uuid_of
from lab.netns import cookie_of
from tcpinfo.collector.poller import Poller
from tcpinfo.collector.sockfilter import Filter, compile_filter

A_EXTRA = ["198.18.0.11", "198.18.0.12", "fd00:18::11"]
B_EXTRA = ["198.18.0.21", "198.18.0.22", "fd00:18::21"]


@pytest.fixture
def crowd(testnet):
    """~100 idle connections into b over many addresses, ports and families, loopback included.

    Returns the topology, b's ends of them (the sockets a poller in b sees), and every address
    and port in use.
    """
    topo = testnet
    for ns, dev, extra in ((topo.ns_a, topo.dev_a, A_EXTRA), (topo.ns_b, topo.dev_b, B_EXTRA)):
        for addr in extra:
            topo.ip(ns, "addr", "add", addr + ("/24" if "." in addr else "/64"), "dev", dev,
                    *(() if "." in addr else ("nodad",)))
    held, clients, ports = [], [], set()
    with topo.inside(topo.ns_b):
        listeners = [socket.create_server((addr, 0), family=fam) for addr, fam in
                     [(topo.b4, socket.AF_INET), (B_EXTRA[0], socket.AF_INET),
                      (topo.b6, socket.AF_INET6), (B_EXTRA[2], socket.AF_INET6)]]
        listeners.append(socket.create_server(("::", 0), family=socket.AF_INET6,
                                              dualstack_ipv6=True))
        listeners.append(socket.create_server(("127.0.0.1", 0)))
        for _ in range(6):   # loopback pairs: both ends live in b
            held.append(socket.create_connection(listeners[-1].getsockname()[:2]))
            held.append(listeners[-1].accept()[0])
    targets = [(listeners[0], topo.b4), (listeners[1], B_EXTRA[0]), (listeners[2], topo.b6),
               (listeners[3], B_EXTRA[2]), (listeners[4], topo.b4), (listeners[4], B_EXTRA[1]),
               (listeners[4], topo.b6)]
    sources = {4: [topo.a4, *A_EXTRA[:2]], 6: [topo.a6, A_EXTRA[2]]}
    with topo.inside(topo.ns_a):
        for listener, addr in targets:
            port = listener.getsockname()[1]
            for src in sources[ipaddress.ip_address(addr).version]:
                for _ in range(4):
                    clients.append(socket.create_connection((addr, port),
                                                            source_address=(src, 0)))
    for listener, _ in targets:
        listener.settimeout(5)
    for listener, addr in targets:
        for _ in range(4 * len(sources[ipaddress.ip_address(addr).version])):
            held.append(listener.accept()[0])
    for sock in held + clients + listeners:
        ports.add(sock.getsockname()[1])
    addresses = [topo.a4, topo.b4, topo.a6, topo.b6, *A_EXTRA, *B_EXTRA, "127.0.0.1"]
    yield topo, held, sorted(ports), addresses
    for sock in held + clients + listeners:
        sock.close()


def kept(topo, sockets: Filter, in_kernel: bool) -> set[int]:
    """Cookies a fresh poller in b reports, filtering in the kernel only or in userspace only."""
    with topo.inside(topo.ns_b):
        poller = Poller(Filter(local=False) if in_kernel else sockets)
    with poller:
        if in_kernel:
            poller.set_bytecode(compile_filter(sockets))
            assert poller.check_bytecode() == 0, "the kernel rejected the program"
        result = poller.poll()
        assert result.inet.error is None and result.inet6.error is None
        return {change.cookie for change in result.changes}


def random_filter(rng: random.Random, ports: list[int], addresses: list[str]) -> Filter:
    def some(items, most):
        return rng.sample(items, rng.randint(0, min(most, len(items))))

    def prefix(addr: str) -> str:
        ip = ipaddress.ip_address(addr)
        bits = rng.randint(0, ip.max_prefixlen)
        if ip.version == 4 and rng.random() < 0.2:   # the dual-stack spelling of an IPv4 prefix
            return f"::ffff:{addr}/{96 + bits}"
        return f"{addr}/{bits}"

    def port_range() -> tuple[int, int]:
        first = rng.choice(ports) - rng.choice([0, 0, 1, 50])
        return max(first, 0), min(first + rng.choice([0, 1, 2, 100, 30000]), 65535)

    return Filter(
        local=rng.random() < 0.5,
        srcports=set(some(ports, 6)) | {rng.randint(0, 65535) for _ in range(rng.randint(0, 2))},
        dstips=[a if rng.random() < 0.7 or ":" in a else f"::ffff:{a}" for a in some(addresses, 3)],
        include_nets=[prefix(a) for a in some(addresses, 3)] if rng.random() < 0.5 else [],
        include_ports=[port_range() for _ in range(rng.randint(1, 3))] if rng.random() < 0.5
        else [])


def test_bytecode_keeps_exactly_what_the_userspace_filter_keeps(crowd):
    topo, held, ports, addresses = crowd
    everything = kept(topo, Filter(local=False), in_kernel=False)
    assert {cookie_of(s) for s in held} <= everything
    rng = random.Random(20261130)
    sizes = set()
    for trial in range(150):
        sockets = random_filter(rng, ports, addresses)
        user = kept(topo, sockets, in_kernel=False)
        assert kept(topo, sockets, in_kernel=True) == user, f"trial {trial}: {sockets}"
        sizes.add(len(user))
    assert len(sizes) > 20, "the random filters did not exercise the range from none to all"


def test_upstream_defaults_compile_to_a_program_that_hides_local_and_listening_sockets(crowd):
    topo, held, _, _ = crowd
    sockets = Filter()
    remote = {cookie_of(s) for s in held if s.getsockname()[0] != "127.0.0.1"}
    assert kept(topo, sockets, in_kernel=True) == remote == kept(topo, sockets, in_kernel=False)


def test_include_lists_select_one_server_port_and_one_client_network(crowd):
    topo, held, _, _ = crowd
    port = held[-1].getsockname()[1]
    sockets = Filter(include_ports=[(port, port)], include_nets=[A_EXTRA[0] + "/32"])
    expected = {cookie_of(s) for s in held
                if s.getsockname()[1] == port and s.getpeername()[0] in (A_EXTRA[0],
                                                                         "::ffff:" + A_EXTRA[0])}
    assert expected and kept(topo, sockets, in_kernel=True) == expected


def test_an_empty_filter_compiles_to_no_program_and_a_huge_one_is_refused():
    assert compile_filter(Filter(local=False)) == b""
    with pytest.raises(ValueError, match="bytes of bytecode"):
        compile_filter(Filter(srcports=set(range(0, 65536, 2))))


def test_a_program_the_kernel_rejects_leaves_filtering_to_userspace(testnet, monkeypatch):
    listener = testnet.listen()
    excluded_port = listener.getsockname()[1]
    dropped = testnet.connect(listener=listener)[1]
    kept = testnet.connect()[1]
    with testnet.inside(testnet.ns_b):
        poller = Poller(Filter(srcports={excluded_port}))
    # No program the compiler writes is refused, so hand the real kernel one its audit rejects:
    # a jump that goes nowhere.
    monkeypatch.setattr("tcpinfo.collector.poller.compile_filter", lambda sockets: bytes([1, 0, 0, 0]))
    refusal = poller.filter_in_kernel(Filter(srcports={excluded_port}))
    assert refusal and "rejected" in refusal and "Invalid argument" in refusal
    assert poller.bytecode_size == 0
    result = poller.poll()
    assert result.inet.error is None
    assert {c.cookie for c in result.changes} == {cookie_of(kept)}
    assert cookie_of(dropped) not in {c.cookie for c in result.changes}


def test_daemon_archives_only_included_connections_with_the_filter_in_the_kernel(
        testnet, tmp_path, daemons):
    wanted_listener, other_listener = testnet.listen(), testnet.listen()
    port = wanted_listener.getsockname()[1]
    wanted = [testnet.connect(listener=wanted_listener)[1] for _ in range(2)]
    others = [testnet.connect(listener=other_listener)[1] for _ in range(2)]
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_b, out, f"-include-port={port}",
                     "-prometheusx.listen-address=127.0.0.1:9990")
    daemon.wait_for("First poll done")
    assert "The kernel filters sockets with a" in daemon.text()
    assert metric(scrape(testnet), "tcpinfo_kernel_filter_bytes") > 0
    assert daemon.stop() == 0, daemon.text()
    assert set(archives(out)) == {uuid_of(s) for s in wanted}
    assert not set(archives(out)) & {uuid_of(s) for s in others}
