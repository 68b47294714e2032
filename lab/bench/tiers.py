"""`python3 -m lab.bench tiers`: what the two tiers cost next to strict mode, in one run.

Three measurements, each side by side with strict mode (-strict: every socket dumped every
interval, one dump per family, as upstream does):
  * idle: the real tcp-info at its defaults in a namespace with no connection, on the host's own
    socket table (262,144 buckets on these machines), CPU as a share of one core from /proc;
  * mixed: N idle connections and K that send continuously; CPU share, and the records written for
    the active connections in the same window (the fidelity ratio), plus the discovery bound the
    daemon reports;
  * sweep: CPU and wall time of one full sweep (Poller.poll) at N connections, one walk and two
    dumps, one thread and two, next to the bare C loop that only receives the same walk (the floor;
    process CPU time, so a helper's CPU counts).
Needs root (namespaces).
"""
from __future__ import annotations

import multiprocessing
import os
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

from lab.bench.poll import _summary, _timed, close_connections, daemon_metrics, open_connections
from lab.netns import Topology
from tcpinfo.collector.poller import Poller

CLK_TCK = os.sysconf("SC_CLK_TCK")


def _cpu_s(pid: int) -> float:
    """User + system CPU seconds of a process, all its threads."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rpartition(")")[2].split()
    return (int(fields[11]) + int(fields[12])) / CLK_TCK


def _send(topo: Topology, port: int, count: int, ready, done) -> None:
    """Child: `count` connections a -> b:port that each send 1 KB every 10 ms until told to stop."""
    listener = topo.listen(port=port)
    pairs = []
    with topo.inside(topo.ns_a):
        for _ in range(count):
            client = socket.create_connection((topo.b4, port))
            pairs.append((client, listener.accept()[0]))
    ready.send(len(pairs))
    chunk = b"x" * 1024
    while not done.poll(0.01):
        for client, server in pairs:
            client.sendall(chunk)
            server.recv(65536)


def _senders(topo: Topology, count: int, port: int):
    ctx = multiprocessing.get_context("fork")
    ready_r, ready_w = ctx.Pipe(False)
    done_r, done_w = ctx.Pipe(False)
    proc = ctx.Process(target=_send, args=(topo, port, count, ready_w, done_r), daemon=True)
    proc.start()
    ready_r.recv()
    return proc, done_w


def _active_records(out: Path, port: int, start_ns: int, end_ns: int) -> int:
    """Records in [start_ns, end_ns) of the connections to b's `port` (the senders), from archives."""
    from tcpinfo.archive.reader import read_archive
    from tcpinfo.archive.record import decode_line
    from tcpinfo.kernel.inetdiag import IDM
    sport = IDM["sport"]
    total = 0
    for path in out.rglob("*.jsonl.zst"):
        lines = [line for line in (decode_line(text) for _, text in read_archive(str(path)))
                 if line.raw_idm is not None]
        if lines and int.from_bytes(lines[0].raw_idm[sport:sport + 2], "big") == port:
            total += sum(start_ns <= line.ts_ns < end_ns for line in lines)
    return total


