"""A C poller in a test namespace that hears destroy notifications, and waiting for them."""
from __future__ import annotations

import time

from tcpinfo.collector.poller import Poller
from tcpinfo.collector.sockfilter import Filter


def listening_poller(topo, ns: str, sockets: Filter | None = None,
                     grace_ns: int = 1_000_000_000) -> Poller:
    with topo.inside(ns):
        poller = Poller(sockets)
        poller.listen_destroyed(grace_ns=grace_ns)
    return poller


def drain_until(poller: Poller, cookies: set[int], timeout: float = 3.0) -> dict:
    """Destroy records by cookie, once every cookie in `cookies` has one."""
    seen: dict = {}
    deadline = time.monotonic() + timeout
    while not cookies <= seen.keys():
        assert time.monotonic() < deadline, f"no destroy notification for {cookies - seen.keys()}"
        seen.update({c.cookie: c for c in poller.drain().destroyed})
        time.sleep(0.01)
    return seen
