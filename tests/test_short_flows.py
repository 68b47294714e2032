"""A short flow is one connection: one archive and one Open/Close, whatever remnant it leaves.

A connection that closes first, while its peer keeps its end open, lingers as a FIN_WAIT2
time-wait remnant.  When no dump asked for the socket's cookie while it lived, the kernel gives
the remnant a cookie of its own, so only the 4-tuple ties it to the short flow that the destroy
notification recorded.  These tests never read a client's cookie (SO_COOKIE would make one and
hide the problem): connections are told apart by their ports.
"""
from __future__ import annotations

import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest

from helpers.daemon import CLIENT, archives, metric, read_archive, scrape, wait_until
from tcpinfo.collector.poller import PREVIOUS_WAS_NIL, SHORT, Poller

FIN_WAIT2, TCP_CLOSE = 5, 7
FLOWS = 20
FIN_TIMEOUT_S = 6   # the remnants' whole life: longer than the core remembers short flows


def short_flows(topo, family: int, n: int = FLOWS, size: int = 50_000) -> tuple[set[int], list]:
    """n connections a -> b that each send `size` bytes and close first; b keeps its ends open.

    Returns the clients' local ports and the server sockets (keep them: closing them would end
    the remnants early).
    """
    listener = topo.listen(family)
    ports, servers = set(), []
    for _ in range(n):
        client, server, _ = topo.connect(family, listener=listener)
        ports.add(client.getsockname()[1])
        client.sendall(b"s" * size)
        received = 0
        while received < size:
            received += len(server.recv(65536))
        client.close()
        servers.append(server)
    listener.close()
    return ports, servers


def remnants(topo, ns: str) -> int:
    """FIN_WAIT2 sockets in the namespace, as `ss` sees them."""
    out = topo.exec(ns, "ss", "-tanH", "state", "fin-wait-2").stdout
    return len(out.splitlines())


def local_port(raw_idm: bytes) -> int:
    return struct.unpack_from("!H", raw_idm, 4)[0]


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6], ids=["ipv4", "ipv6"])
def test_poller_reports_a_short_flow_once_and_never_its_time_wait_remnant(testnet, family):
    with testnet.inside(testnet.ns_a):
        poller = Poller()
        poller.listen_destroyed(grace_ns=300_000_000)
    poller.poll()
    ports, servers = short_flows(testnet, family)
    wait_until(lambda: remnants(testnet, testnet.ns_a) == FLOWS)   # FINs acked (delayed ACK)
    reported: dict[int, list[int]] = {}
    remnants_seen = 0
    deadline = time.monotonic() + 2   # several times the grace: held remnants are settled
    while time.monotonic() < deadline:
        result = poller.poll()
        remnants_seen += result.destroy.remnants
        for change in result.changes + result.destroyed:
            if local_port(change.payload) in ports:
                reported.setdefault(local_port(change.payload), []).append(change.kind)
        time.sleep(0.05)
    assert reported == {port: [SHORT] for port in ports}
    assert remnants_seen == FLOWS
    assert remnants(testnet, testnet.ns_a) == FLOWS   # still there, still ignored
    for server in servers:
        server.close()


def test_an_unclaimed_time_wait_socket_is_recorded_after_the_grace(testnet):
    """A remnant no short flow claims (here: one that died before the poller started) is a
    connection of its own, as upstream records it, once the grace has passed."""
    ports, servers = short_flows(testnet, socket.AF_INET, n=1)
    wait_until(lambda: remnants(testnet, testnet.ns_a) == 1)
    with testnet.inside(testnet.ns_a):
        poller = Poller()
        poller.listen_destroyed(grace_ns=300_000_000)
    assert [c for c in poller.poll().changes if local_port(c.payload) in ports] == []
    time.sleep(0.35)
    (change,) = [c for c in poller.poll().changes if local_port(c.payload) in ports]
    assert change.kind == PREVIOUS_WAS_NIL and change.payload[1] == FIN_WAIT2
    servers[0].close()


def test_daemon_gives_each_short_flow_one_archive_and_one_open_close_pair(
        testnet, tmp_path: Path, daemons):
    testnet.exec(testnet.ns_a, "sysctl", "-qw", f"net.ipv4.tcp_fin_timeout={FIN_TIMEOUT_S}",
                 check=True)
    path, out = tmp_path / "events.sock", tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-poll-interval=2s",
                     f"-tcpinfo.eventsocket={path}", "-prometheusx.listen-address=127.0.0.1:9990")
    daemon.wait_for("First poll done")
    reader = subprocess.Popen([sys.executable, "-c", CLIENT, str(path)], stdout=subprocess.PIPE)
    wait_until(lambda: "event client connected" in daemon.text())
    ports, servers = short_flows(testnet, socket.AF_INET)
    ports6, servers6 = short_flows(testnet, socket.AF_INET6)
    ports |= ports6
    # The remnants live FIN_TIMEOUT_S, past what the core remembers of their short flows:
    # wait for them to die, then for two more polls.
    wait_until(lambda: remnants(testnet, testnet.ns_a) == 0, timeout=FIN_TIMEOUT_S + 10)
    time.sleep(4.5)
    exposition = scrape(testnet, testnet.ns_a)
    assert daemon.stop() == 0, daemon.text()
    reader.wait(5)

    series: dict[int, list[str]] = {}
    for uuid, files in archives(out).items():
        lines = [line for f in files for line in read_archive(f) if line.raw_idm is not None]
        port = local_port(lines[0].raw_idm)
        if port in ports:
            series.setdefault(port, []).append(uuid)
            assert [line.raw_idm[1] for line in lines] == [TCP_CLOSE]   # the kernel's last word
            assert lines[0].attributes[2], "the final record carries tcp_info"
    assert sorted(series) == sorted(ports)
    assert all(len(uuids) == 1 for uuids in series.values()), series

    events: dict[str, list[int]] = {}
    for line in reader.stdout.read().splitlines():
        event = orjson.loads(line)
        events.setdefault(event["UUID"], []).append(event["Event"])
    for (uuid,) in series.values():
        assert events.pop(uuid) == [0, 1]
    assert events == {}, f"events for other connections: {events}"
    assert metric(exposition, "tcpinfo_timewait_remnants_total") == 2 * FLOWS
    assert metric(exposition, 'tcpinfo_destroy_notifications_total{outcome="short"}') == 2 * FLOWS
    for server in servers + servers6:
        server.close()
