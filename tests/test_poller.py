"""The C poller against real sockets in test namespaces."""
import socket
import struct
import time

import pytest

from lab.netns import cookie_of
from tcpinfo.collector.poller import CHANGE_NAMES, PREVIOUS_WAS_NIL, Poller
from tcpinfo.collector.sockfilter import Filter
from tcpinfo.kernel.inetdiag import INET_DIAG_INFO, attribute_span

TCP_FIN_WAIT1, TCP_FIN_WAIT2, TCP_CLOSE_WAIT = 4, 5, 8


def poller_in(topo, ns, exclusions=None, keeps: str = "messages") -> Poller:
    """A poller whose table keeps each connection's last message, or (`keeps="images"`) only
    what Compare needs of it, as it does while destroy notifications are heard."""
    with topo.inside(ns):
        poller = Poller(exclusions)
        if keeps == "images":
            poller.listen_destroyed()
        return poller


both_tables = pytest.mark.parametrize("keeps", ["messages", "images"])


def settle(poller: Poller, quiet_polls: int = 2, limit: float = 5.0):
    """Polls until `quiet_polls` polls in a row report nothing (handshakes done)."""
    deadline, quiet = time.monotonic() + limit, 0
    while quiet < quiet_polls:
        assert time.monotonic() < deadline, "sockets never went quiet"
        res = poller.poll()
        quiet = quiet + 1 if not res.changes and not res.vanished else 0
        time.sleep(0.02)


def state_of(payload: bytes) -> int:
    return payload[1]


@both_tables
def test_idle_connections_yield_nothing_on_second_poll_and_one_byte_yields_one_record(testnet,
                                                                                       keeps):
    pairs = testnet.open_many(5000)
    poller = poller_in(testnet, testnet.ns_a, keeps=keeps)
    first = poller.poll()
    assert first.inet.error is None and first.inet6.error is None
    cookies = {cookie_of(c) for c, _ in pairs}
    assert {ch.cookie for ch in first.changes} == cookies
    assert all(ch.kind == PREVIOUS_WAS_NIL for ch in first.changes)
    settle(poller)
    second = poller.poll()
    assert second.changes == [] and second.vanished == []
    assert second.tracked == 5000 and second.inet.messages == 5000

    client = pairs[1234][0]
    client.send(b"x")
    time.sleep(0.1)  # let the ACK come back so the change is complete in one poll
    third = poller.poll()
    assert [ch.cookie for ch in third.changes] == [cookie_of(client)]
    assert CHANGE_NAMES[third.changes[0].kind] == "StateOrCounterChange"
    assert poller.poll().changes == []


def test_record_carries_the_kernels_raw_message(testnet):
    client, server, _ = testnet.connect(socket.AF_INET6)
    poller = poller_in(testnet, testnet.ns_a)
    (change,) = poller.poll().changes
    idm = change.payload[:72]
    assert change.family == socket.AF_INET6 == idm[0]
    assert struct.unpack(">HH", idm[4:8]) == (client.getsockname()[1], client.getpeername()[1])
    assert socket.inet_ntop(socket.AF_INET6, idm[8:24]) == testnet.a6
    assert socket.inet_ntop(socket.AF_INET6, idm[24:40]) == testnet.b6
    assert struct.unpack("<Q", idm[44:52])[0] == change.cookie == cookie_of(client)
    assert change.timestamp_ns == pytest.approx(time.time_ns(), abs=2e9)


@both_tables
def test_state_changes_are_reported(shaped_testnet, keeps):
    topo = shaped_testnet
    client, server, _ = topo.connect()
    pa, pb = poller_in(topo, topo.ns_a, keeps=keeps), poller_in(topo, topo.ns_b, keeps=keeps)
    settle(pa), settle(pb)
    # 200 KB behind a 2 Mbit/s link: the server's FIN waits behind the data, so
    # the server sits in FIN_WAIT1 for most of a second.
    server.setblocking(False)
    try:
        server.send(b"z" * 200_000)
    except BlockingIOError:
        pass
    server.shutdown(socket.SHUT_WR)
    res = pb.poll()
    (ch,) = [c for c in res.changes if c.cookie == cookie_of(server)]
    assert state_of(ch.payload) == TCP_FIN_WAIT1
    assert CHANGE_NAMES[ch.kind] == "IDiagStateChange"
    deadline = time.monotonic() + 10
    seen_close_wait = False
    while not seen_close_wait and time.monotonic() < deadline:
        client.recv(65536)
        seen_close_wait = any(state_of(c.payload) == TCP_CLOSE_WAIT and c.kind == 1
                              for c in pa.poll().changes)
    assert seen_close_wait


