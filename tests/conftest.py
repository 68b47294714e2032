"""Shared fixtures: real network namespaces for the tests that need sockets, metrics registries.

A test that needs root (namespaces, mounts, another user: through the fixtures named in
ROOT_FIXTURES, or marked `root`) is skipped without root, with that reason, and every other test
still runs.  CI runs as root, so there nothing is skipped.
"""
import os

import pytest
from prometheus_client import CollectorRegistry

from helpers.daemon import Daemon
from lab.netns import Topology
from tcpinfo.collector.metrics import Metrics

pytest_plugins = ["helpers.shaped_flows"]   # the session fixture of flows over a shaped link

ROOT_FIXTURES = {"testnet", "shaped_testnet", "daemons", "shared", "small_disk"}
"""Fixtures that build network namespaces, mount a file system or act as another user."""


def pytest_collection_modifyitems(config, items):
    root = os.geteuid() == 0
    skip = pytest.mark.skip(reason="needs root (namespaces, mounts or another user)")
    for item in items:
        if ROOT_FIXTURES & set(item.fixturenames):
            item.add_marker(pytest.mark.root)
        if not root and item.get_closest_marker("root"):
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
