"""When the next poll starts: upstream's ticker cadence, optionally stretched to a CPU budget.

Upstream polls on a Go ticker: one poll per interval, and when a poll overruns, the next starts at
once, without a burst of catch-up polls.  At 100,000 connections a dump alone takes a third of a
second, so a collector that keeps polling flat out would hold a core forever; `-cpu-budget` caps
the share of one CPU the collector may use, stretching the interval when the polls cost more.
"""
from __future__ import annotations


class Cadence:
    """Decides each poll's start time from the last poll's start and the CPU used since."""

    def __init__(self, interval_ns: int, cpu_budget: float = 0.0) -> None:
        if interval_ns <= 0:
            raise ValueError("the poll interval must be positive")
        if cpu_budget < 0:
            raise ValueError("the CPU budget cannot be negative")
        self.interval_ns = interval_ns
        self.cpu_budget = cpu_budget          # share of one CPU; 0 = no budget
        self.period_ns = interval_ns          # the period chosen last (a metric)

    def next_start(self, started_ns: int, now_ns: int, cpu_ns: int) -> int:
        """The monotonic time at which the next poll starts.

        `started_ns` is when the poll just done started, `now_ns` is now, and `cpu_ns` the
        process's CPU time over the last cycle (everything, not only the poll).  With a budget the
        period is long enough that this cycle's CPU is within budget of it.  A period already
        over is not made up for: the next poll starts now.
        """
        period = self.interval_ns
        if self.cpu_budget:
            period = max(period, int(cpu_ns / self.cpu_budget))
        self.period_ns = period
        return max(started_ns + period, now_ns)