def test_closed_socket_is_reported_vanished_with_its_last_snapshot(testnet):
    client, server, _ = testnet.connect()
    poller = poller_in(testnet, testnet.ns_a)
    settle(poller)
    cookie = cookie_of(client)
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    client.close()  # RST: the socket is destroyed at once
    res = poller.poll()
    assert [v.cookie for v in res.vanished] == [cookie]
    assert res.vanished[0].payload[44:52] == struct.pack("<Q", cookie)
    assert res.tracked == 0
    assert poller.poll().vanished == []


def test_orphaned_fin_wait2_is_recorded_once_not_every_poll(testnet):
    client, server, _ = testnet.connect()
    poller = poller_in(testnet, testnet.ns_a)
    settle(poller)
    client.close()  # the peer never closes: the client lingers in FIN_WAIT2 without tcp_info
    time.sleep(0.1)
    res = poller.poll()
    (ch,) = res.changes
    assert state_of(ch.payload) == TCP_FIN_WAIT2
    for _ in range(5):
        assert poller.poll().changes == []


def test_exclusions_drop_ports_destinations_and_local_addresses(testnet):
    high_port = testnet.listen(port=65535)
    low_port = testnet.listen(port=1)
    kept = testnet.listen(port=4000)
    v6_listener = testnet.listen(socket.AF_INET6, port=4001)
    held = [testnet.connect(listener=listener) for listener in (high_port, low_port, kept)]
    with testnet.inside(testnet.ns_a):
        loop_listener = socket.create_server(("127.0.0.1", 0))
        loop_client = socket.create_connection(loop_listener.getsockname())
        # A dual-stack socket talking to b's IPv4 address carries ::ffff:198.18.0.2.
        dual = socket.socket(socket.AF_INET6, socket.SOCK_STREAM)
    other_v4 = socket.socket()
    testnet.ip(testnet.ns_b, "addr", "add", "198.18.0.3/24", "dev", testnet.dev_b)
    with testnet.inside(testnet.ns_b):
        extra = socket.create_server(("198.18.0.3", 4002))
    with testnet.inside(testnet.ns_a):
        other_v4 = socket.create_connection(("198.18.0.3", 4002))
        dual.connect(("::ffff:198.18.0.2", 4000))
    held.append(testnet.connect(socket.AF_INET6, listener=v6_listener))

    ex = Filter(srcports=set(), dstips=["198.18.0.2"])
    everything = poller_in(testnet, testnet.ns_b, Filter(local=False)).poll()
    assert any(c.payload[24:28] == bytes([127, 0, 0, 1]) for c in
               poller_in(testnet, testnet.ns_a, Filter(local=False)).poll().changes)
    assert everything.changes  # sanity: b sees its accepted sockets

    # In a: exclude dst 198.18.0.2 (IPv4 and v4-mapped alike) and local addresses.
    a = poller_in(testnet, testnet.ns_a, ex).poll()
    seen = {c.cookie for c in a.changes}
    assert seen == {cookie_of(other_v4), cookie_of(held[-1][0])}
    # 3 to 198.18.0.2 and 3 loopback sockets (listener, both ends); the dual-stack one.
    assert a.inet.excluded == 6 and a.inet6.excluded == 1

    # In b: exclude source ports 1 and 65535 (upstream could not exclude >= 32768).
    b = poller_in(testnet, testnet.ns_b, Filter(srcports={1, 65535})).poll()
    ports = {struct.unpack(">H", c.payload[4:6])[0] for c in b.changes}
    assert 1 not in ports and 65535 not in ports and 4000 in ports
    for s in (extra, loop_listener, loop_client, dual, other_v4):
        s.close()


def test_bad_exclusion_port_is_rejected():
    with pytest.raises(ValueError):
        Poller(Filter(srcports={70000}))


