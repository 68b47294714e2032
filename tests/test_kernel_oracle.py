"""What the collector decodes agrees with the kernel's own view: `ss -tinOem` and TCP_INFO."""
import os
import re
import socket
import struct
import time

import pytest

from lab.netns import cookie_of
from tcpinfo.collector.poller import Poller
from tcpinfo.kernel.inetdiag import ip_string, split_message
from tcpinfo.kernel.tcp import decode_tcp_info

TCP_INFO_LEN = 280
CGROUP_ID = 21


def bulk_transfer(server: socket.socket, client: socket.socket, nbytes: int) -> None:
    """Sends nbytes b -> a through the shaped link and waits until all are acknowledged."""
    payload = b"q" * nbytes
    server.setblocking(False)
    sent = 0
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        if sent < nbytes:
            try:
                sent += server.send(payload[sent:])
            except BlockingIOError:
                pass
        try:
            client.setblocking(False)
            client.recv(1 << 20)
        except BlockingIOError:
            pass
        info = kernel_info(server)
        if sent == nbytes and info["unacked"] == 0:
            time.sleep(0.3)  # let delayed ACKs and rtt samples settle
            return
        time.sleep(0.005)
    raise AssertionError("transfer did not finish")


def ss_line(topo, ns: str, port: int) -> str:
    out = topo.exec(ns, "ss", "-tinOem", "sport", f"= :{port}").stdout.splitlines()
    lines = [line for line in out if not line.startswith("State")]
    assert len(lines) == 1, out
    return lines[0]


def ss_field(line: str, name: str) -> str:
    m = re.search(rf"(?:^|\s){name}:(\S+)", line)
    assert m, f"{name} missing from {line}"
    return m.group(1)


def own_cgroup_id() -> int:
    """cgroup v2 id = inode of this process's cgroup directory on the cgroup2 mount."""
    path = next(line.split("::", 1)[1].strip() for line in open("/proc/self/cgroup")
                if line.startswith("0::"))
    mount = next(line.split()[1] for line in open("/proc/mounts") if line.split()[2] == "cgroup2")
    return os.stat(os.path.join(mount, path.lstrip("/"))).st_ino


def kernel_info(sock: socket.socket) -> dict:
    return decode_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, TCP_INFO_LEN))


def consistent_views(topo, server: socket.socket):
    """Our record, TCP_INFO and ss taken while the kernel's view stood still.

    A late window update or timer can move rtt between two reads; a view taken between two
    identical TCP_INFO reads is consistent, so retry until one is.
    """
    for _ in range(20):
        before = kernel_info(server)
        with topo.inside(topo.ns_b):
            poller = Poller()
        change = next(c for c in poller.poll().changes if c.cookie == cookie_of(server))
        line = ss_line(topo, topo.ns_b, server.getsockname()[1])
        after = kernel_info(server)
        poller.close()
        if {k: v for k, v in before.items() if not k.startswith("last_")} == \
                {k: v for k, v in after.items() if not k.startswith("last_")}:
            return change, after, line
        time.sleep(0.2)
    raise AssertionError("the kernel's view of the socket never stood still")


@pytest.mark.parametrize("family", [socket.AF_INET, socket.AF_INET6])
def test_decoded_snapshot_matches_ss_and_getsockopt(shaped_testnet, family):
    topo = shaped_testnet
    client, server, _ = topo.connect(family)
    client.sendall(b"request")
    bulk_transfer(server, client, 600_000)  # 2.4 s at 2 Mbit/s, overflowing a 30 KB queue
    change, kernel, line = consistent_views(topo, server)

    idm, attrs = split_message(change.payload)
    info = decode_tcp_info(attrs[2])
    sport, dport = struct.unpack(">HH", idm[4:8])
    assert idm[0] == family and idm[1] == 1 and line.startswith("ESTAB")
    assert (sport, dport) == (server.getsockname()[1], server.getpeername()[1])
    local, remote = (topo.b4, topo.a4) if family == socket.AF_INET else (topo.b6, topo.a6)
    assert (ip_string(idm[8:24], family), ip_string(idm[24:40], family)) == (local, remote)
    assert struct.unpack("<Q", idm[44:52])[0] == change.cookie == cookie_of(server)
    assert int(ss_field(line, "sk"), 16) == change.cookie

    for field in ("state", "rtt", "rttvar", "min_rtt", "snd_cwnd", "bytes_acked",
                  "bytes_received", "total_retrans", "snd_wscale", "rcv_wscale", "segs_out"):
        assert info[field] == kernel[field], field
    assert info["bytes_received"] == len(b"request")
    assert info["total_retrans"] > 0, "the shaped link should have forced retransmits"
    assert info["rtt"] > 10_000, "queueing behind 2 Mbit/s should add tens of ms"
    rtt_ms, rttvar_ms = (float(x) for x in ss_field(line, "rtt").split("/"))
    assert abs(rtt_ms * 1000 - info["rtt"]) < 1 and abs(rttvar_ms * 1000 - info["rttvar"]) < 1
    assert abs(float(ss_field(line, "minrtt")) * 1000 - info["min_rtt"]) < 1
    assert int(ss_field(line, "cwnd")) == info["snd_cwnd"]
    assert int(ss_field(line, "bytes_acked")) == info["bytes_acked"]
    assert int(ss_field(line, "retrans").split("/")[1]) == info["total_retrans"]
    assert ss_field(line, "wscale") == f"{info['snd_wscale']},{info['rcv_wscale']}"
    assert struct.unpack("<Q", attrs[CGROUP_ID])[0] == own_cgroup_id()
