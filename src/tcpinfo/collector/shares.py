"""How dump threads split a poll: which thread asks the kernel for which sockets.

Every dump of a family walks the kernel's whole socket hash table, whatever it selects, and
serializing a socket costs far more than skipping it.  So a thread gains only from the sockets it
does not serialize, and every family it dumps at all costs it one walk.  The plan therefore:

  * splits a family between the threads by port range (a socket's ports never change, so it stays
    in one share), choosing the local or the remote port, whichever the connections spread over
    more evenly;
  * gives a small family whole to the poll thread, so that the helpers skip it and save a walk;
  * gives the poll thread `first_share` of each split family, the helpers the rest in equal parts.
    The poll thread also diffs every buffer the helpers hand over, between its own receives, so
    its fair share is below 1/n by an amount that depends on the kernel and the machine:
    `rebalanced` finds it from how long each thread was busy.
"""
from __future__ import annotations

import socket
from collections.abc import Sequence
from dataclasses import dataclass

from tcpinfo.collector.sockfilter import both, port_share

FAMILIES = (socket.AF_INET6, socket.AF_INET)

# A family with fewer connections than this part of one thread's fair load goes whole to the
# poll thread: splitting it would cost every helper a walk for little.
WHOLE_BELOW = 0.75

# How much of the measured imbalance one rebalance corrects (less than all: the busy times are
# noisy, and the walks do not move with the shares).
GAIN = 0.8

# -dump-threads auto: helpers join when polls take longer than ENGAGE_NS and leave when polls
# (then about 0.65x as long) take less than RELEASE_NS; the gap keeps them from flapping.
ENGAGE_NS = 5_000_000
RELEASE_NS = 2_000_000
RELEASE_RATIO = RELEASE_NS / ENGAGE_NS
# Each helper walks the kernel's whole table again, so with few sockets to split (the walk, not
# their messages, is the cost) a helper only adds CPU: auto never engages below this many tracked.
SPLIT_MIN = 2000
# With a sweep period of P, helpers are worth their CPU only once a sweep takes half of it: a
# helper costs a walk of the table (1.1x the floor's CPU becomes 1.4x at 10,000 connections).
ENGAGE_SHARE = 0.5


def engage_ns(period_ns: int) -> float:
    """-dump-threads auto's threshold for polls `period_ns` apart: ENGAGE_NS, or half of a longer
    period (the tiers' sweeps are far apart, and a longer sweep still keeps up)."""
    return max(ENGAGE_NS, ENGAGE_SHARE * period_ns)


@dataclass(frozen=True)
class Spread:
    """How one family's tracked connections spread over ports: counts by the port's high byte."""
    local: Sequence[int] = (0,) * 256
    remote: Sequence[int] = (0,) * 256

    @property
    def total(self) -> int:
        return sum(self.local)


# A plan: for each thread, for each family, the program it sends (None: it skips the family).
Plan = list[dict[int, bytes | None]]


def _bounds(histogram: Sequence[int], targets: Sequence[float]) -> list[int]:
    """Bucket boundaries 0 = b0 <= b1 <= ... <= 256 whose shares come nearest the target parts."""
    total = sum(histogram)
    cumulative = [0]
    for count in histogram:
        cumulative.append(cumulative[-1] + count)
    bounds, goal = [0], 0.0
    for part in targets[:-1]:
        goal += part
        if total:
            bounds.append(min(range(bounds[-1], 257), key=lambda b: abs(cumulative[b] - total * goal)))
        else:
            bounds.append(max(bounds[-1], round(256 * goal)))
    return bounds + [256]


def _error(histogram: Sequence[int], bounds: list[int], targets: Sequence[float]) -> float:
    total = sum(histogram) or 1
    return max(abs(sum(histogram[a:b]) / total - part)
               for a, b, part in zip(bounds, bounds[1:], targets))


def _split(filter_program: bytes, spread: Spread, targets: Sequence[float]) -> list[bytes | None]:
    """Each thread's program for one family, by the port that comes nearest the targets."""
    options = []
    for local, histogram in ((False, spread.remote), (True, spread.local)):
        bounds = _bounds(histogram, targets)
        options.append((_error(histogram, bounds, targets), local, bounds))
    _, local, bounds = min(options, key=lambda option: option[0])  # a tie keeps the remote port
    programs: list[bytes | None] = []
    for first, last in zip(bounds, bounds[1:]):
        if first == last:
            programs.append(None)
        elif (first, last) == (0, 256):
            programs.append(filter_program)
        else:
            programs.append(both(filter_program, port_share(local, 256 * first, 256 * last - 1)))
    return programs


def plan(filter_program: bytes, n: int, spreads: dict[int, Spread], first_share: float) -> Plan:
    """Programs for n dump threads that together keep exactly what `filter_program` keeps.

    `spreads` holds each family's tracked connections; with none tracked yet, both families are
    split evenly by port range.
    """
    if n == 1:
        return [{family: filter_program for family in FAMILIES}]
    helper = (1 - first_share) / (n - 1)
    targets = [first_share] + [helper] * (n - 1)
    total = sum(spreads[f].total for f in FAMILIES)
    threads: Plan = [{} for _ in range(n)]
    for family in FAMILIES:
        count = spreads[family].total
        if total and count < WHOLE_BELOW * total / n and count < total / 2:
            programs = [filter_program] + [None] * (n - 1)
        else:
            programs = _split(filter_program, spreads[family], targets)
        for thread, program in zip(threads, programs):
            thread[family] = program
    return threads


def threads_wanted(current: int, most: int, poll_ns: float,
                   engage_ns: float = ENGAGE_NS, release_ns: float = RELEASE_NS,
                   worth_splitting: bool = True) -> int:
    """-dump-threads auto: how many threads the next polls should dump with.

    One thread costs the least CPU: each helper walks the kernel's table once more per poll
    (about a millisecond on a host with a large table) and wakes once per poll.  That is worth
    paying only when polls are long because of the sockets they carry (`worth_splitting`: at
    least SPLIT_MIN tracked), where a second thread cuts a poll to about two thirds.
    """
    if not worth_splitting:
        return 1
    if current == 1 and poll_ns > engage_ns:
        return most
    if current > 1 and poll_ns < release_ns:
        return 1
    return current


def rebalanced(first_share: float, busy_ns: Sequence[int]) -> float:
    """The poll thread's next share, moved so that the threads finish their dumps together.

    busy_ns[i]: how long thread i spent dumping since the last rebalance.  A poll ends when the
    slowest dump does (plus the diff of the helpers' replies), so the poll thread, which also diffs,
    takes less when it was the busier one and more when a helper was.
    """
    n = len(busy_ns)
    mine, helpers = busy_ns[0], sum(busy_ns[1:]) / max(1, n - 1)
    if n < 2 or mine + helpers <= 0:
        return first_share
    work = mine + (n - 1) * helpers
    step = GAIN * (mine - helpers) / work * (n - 1) / n
    return min(1.0, max(0.0, first_share - step))
