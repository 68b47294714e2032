"""The self-report says what the kernel really shows the collector, as root and without any
capability, and reads the kernel's NTP state (set by the test, then restored)."""
from __future__ import annotations

import ctypes
import json
import os
import subprocess
import sys
import time

from prometheus_client import CollectorRegistry

from helpers.health import samples, scrape, serve
from tcpinfo.collector import selfcheck
from tcpinfo.collector.selfcheck import SelfCheckMetrics, read_clock, self_report

# Run inside a test namespace, as is or with every capability dropped: the report, what a real
# dump of the namespace's connection carries, and whether entering another namespace works.
PROBE = r"""
import ctypes, json, os, sys
from tcpinfo.collector.selfcheck import self_report
from tcpinfo.kernel.inetdiag import INET_DIAG_CLASS_ID, INET_DIAG_MARK, split_message
from tcpinfo.collector.poller import Poller
from tcpinfo.collector.sockfilter import Filter
report = self_report()
_, attributes = split_message(Poller(Filter()).poll().changes[0].payload)
libc = ctypes.CDLL(None, use_errno=True)
entered = libc.setns(os.open(sys.argv[1], os.O_RDONLY), 0x40000000) == 0   # CLONE_NEWNET
print(json.dumps({
    "caps": report.capabilities,
    "features": {f.name: f.available for f in report.features},
    "mark_sent": len(attributes) > INET_DIAG_MARK and attributes[INET_DIAG_MARK] is not None,
    "class_id_sent": len(attributes) > INET_DIAG_CLASS_ID and
                     attributes[INET_DIAG_CLASS_ID] is not None,
    "entered_other_netns": entered,
    "clock": None if report.clock is None else report.clock.synchronised,
    "log": report.log_lines(),
}))
"""


def probe(testnet, *wrapper: str) -> dict:
    out = subprocess.run(["ip", "netns", "exec", testnet.ns_a, *wrapper, sys.executable, "-P",
                          "-c", PROBE, f"/var/run/netns/{testnet.ns_b}"],
                         capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_capability_report_matches_what_the_kernel_shows_with_and_without_capabilities(testnet):
    keep = testnet.connect()
    root = probe(testnet)
    bare = probe(testnet, "setpriv", "--inh-caps=-all", "--bounding-set=-all")
    del keep
    assert root["features"] == {"mark": True, "netns": True}
    assert root["mark_sent"] and root["entered_other_netns"]
    assert bare["caps"] == 0
    assert bare["features"] == {"mark": False, "netns": False}
    assert not bare["mark_sent"] and not bare["entered_other_netns"]
    assert root["class_id_sent"] and bare["class_id_sent"]   # needs no capability
    assert "Not visible: INET_DIAG_MARK (the socket mark) in records (needs CAP_NET_ADMIN)" \
        in bare["log"]
    assert root["clock"] == bare["clock"]      # reading the clock needs no privilege


ADJ_MAXERROR, ADJ_ESTERROR, ADJ_STATUS = 0x0004, 0x0008, 0x0010


def _adjtimex(tx) -> int:
    state = selfcheck._libc.adjtimex(ctypes.byref(tx))
    assert state >= 0, os.strerror(ctypes.get_errno())
    return state


def test_clock_state_follows_the_kernels_ntp_state_and_is_exported():
    before = selfcheck._Timex()
    _adjtimex(before)
    registry = CollectorRegistry()
    SelfCheckMetrics(self_report(), registry)
    url, http = serve(registry)
    try:
        for synced in (True, False):
            tx = selfcheck._Timex(modes=ADJ_STATUS | ADJ_MAXERROR | ADJ_ESTERROR,
                                  maxerror=1234, esterror=56)
            tx.status = before.status & ~selfcheck.STA_UNSYNC if synced else \
                before.status | selfcheck.STA_UNSYNC
            _adjtimex(tx)
            set_at = time.monotonic()
            clock = read_clock()
            assert clock.synchronised is synced
            assert clock.state == ("TIME_OK" if synced else "TIME_ERROR")
            assert clock.est_error_us == 56
            # the kernel adds 500 µs of max error per second since it was set
            assert 1234 <= clock.max_error_us <= 1234 + 500 * (time.monotonic() - set_at + 1)
            assert clock.metadata() == {"Clock": {
                "Synchronised": synced, "State": clock.state,
                "MaxErrorMicroseconds": clock.max_error_us, "EstErrorMicroseconds": 56}}
            text = scrape(url)[1]
            assert samples(text, "tcpinfo_clock_synchronised")[0].value == int(synced)
            assert samples(text, "tcpinfo_clock_estimated_error_seconds")[0].value == 56e-6
            assert samples(text, "tcpinfo_feature_visible", feature="mark",
                           capability="CAP_NET_ADMIN")[0].value == 1
    finally:
        http.shutdown()
        restore = selfcheck._Timex(modes=ADJ_STATUS | ADJ_MAXERROR | ADJ_ESTERROR,
                                   status=before.status, maxerror=before.maxerror,
                                   esterror=before.esterror)
        _adjtimex(restore)
    after = read_clock()
    assert after.status == before.status and after.est_error_us == before.esterror
