"""tcpinfo.health: a connection's summary and "why slow" class, checked against the kernel's own
counters, on the test data and on archives the collector writes of flows over a shaped link."""
from __future__ import annotations

import pytest

from helpers.connections import accumulate
from helpers.paths import NDT
from helpers.shaped_flows import FLOWS
from tcpinfo.archive.reader import expand_paths, read_archive
from tcpinfo.health.connection import (
    APP_BUSY_SHARE,
    LIMIT_SHARE,
    Accumulator,
    Summary,
    summarize,
)
from tcpinfo.kernel.tcp import decode_tcp_info


def kernel_shares(info: dict[str, int]) -> tuple[float, float]:
    """(rwnd-limited, sndbuf-limited) shares of busy time, straight from tcp_info."""
    busy = info["busy_time"]  # ms resolution: a trickle's may be 0
    return (info["rwnd_limited"] / busy, info["sndbuf_limited"] / busy) if busy else (0.0, 0.0)


def test_ndt_download_is_receive_window_limited_as_its_last_tcp_info_says() -> None:
    (acc,) = accumulate([NDT]).values()
    s = acc.summary()
    last = [line for _, line in read_archive(str(NDT))][-1]
    from tcpinfo.archive.record import decode_line
    info = decode_tcp_info(decode_line(last).attributes[2])
    rwnd, sndbuf = kernel_shares(info)
    assert rwnd > 0.9 and sndbuf == 0  # the kernel: stalled by the peer's window 95% of busy time
    assert s.why_slow == "receive_window"
    assert s.rwnd_limited_share == pytest.approx(rwnd, abs=1e-4)
    assert (s.bytes_acked, s.bytes_received, s.retransmits) == (
        info["bytes_acked"], info["bytes_received"], info["total_retrans"])
    assert s.retrans_share == pytest.approx(info["bytes_retrans"] / info["bytes_sent"], abs=1e-6)
    assert s.min_rtt_ms == info["min_rtt"] / 1000
    assert s.snapshots == 891 and s.duration_s == pytest.approx(10.66)
    assert "rwnd-limited 95.2%" in s.evidence


def test_test_data_connections_get_the_class_their_counters_imply() -> None:
    by_uuid = {k.rsplit("_", 1)[-1]: a.summary() for k, a in accumulate(
        p for p in expand_paths([str(NDT.parent.parent)]) if p.endswith(".jsonl.zst")).items()}
    # 6.18: a 1 MB receiver (the peer's limits), and a sender that wrote 1 MB at once then idled
    assert by_uuid["0000000000400950"].why_slow == "unknown"
    assert by_uuid["000000000040095D"].why_slow == "application"
    assert by_uuid["000000000040095D"].busy_share < APP_BUSY_SHARE
    # connections that never had data to send; a 2019 kernel without chrono counters
    assert by_uuid["000000000040096C"].why_slow == "application"
    assert all(s.why_slow == "unknown" and "busy_time" in s.evidence
               for k, s in by_uuid.items() if "archiveRecords" in k)


def test_summary_of_no_snapshots_says_unknown() -> None:
    s = Accumulator().summary()
    assert (s.snapshots, s.duration_s, s.why_slow) == (0, None, "unknown")
    assert isinstance(summarize({}), Summary)


@pytest.mark.parametrize("kind", FLOWS)
def test_shaped_flow_class_matches_the_kernels_own_counters(shaped_run, kind: str) -> None:
    flow = shaped_run.flows[kind]
    accs = accumulate(shaped_run.files())
    s = accs[flow.uuid].summary()
    info = flow.kernel
    rwnd, sndbuf = kernel_shares(info)
    # what the kernel's counters say about each flow, independently of the rule's code
    # (the flows are built to be dominated by their limit; how much varies with the machine's
    # load, e.g. 0.45-0.95 of busy time for the send buffer, so the bar is the rule's own)
    if kind == "receive_window":
        assert rwnd >= 2 * LIMIT_SHARE and rwnd > sndbuf, info
    elif kind == "send_buffer":
        assert sndbuf >= 2 * LIMIT_SHARE and sndbuf > rwnd, info
    else:
        assert max(rwnd, sndbuf) < LIMIT_SHARE, info
    if kind == "application":
        assert info["busy_time"] < 0.5 * 2e6, info  # busy under half of its 2 s
    assert s.why_slow == kind, s
    # the final record (the kernel's destroy notification) ends the archive: same counters
    assert s.bytes_acked - info["bytes_acked"] in (0, 1)  # the FIN
    assert s.retransmits >= info["total_retrans"]
    if info["busy_time"]:
        assert s.rwnd_limited_share == pytest.approx(rwnd, abs=0.02)
        assert s.sndbuf_limited_share == pytest.approx(sndbuf, abs=0.02)
    else:   # a trickle whose every write was acked within the counter's resolution: 0 of 0
        assert s.rwnd_limited_share is None and s.sndbuf_limited_share is None
    assert s.min_rtt_ms == pytest.approx(info["min_rtt"] / 1000, abs=0.001)
    assert s.rtt_min_ms <= s.rtt_mean_ms <= s.rtt_max_ms
    if kind == "network":
        assert info["total_retrans"] > 0 and f"({s.retransmits} segments" in s.evidence
        assert s.rtt_max_ms > 10  # the tbf queue: tens of ms
