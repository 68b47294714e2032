"""Benchmark: changed records per second through the daemon's hot path, on one core.

Per changed socket the collector optionally anonymizes the addresses, encodes the JSON line in C,
appends it to the saver, which compresses and writes frames (the C core counts the bytes for the
byte-rate histograms, not this step): the collector's own `RecordWriter`, which this drives, so the
benchmark cannot drift from the daemon.
It replays that path on realistic payloads (the attribute set of UPSTREAM.md §4.1, with the counters moving)
for 1,000 connections that all change on every simulated 10 ms poll.  Files go to a tmpfs
(/dev/shm) when there is one, so the number is the collector's CPU cost rather than the disk's: on
this machine's ext4 /tmp, creating a file alone takes about 0.5 ms.
"""
from __future__ import annotations

import base64
import os
import shutil
import struct
import tempfile
import time
from collections.abc import Callable

from prometheus_client import CollectorRegistry

from tcpinfo.collector.anonymize import Netblock
from tcpinfo.collector.daemon import RecordWriter
from tcpinfo.collector.metrics import Metrics
from tcpinfo.collector.saver import Saver
from tcpinfo.kernel.inetdiag import IDM
from tcpinfo.kernel.tcp import TCP_INFO

CONNECTIONS = 1000
POLL_NS = 10_000_000
VARIANTS = 16   # distinct snapshots per connection, so compression sees changing counters

# UPSTREAM.md §4.1: a real record from an NDT server (kernel 4.19), attributes 1..8.
_IDM = base64.b64decode("CgEBAILDwkIAAAAAAAAAAAAA//8/8/BlAAAAAAAAAAAAAP//rPsXygAAAACELQYAAAAAAFYB"
                        "AAAAAAAA5hcAAAAAAABZMC1W")
_ATTRIBUTES = {
    1: "AAAAAPYkAAAKCwAAAAAAAA==",
    2: "AQAAAAAGeACI4wcAQJwAALQFAAAYAgAABQAAAAAAAAAAAAAAAAAAAAAAAAAFAAAAAAAAAAgAAAAIAAAA3AUAAEB2"
       "AADDoAIAYVABAP///38KAAAAtAUAAAMAAAAAAAAAEHIAAAAAAABHlgIAAAAAAP//////////AAAAAAAAAAAFAgAA"
       "AAAAAAYAAAADAAAAAAAAAMOgAgABAAAABQAAAAAAAAAAAAAAiBMAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAQAAAAAA"
       "AADmFwAAAAAAAAAAAAAAAAAAAAAAAAAAAAA=",
    4: "Y3ViaWMA", 5: "AA==", 6: "AA==",
    7: "AAAAAIB6BQAAAAAAALQAAAoLAAD2JAAAAAAAAAAAAAAAAAAA", 8: "AA==",
}


def _payload(cookie: int, step: int) -> bytes:
    """A netlink inet_diag payload for one connection at one moment of its transfer."""
    idm = bytearray(_IDM)
    struct.pack_into("<Q", idm, IDM["cookie"], cookie)
    out = bytearray(idm)
    for attr_type, text in _ATTRIBUTES.items():
        value = bytearray(base64.b64decode(text))
        if attr_type == 2:   # move rtt, bytes_acked, bytes_received, segs_out like a transfer does
            struct.pack_into("<I", value, TCP_INFO.offsets["rtt"], 170_000 + 37 * step)
            struct.pack_into("<QQ", value, TCP_INFO.offsets["bytes_acked"], 1448 * 7 * step, 517 + step)
            struct.pack_into("<I", value, TCP_INFO.offsets["segs_out"], 6 + 7 * step)
        out += struct.pack("<HH", 4 + len(value), attr_type) + value
        out += bytes(-len(value) % 4)
    return bytes(out)


def run(n_records: int, anonymize: bool = False, directory: str | None = None,
        observe: Callable[[int, bytes, int], None] | None = None) -> dict:
    """Pushes n_records changed records through the collector's per-record step; returns the rates.

    `directory` is where the temporary archive tree goes (default: /dev/shm, else the temp dir);
    `observe(cookie, payload, ts)`, if given, is also called per record, as the collector would
    call the health aggregates.
    """
    payloads = [[_payload(0x60000 + c, s) for s in range(VARIANTS)] for c in range(CONNECTIONS)]
    cookies = [0x60000 + c for c in range(CONNECTIONS)]
    anonymizer = Netblock(["63.243.240.101"]) if anonymize else None
    if directory is None and os.path.isdir("/dev/shm"):
        directory = "/dev/shm"
    root = tempfile.mkdtemp(prefix="tcpinfo-bench-", dir=directory)
    try:
        metrics = Metrics(CollectorRegistry())
        saver = Saver(root, "bench-host_1700000000_unsafe", metrics)
        write = RecordWriter(saver, metrics, anonymizer).write
        ts = time.time_ns()
        done = 0
        start = time.perf_counter()
        cpu_start = time.process_time()
        while done < n_records:
            ts += POLL_NS
            variant = (done // CONNECTIONS) % VARIANTS
            for cookie, variants in zip(cookies, payloads):
                write(variants[variant], cookie, ts)
                if observe is not None:
                    observe(cookie, variants[variant], ts)
                done += 1
                if done == n_records:
                    break
            saver.flush_due(ts)
        saver.close(ts)
        seconds = time.perf_counter() - start
        cpu = time.process_time() - cpu_start
        written = sum(os.path.getsize(os.path.join(d, f))
                      for d, _, fs in os.walk(root) for f in fs)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return {"records": n_records, "seconds": round(seconds, 3), "cpu_seconds": round(cpu, 3),
            "records_per_s": round(n_records / seconds),
            "compressed_bytes_per_record": round(written / n_records, 1)}


if __name__ == "__main__":
    print(run(300_000))
    print("anonymized:", run(300_000, anonymize=True))