def _daemon_window(topo: Topology, flags: list[str], seconds: float, expect: int,
                   active_port: int | None) -> dict:
    """Runs tcp-info in b until it has seen `expect` connections, then measures a window."""
    out = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    proc = topo.popen(topo.ns_b, "tcp-info", "-output", str(out),
                      "-prometheusx.listen-address=127.0.0.1:9990", *flags,
                      stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            time.sleep(0.5)
            try:
                if daemon_metrics(topo).get("tcpinfo_cache_count_histogram_count", 0) and \
                        sum(len(f) for _, _, f in os.walk(out)) >= expect:
                    break
            except OSError:
                continue
        time.sleep(2)   # past the first sweeps' burst of new archives
        cpu0, t0, w0 = _cpu_s(proc.pid), time.monotonic(), time.time_ns()
        time.sleep(seconds)
        cpu1, t1, w1 = _cpu_s(proc.pid), time.monotonic(), time.time_ns()
        values = daemon_metrics(topo)
        proc.send_signal(signal.SIGTERM)
        proc.wait(60)
        result = {"cpu_share": (cpu1 - cpu0) / (t1 - t0),
                  "sweeps": values.get("tcpinfo_sweeps_total", 0.0),
                  "bound_s": values.get("tcpinfo_discovery_bound_seconds", 0.0),
                  "active": values.get("tcpinfo_active_connections", 0.0)}
        if active_port is not None:
            result["active_records"] = _active_records(out, active_port, w0, w1)
        return result
    finally:
        if proc.poll() is None:
            proc.kill()
        shutil.rmtree(out, ignore_errors=True)


def bench_idle(seconds: float, rounds: int = 2) -> dict:
    """CPU share of tcp-info at defaults and in strict mode in an empty namespace, interleaved."""
    topo = Topology()
    try:
        runs: dict[str, list[float]] = {"tiers": [], "strict": []}
        for _ in range(rounds):
            for name, flags in (("tiers", []), ("strict", ["-strict"])):
                runs[name].append(_daemon_window(topo, flags, seconds, 0, None)["cpu_share"])
        return {name: sorted(v)[len(v) // 2] for name, v in runs.items()}
    finally:
        topo.destroy()


def bench_mixed(n: int, active: int, seconds: float, rounds: int = 2) -> dict:
    """Defaults and strict mode over the same connections, `rounds` windows each, interleaved; the
    window with the median CPU share of each."""
    topo = Topology()
    holders, senders = [], None
    try:
        holders = open_connections(topo, n)
        senders = _senders(topo, active, 4999)
        runs: dict[str, list[dict]] = {"tiers": [], "strict": []}
        for _ in range(rounds):
            for name, flags in (("tiers", []), ("strict", ["-strict"])):
                runs[name].append(_daemon_window(topo, flags, seconds, n + active, 4999))
        return {name: sorted(v, key=lambda r: r["cpu_share"])[len(v) // 2]
                for name, v in runs.items()}
    finally:
        if senders is not None:
            senders[1].send(True)
            senders[0].join(10)
        close_connections(holders)
        topo.destroy()


def bench_sweep(n: int, rounds: int) -> dict:
    """CPU and wall per full sweep at n idle connections: one walk vs two dumps, 1 vs 2 threads."""
    topo = Topology()
    holders = []
    try:
        holders = open_connections(topo, n)
        with topo.inside(topo.ns_b):
            one, two, threaded = Poller(), Poller(), Poller()
        one.set_one_walk(True)
        one.listen_destroyed()   # as the default does: its table keeps images, not messages
        threaded.set_threads(2)
        for _ in range(12):
            one.poll()
            two.poll()
            threaded._rebalance_at = 0
            threaded.poll()

        def floor_one() -> None:
            one.count_dump(0)

        def floor_two() -> None:
            one.count_dump(socket.AF_INET6)
            one.count_dump(socket.AF_INET)
        fns = {"one walk (default)": one.poll, "two dumps (strict)": two.poll,
               "two dumps, 2 threads": threaded.poll, "floor: one walk": floor_one,
               "floor: two dumps": floor_two}
        runs: dict[str, list] = {name: [] for name in fns}
        for _ in range(max(1, rounds // 4)):
            for name, fn in fns.items():
                runs[name].append(_timed(fn, 4))
        return {name: _summary(r) for name, r in runs.items()}
    finally:
        close_connections(holders)
        topo.destroy()


def run(n: int, active: int, seconds: float, rounds: int) -> str:
    lines = []
    idle = bench_idle(seconds)
    lines.append(f"idle namespace, host socket table: tcp-info defaults {idle['tiers']:.1%} of one "
                 f"core, strict mode {idle['strict']:.1%} (median of 2 interleaved {seconds:.0f} s "
                 "windows)")
    mixed = bench_mixed(n, active, seconds)
    t, s = mixed["tiers"], mixed["strict"]
    lines.append(f"{n} idle + {active} sending connections, median of 2 interleaved {seconds:.0f} s "
                 f"windows each: CPU defaults "
                 f"{t['cpu_share']:.1%}, strict {s['cpu_share']:.1%} (ratio "
                 f"{t['cpu_share'] / max(s['cpu_share'], 1e-9):.2f}); records of the active "
                 f"connections defaults {t['active_records']}, strict {s['active_records']} (ratio "
                 f"{t['active_records'] / max(s['active_records'], 1):.2f}); discovery bound "
                 f"{t['bound_s'] * 1e3:.0f} ms; active set {t['active']:.0f}")
    sweep = bench_sweep(n, rounds)
    floor_cpu = sweep["floor: one walk"][1]
    lines.append(f"one full sweep at {n} connections (median wall, mean CPU incl. helpers):")
    lines.append(f"| {'':22} | {'wall ms':>8} | {'CPU ms':>7} | {'vs floor':>8} |")
    lines.append(f"|{'-' * 24}|{'-' * 10}|{'-' * 9}|{'-' * 10}|")
    for name, (wall, cpu) in sweep.items():
        lines.append(f"| {name:22} | {wall * 1e3:8.2f} | {cpu * 1e3:7.2f} | {cpu / floor_cpu:7.2f}x |")
    return "\n".join(lines)
