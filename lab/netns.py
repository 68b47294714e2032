"""Private test hosts: two network namespaces joined by a veth pair, built with `ip`.

Used by the test suite and by the benchmark (never by the collector itself).

Addresses come from 198.18.0.0/15 and fd00::/8 so that upstream's "local address"
exclusion (loopback, link-local, multicast, unspecified) does not hide them.  Every
topology gets unique namespace names, so test runs in parallel do not collide.
"""
from __future__ import annotations

import contextlib
import ctypes
import itertools
import os
import socket
import subprocess
import threading
from collections.abc import Iterator

CLONE_NEWNET = 0x40000000
_libc = ctypes.CDLL(None, use_errno=True)
_counter = itertools.count()


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess:
    """Runs a command, failing loudly with its stderr."""
    proc = subprocess.run(args, capture_output=True, text=True)
    if check and proc.returncode != 0:
        raise RuntimeError(f"{' '.join(args)} failed: {proc.stderr.strip()}")
    return proc


def _setns(path: str) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        if _libc.setns(fd, CLONE_NEWNET) != 0:
            err = ctypes.get_errno()
            raise OSError(err, f"setns({path}): {os.strerror(err)}")
    finally:
        os.close(fd)


_CHILD_EHASH = "/proc/sys/net/ipv4/tcp_child_ehash_entries"


def _add_with_table(name: str, buckets: int) -> None:
    """Creates a namespace with a private TCP hash table (Linux >= 6.1).

    The size is read from the creating namespace's sysctl when the namespace is made, so the
    sysctl is set for that moment and then restored.
    """
    with open(_CHILD_EHASH) as f:
        previous = f.read().strip()
    with open(_CHILD_EHASH, "w") as f:
        f.write(str(buckets))
    try:
        run("ip", "netns", "add", name)
    finally:
        with open(_CHILD_EHASH, "w") as f:
            f.write(previous)


class Topology:
    """Namespaces `a` (client side) and `b` (server side) on one /24 and one /64."""

    def __init__(self, shape_egress: bool = False, peer_table: int = 0) -> None:
        """peer_table: if > 0, `a` gets its own TCP socket hash table of that many buckets, so
        that a dump in `b` walks only b's sockets, as on a host whose peers are other machines
        (by default both share the host's table, and b's dumps skip a's sockets too)."""
        tag = f"{os.getpid() % 100000}x{next(_counter)}"
        self.ns_a, self.ns_b = f"tpa{tag}", f"tpb{tag}"
        self.dev_a, self.dev_b = f"va{tag}"[:15], f"vb{tag}"[:15]
        self.a4, self.b4 = "198.18.0.1", "198.18.0.2"
        self.a6, self.b6 = "fd00:18::1", "fd00:18::2"
        if peer_table:
            _add_with_table(self.ns_a, peer_table)
        else:
            run("ip", "netns", "add", self.ns_a)
        run("ip", "netns", "add", self.ns_b)
        try:
            run("ip", "link", "add", self.dev_a, "netns", self.ns_a, "type", "veth",
                "peer", "name", self.dev_b, "netns", self.ns_b)
            for ns, dev, v4, v6 in ((self.ns_a, self.dev_a, self.a4, self.a6),
                                    (self.ns_b, self.dev_b, self.b4, self.b6)):
                self.ip(ns, "link", "set", "lo", "up")
                self.ip(ns, "addr", "add", f"{v4}/24", "dev", dev)
                self.ip(ns, "addr", "add", f"{v6}/64", "dev", dev, "nodad")
                self.ip(ns, "link", "set", dev, "up")
            if shape_egress:
                # No netem on this kernel: a slow link with a small queue gives tens of
                # ms of queueing delay and real retransmits under bulk traffic.
                self.shape(self.ns_b, self.dev_b)
        except Exception:
            self.destroy()
            raise

    def ip(self, ns: str, *args: str) -> subprocess.CompletedProcess:
        return run("ip", "-n", ns, *args)

    def shape(self, ns: str, dev: str, rate: str = "2mbit") -> None:
        run("ip", "netns", "exec", ns, "tc", "qdisc", "add", "dev", dev, "root", "tbf",
            "rate", rate, "burst", "3000", "limit", "30000")

    def exec(self, ns: str, *args: str, **kw) -> subprocess.CompletedProcess:
        """Runs a program inside a namespace and returns its completed process."""
        return subprocess.run(("ip", "netns", "exec", ns, *args), capture_output=True,
                              text=True, **kw)

    def popen(self, ns: str, *args: str, **kw) -> subprocess.Popen:
        return subprocess.Popen(("ip", "netns", "exec", ns, *args), **kw)

    @contextlib.contextmanager
    def inside(self, ns: str) -> Iterator[None]:
        """Moves the calling thread into `ns`; sockets created here belong to it."""
        home = os.open(f"/proc/self/task/{threading_native_id()}/ns/net", os.O_RDONLY)
        try:
            _setns(f"/var/run/netns/{ns}")
            yield
        finally:
            _libc.setns(home, CLONE_NEWNET)
            os.close(home)

    def connect(self, family: int = socket.AF_INET, port: int = 0,
                listener: socket.socket | None = None) -> tuple[socket.socket, socket.socket, socket.socket]:
        """Opens one TCP connection a -> b; returns (client, server side, listener)."""
        if listener is None:
            listener = self.listen(family, port)
        with self.inside(self.ns_a):
            client = socket.create_connection(listener.getsockname()[:2])
        server, _ = listener.accept()
        return client, server, listener

    def listen(self, family: int = socket.AF_INET, port: int = 0) -> socket.socket:
        """A listening socket in b on b's address of that family."""
        with self.inside(self.ns_b):
            listener = socket.socket(family, socket.SOCK_STREAM)
            listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            listener.bind((self.b4 if family == socket.AF_INET else self.b6, port))
            listener.listen(4096)
        return listener

    def open_many(self, n: int, family: int = socket.AF_INET) -> list[tuple[socket.socket, socket.socket]]:
        """Opens n idle connections a -> b (2n file descriptors in this process)."""
        listener = self.listen(family)
        pairs = []
        with self.inside(self.ns_a):
            for _ in range(n):
                client = socket.create_connection(listener.getsockname()[:2])
                pairs.append((client, listener.accept()[0]))
        listener.close()
        return pairs

    def destroy(self) -> None:
        for ns in (self.ns_a, self.ns_b):
            run("ip", "netns", "del", ns, check=False)


def threading_native_id() -> int:
    return threading.get_native_id()


def cookie_of(sock: socket.socket) -> int:
    """The kernel's socket cookie (SO_COOKIE), the key of every archive."""
    SO_COOKIE = 57
    return int.from_bytes(sock.getsockopt(socket.SOL_SOCKET, SO_COOKIE, 8), "little")
