"""Log-spaced histogram boundaries with explicit underflow and overflow bins.

TCP quantities span many orders of magnitude (an RTT from 10 µs on a LAN to seconds over a
satellite; flows from a hundred bytes to terabytes), so equal ratios between boundaries keep the
relative resolution the same everywhere, as stamp-bpf's log10 bins do.  In a Prometheus classic
histogram the first bucket (``le`` = the lowest boundary) is the underflow bin: it holds every
value at or below it, zero included; ``+Inf`` minus the highest finite bucket is the overflow bin.
Boundaries are rounded to three significant digits so the ``le`` labels read as typed.
"""
from __future__ import annotations

import math

MAX_BUCKETS = 100
"""Most finite boundaries one histogram may have: each is a series per label set."""


def log_buckets(low: float, high: float, per_decade: int) -> tuple[float, ...]:
    """Boundaries ``low × 10^(k/per_decade)`` for k = 0, 1, ... up to the first one >= high
    (``low`` itself exactly, the others to three significant digits).

    ValueError if the range is empty or not positive, or if it would need more than
    MAX_BUCKETS boundaries.
    """
    if not (0 < low < high) or math.isinf(high):
        raise ValueError(f"bucket range {low:g}:{high:g} must have 0 < low < high < infinity")
    if not 1 <= per_decade <= 10:
        raise ValueError(f"{per_decade} buckets per decade: want 1 to 10")
    steps = math.ceil(round(math.log10(high / low) * per_decade, 9))
    if steps + 1 > MAX_BUCKETS:
        raise ValueError(f"bucket range {low:g}:{high:g} at {per_decade} per decade needs "
                         f"{steps + 1} buckets; at most {MAX_BUCKETS}")
    base = math.log10(low)
    return (low, *(float(f"{10 ** (base + k / per_decade):.3g}") for k in range(1, steps + 1)))
