"""Shared fixtures: real network namespaces for the tests that need sockets, metrics registries.

A test that builds namespaces (through the fixtures below, or marked `netns`) needs root; without
root it is skipped with that reason, and every other test still runs.  CI runs as root, so there
nothing is skipped.
"""
import os

import pytest
from prometheus_client import CollectorRegistry

from helpers.daemon import Daemon
from lab.netns import Topology
from tcpinfo.collector.metrics import Metrics

NAMESPACE_FIXTURES = {"testnet", "shaped_testnet", "daemons"}


def pytest_collection_modifyitems(config, items):
    root = os.geteuid() == 0
    skip = pytest.mark.skip(reason="builds network namespaces: run the tests as root")
    for item in items:
        if NAMESPACE_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.netns)
        if not root and item.get_closest_marker("netns"):
            item.add_marker(skip)


@pytest.fixture
def testnet():
    """Two namespaces joined by a veth pair (see lab/netns.py)."""
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


@pytest.fixture
def metrics():
    """The daemon's series on a registry of the test's own (what tcp-info builds at start)."""
    return Metrics(CollectorRegistry())