def test_failed_dump_never_reports_its_connections_vanished(testnet):
    client, server, _ = testnet.connect()
    poller = poller_in(testnet, testnet.ns_a)
    settle(poller)
    # The kernel audits bytecode: a lone JMP that jumps nowhere is rejected with EINVAL.
    poller.set_bytecode(bytes([1, 0, 0, 0]))  # op INET_DIAG_BC_JMP, yes=0, no=0
    client.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    cookie = cookie_of(client)
    client.close()
    failed = poller.poll()
    assert failed.inet.error == "NLMSG_ERROR" and failed.inet.errno == 22
    assert failed.inet6.error == "NLMSG_ERROR"
    assert failed.vanished == [] and failed.tracked == 1
    poller.set_bytecode(b"")
    recovered = poller.poll()
    assert recovered.inet.error is None
    assert [v.cookie for v in recovered.vanished] == [cookie]


def test_sockets_opened_later_stay_in_the_pollers_namespace(testnet):
    """A failed dump reopens the netlink socket and dump threads open their own, from whatever
    namespace the calling thread is in by then: they must still see the poller's namespace."""
    client, _, _ = testnet.connect()
    poller = poller_in(testnet, testnet.ns_a)   # made in a; everything below runs outside it
    assert [c.cookie for c in poller.poll().changes] == [cookie_of(client)]
    poller.set_bytecode(bytes([1, 0, 0, 0]))    # rejected: the dump fails, the socket reopens
    assert poller.poll().inet.error == "NLMSG_ERROR"
    poller.set_bytecode(b"")
    assert poller.set_threads(2) is None
    for _ in range(2):
        result = poller.poll()
        assert result.vanished == [] and result.tracked == 1
        assert result.inet.messages == 1


def _kernel_bytes(sock: socket.socket) -> tuple[int, int]:
    """(bytes_sent, bytes_received) of a socket from its own TCP_INFO."""
    from tcpinfo.kernel.tcp import decode_tcp_info
    info = decode_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))
    return info["bytes_sent"], info["bytes_received"]


@both_tables
def test_the_polls_byte_counts_add_up_to_the_kernels_counters(testnet, keeps):
    """Upstream's byte-rate histograms are fed by the core: each reported record adds how far the
    connection's counters moved since its previous one, so their sum is what the socket moved."""
    poller = poller_in(testnet, testnet.ns_a, Filter(local=False), keeps=keeps)
    client, server, _ = testnet.connect()
    sent = received = 0
    for size in (0, 70_000, 3_000, 250_000):
        if size:
            client.sendall(b"x" * size)
            server.sendall(b"y" * (size // 2))
            got = 0
            while got < size:
                got += len(server.recv(1 << 20))
            got = 0
            while got < size // 2:
                got += len(client.recv(1 << 20))
        time.sleep(0.05)
        result = poller.poll()
        sent += result.bytes_sent
        received += result.bytes_received
    assert (sent, received) == _kernel_bytes(client)
    assert sent >= 323_000 and received >= 161_500
    assert poller.poll().bytes_sent == 0      # nothing moved: nothing counted
    poller.close()


def _last_data_recv_ms(payload: bytes) -> int:
    off, length = attribute_span(payload, INET_DIAG_INFO)
    assert length >= 56
    return struct.unpack_from("<I", payload, off + 52)[0]   # tcpi_last_data_recv


def test_a_query_of_an_open_connection_reads_the_kernels_current_message(testnet):
    """With only images in the table, snapshot() asks the kernel now: the idle timers that
    Compare ignores (tcpi_last_data_recv) have moved on since the last reported record."""
    client, server, _ = testnet.connect()
    server.send(b"x")
    poller = poller_in(testnet, testnet.ns_a, keeps="images")
    cookie = cookie_of(client)
    reported = None
    for _ in range(10):
        reported = next((c.payload for c in poller.poll().changes if c.cookie == cookie), reported)
        time.sleep(0.02)
    time.sleep(0.4)
    now = poller.snapshot(cookie)
    assert now is not None and struct.unpack_from("<Q", now, 44)[0] == cookie
    assert _last_data_recv_ms(now) >= _last_data_recv_ms(reported) + 300
    assert poller.poll().changes == []   # the look-up changed nothing in the table
    assert poller.snapshot(12345) is None
