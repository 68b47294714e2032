"""Poll cadence: upstream's ticker, no catch-up bursts, and a CPU budget that stretches it."""
from __future__ import annotations

import os
import time

import pytest

from helpers.daemon import metric, scrape
from tcpinfo.collector.cadence import Cadence

MS = 1_000_000


def test_on_time_polls_keep_the_ticker_grid():
    cadence = Cadence(10 * MS)
    assert cadence.next_start(100 * MS, 103 * MS, 2 * MS) == 110 * MS


def test_an_overrun_starts_the_next_poll_at_once_and_never_a_burst():
    cadence = Cadence(10 * MS)
    late = cadence.next_start(100 * MS, 135 * MS, 35 * MS)
    assert late == 135 * MS
    assert cadence.next_start(late, late + 1 * MS, 1 * MS) == late + 10 * MS


def test_a_cpu_budget_stretches_the_period_to_cpu_over_budget():
    cadence = Cadence(10 * MS, cpu_budget=0.25)
    assert cadence.next_start(0, 5 * MS, 5 * MS) == 20 * MS
    assert cadence.period_ns == 20 * MS
    assert cadence.next_start(20 * MS, 21 * MS, 1 * MS) == 30 * MS   # cheap again: the interval


@pytest.mark.parametrize("interval,budget", [(0, 0.0), (10 * MS, -0.1)])
def test_nonsense_settings_are_refused(interval, budget):
    with pytest.raises(ValueError):
        Cadence(interval, budget)


def cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_daemon_stays_within_its_cpu_budget_and_reports_the_stretched_period(
        testnet, tmp_path, daemons):
    _held = testnet.open_many(3000)
    daemon = daemons(testnet, testnet.ns_a, tmp_path / "out", "-cpu-budget=5%",
                     "-prometheusx.listen-address=127.0.0.1:9990")
    daemon.wait_for("First poll done", timeout=30)
    time.sleep(1)   # the first poll's archives are written
    cpu0, wall0 = cpu_seconds(daemon.proc.pid), time.monotonic()
    time.sleep(4)
    used = (cpu_seconds(daemon.proc.pid) - cpu0) / (time.monotonic() - wall0)
    period = metric(scrape(testnet, testnet.ns_a), "tcpinfo_poll_period_seconds")
    assert daemon.stop(timeout=30) == 0, daemon.text()
    assert used <= 0.05 * 1.5, f"used {used:.3f} of a CPU against a 5% budget"
    assert period > 0.01, "a poll of 3,000 sockets costs more than 5% of 10 ms"
