"""Shared fixtures: real network namespaces for every test that needs sockets."""
import os

import pytest

from daemon_helpers import Daemon
from topology import Topology


def pytest_configure(config):
    if os.geteuid() != 0:
        raise pytest.UsageError("tcpinfo's tests create network namespaces: run them as root")


@pytest.fixture
def testnet():
    """Two namespaces joined by a veth pair (see tests/topology.py)."""
    topo = Topology()
    yield topo
    topo.destroy()


@pytest.fixture
def shaped_testnet():
    """Like testnet, but b's egress is a 2 Mbit/s tbf link with a small queue."""
    topo = Topology(shape_egress=True)
    yield topo
    topo.destroy()


@pytest.fixture
def daemons(tmp_path):
    """Starts tcp-info processes (Daemon(...) arguments); kills any still running at the end."""
    started: list[Daemon] = []

    def start(*args, **kw) -> Daemon:
        started.append(Daemon(tmp_path, *args, **kw))
        return started[-1]

    yield start
    for daemon in started:
        daemon.kill()
