"""Archives the real collector writes of four flows over a tbf-shaped link, each held back by a
different limit, with the kernel's own TCP_INFO of each sender read just before it closes.

The server side (namespace b, behind a 2 Mbit/s tbf with a 30 kB queue) sends; the collector
runs in b.  The flows run one after the other, so none shares the queue with another.  One
session-scoped run serves every test that needs such archives.
"""
from __future__ import annotations

import socket
import threading
import time
from pathlib import Path
from typing import NamedTuple

import pytest

from helpers.daemon import Daemon, archives, uuid_of
from lab.netns import Topology
from tcpinfo.kernel.tcp import decode_tcp_info

SECONDS = 2.0
FLOWS = ("network", "receive_window", "send_buffer", "application")


class Flow(NamedTuple):
    uuid: str
    kernel: dict[str, int]
    """The sender's TCP_INFO (getsockopt) once everything it sent was acknowledged."""


class ShapedRun(NamedTuple):
    out: Path
    flows: dict[str, Flow]

    def files(self) -> list[Path]:
        return sorted(p for paths in archives(self.out).values() for p in paths)


def _tcp_info(sock: socket.socket) -> dict[str, int]:
    return decode_tcp_info(sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 512))


def _drained(sock: socket.socket, timeout: float = 30.0) -> dict[str, int]:
    """The sender's TCP_INFO once nothing is unacknowledged or unsent."""
    deadline = time.monotonic() + timeout
    while True:
        info = _tcp_info(sock)
        if info["unacked"] == 0 and info["notsent_bytes"] == 0:
            return info
        assert time.monotonic() < deadline, f"never drained: {info}"
        time.sleep(0.01)


def _send(kind: str, sock: socket.socket, end: float) -> None:
    if kind == "application":  # a trickle: the sender has nothing to send most of the time
        while time.monotonic() < end:
            sock.sendall(b"a" * 500)
            time.sleep(0.05)
        return
    chunk = b"b" * 65536
    while time.monotonic() < end:
        sock.sendall(chunk)


def _receive(kind: str, sock: socket.socket, stop: threading.Event) -> None:
    while not stop.is_set():
        if kind == "receive_window":  # 25 kB/s, below its share of the link's 250 kB/s
            data = sock.recv(500)
            time.sleep(0.02)
        else:
            data = sock.recv(1 << 20)
        if not data:
            return
    sock.setblocking(False)  # drain whatever is left so the sender can finish
    deadline = time.monotonic() + 30
    while time.monotonic() < deadline:
        try:
            if not sock.recv(1 << 20):
                return
        except BlockingIOError:
            time.sleep(0.005)


def _gso_max_size(topo: Topology, size: int) -> None:
    """The largest GSO packet b's device takes (a socket reads it when it connects)."""
    result = topo.exec(topo.ns_b, "ip", "link", "set", "dev", topo.dev_b, "gso_max_size", str(size))
    assert result.returncode == 0, result.stderr


def _flow(topo: Topology, listener: socket.socket, kind: str) -> Flow:
    """One flow of ``kind`` for SECONDS, alone on the link; its sender's TCP_INFO once drained.

    The send-buffer flow's packets are one segment each (no GSO): one 64 kB GSO packet alone
    would overflow a 4 kB buffer, fill the congestion window and wait in the write queue, and the
    kernel counts a stall as send-buffer limited only when nothing is left unsent
    (tcp_cwnd_validate).
    """
    if kind == "send_buffer":
        _gso_max_size(topo, 1500)
    with topo.inside(topo.ns_a):
        client = socket.socket()
        if kind == "receive_window":  # a small receive buffer, read slowly: the window closes
            client.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 8192)
        client.connect(listener.getsockname()[:2])
    server, _ = listener.accept()
    if kind == "send_buffer":  # a small fixed send buffer (autotuning off)
        server.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
        _gso_max_size(topo, 65536)
    stop = threading.Event()
    reader = threading.Thread(target=_receive, args=(kind, client, stop))
    reader.start()
    _send(kind, server, time.monotonic() + SECONDS)
    stop.set()  # the receiver reads the rest at full speed
    flow = Flow(uuid_of(server), _drained(server))
    server.close()  # the archive ends when the data is delivered
    reader.join(35)
    client.close()
    return flow


def run_flows(topo: Topology, workdir: Path) -> ShapedRun:
    out = workdir / "out"
    daemon = Daemon(workdir, topo, topo.ns_b, out)
    try:
        daemon.wait_for("First poll done")
        listener = topo.listen()
        flows = {kind: _flow(topo, listener, kind) for kind in FLOWS}  # one at a time: no shared queue
        listener.close()
        time.sleep(0.3)  # the destroy notifications' final records
        assert daemon.stop() == 0, daemon.text()
    finally:
        daemon.kill()
    return ShapedRun(out, flows)


@pytest.fixture(scope="session")
def shaped_run(tmp_path_factory) -> ShapedRun:
    topo = Topology(shape_egress=True)
    try:
        return run_flows(topo, tmp_path_factory.mktemp("shaped"))
    finally:
        topo.destroy()
