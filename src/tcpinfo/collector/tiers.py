"""Which poll comes next: a sweep of the kernel's whole socket table, or a look-up of the active set.

A sweep (an inet_diag dump) walks every bucket of the kernel's established-socket hash table
whatever it returns: 262,144 buckets cost milliseconds of CPU on an empty host, so sweeping every
10 ms, as upstream does, takes half a core with no connection at all.  Exact look-ups cost a few
microseconds per socket whatever the table's size.  So, by default, the collector sweeps at most
every -sweep-interval (100 ms: the bound on how late a new connection is found) and, at each tick of
-poll-interval in between, looks up only the connections the sweeps found new or changed (the fast
tier, which a connection leaves after -active-linger without a change).  Active flows keep
upstream's resolution, idle ones are seen by every sweep, and closes still come from the kernel's
destroy notifications at once.

A sweep is started early by a little more than its own duration and a tick, so that from the start
of one to the end of the next is at most the period: the bound holds.  The sweep period adapts: it halves
after a sweep that found a connection new or newly active (down to -poll-interval, and never so far
that sweeps would take more than SWEEP_SHARE of a CPU), and doubles back to -sweep-interval after
one that found nothing.  Strict mode sweeps at every tick, as upstream does.
"""
from __future__ import annotations

SWEEP_SHARE = 0.10   # the discovery speed-up never spends more than this share of a CPU sweeping


class Tiers:
    """The schedule of sweeps and look-ups, from each sweep's start, end and discoveries."""

    def __init__(self, interval_ns: int, sweep_interval_ns: int, strict: bool = False) -> None:
        if interval_ns <= 0 or sweep_interval_ns < interval_ns:
            raise ValueError("want 0 < poll interval <= sweep interval")
        self.interval_ns = interval_ns
        self.sweep_interval_ns = sweep_interval_ns
        self.strict = strict
        self.period_ns = interval_ns if strict else sweep_interval_ns   # the sweep period chosen
        self.achieved_ns = 0      # between the starts of the last two sweeps
        self._next_sweep_ns = 0   # the first tick sweeps
        self._last_start_ns: int | None = None
        self._bound_ns = 0

    def sweep_due(self, now_ns: int) -> bool:
        """Whether the tick at `now_ns` sweeps (else it looks up the active set).

        Half a tick early counts as due, so that a sweep period of k ticks does not slip to k + 1.
        """
        return self.strict or now_ns >= self._next_sweep_ns - self.interval_ns // 2

    def swept(self, start_ns: int, end_ns: int, joined: int) -> None:
        """Records a sweep that ran from `start_ns` to `end_ns` and in which `joined` connections
        were found new or active again; sets the next sweep's time."""
        if self._last_start_ns is not None:
            self.achieved_ns = start_ns - self._last_start_ns
            # A connection that opened just after the previous sweep passed its bucket is found by
            # the end of this one at the latest.
            self._bound_ns = max(self._bound_ns, end_ns - self._last_start_ns)
        self._last_start_ns = start_ns
        if self.strict:
            return
        wanted = self.period_ns // 2 if joined else self.period_ns * 2
        affordable = int((end_ns - start_ns) / SWEEP_SHARE)
        self.period_ns = max(self.interval_ns, min(self.sweep_interval_ns, max(wanted, affordable)))
        # The bound is from one sweep's start to the next one's end: start the next early by this
        # one's length and a quarter more (sweeps vary), and by a tick, since it starts at a tick
        # of the look-ups, which a busy machine may also wake late.
        margin = (end_ns - start_ns) * 5 // 4 + self.interval_ns
        self._next_sweep_ns = start_ns + max(self.period_ns - margin, 0)

    def next_wake(self, tick_ns: int, active: int) -> int:
        """When the loop next polls, given the next tick of the cadence and the size of the active
        set: at that tick if it has connections to look up (or in strict mode), else at the sweep."""
        if self.strict or active:
            return tick_ns
        return max(tick_ns, self._next_sweep_ns)

    def take_bound(self) -> int:
        """The longest a new connection could have gone unseen since the last call (ns): a sweep's
        end minus the previous sweep's start, at its worst; then starts a new window."""
        bound, self._bound_ns = self._bound_ns, 0
        return bound
