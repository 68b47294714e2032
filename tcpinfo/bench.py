"""tcpinfo-bench: measure the collector where a user can reproduce it.

`tcpinfo-bench poll -n 10000` opens N idle TCP connections in a private pair of
network namespaces (held by several child processes, since one process may not
have 2N file descriptors) and prints, side by side, wall time and CPU per poll for:
  * tcpinfo: one Poller.poll() (dump both families, diff in C, nothing changed);
  * bare C loop: the same request, only received and counted (the kernel's floor);
  * ss -tin: iproute2 run once per poll, as a user would.
`csvtool` and `saver` time the converter and the write path.  Needs root (namespaces).
"""
from __future__ import annotations

import argparse
import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import sys
import time

from tcpinfo.netns import Topology
from tcpinfo.netlink import Poller

PER_CHILD = 4000  # connections per holder process: 8,000 fds, under the 20,000 limit


def _hold(topo: Topology, port: int, count: int, ready, done) -> None:
    """Child: opens `count` connections a -> b:port and keeps them until told to stop."""
    listener = topo.listen(port=port)
    held = []
    with topo.inside(topo.ns_a):
        for _ in range(count):
            client = socket.create_connection((topo.b4, port))
            held.append((client, listener.accept()[0]))
    ready.send(len(held))
    done.recv()


def open_connections(topo: Topology, n: int) -> list:
    """Starts holder processes until n connections exist; returns their handles."""
    topo.exec(topo.ns_a, "sysctl", "-qw", "net.ipv4.ip_local_port_range=1024 65535")
    ctx = multiprocessing.get_context("fork")
    holders, port = [], 5000
    while n > 0:
        count = min(n, PER_CHILD)
        ready_r, ready_w = ctx.Pipe(False)
        done_r, done_w = ctx.Pipe(False)
        proc = ctx.Process(target=_hold, args=(topo, port, count, ready_w, done_r), daemon=True)
        proc.start()
        holders.append((proc, ready_r, done_w))
        n -= count
        port += 1
    for _, ready_r, _ in holders:
        ready_r.recv()
    return holders


def close_connections(holders: list) -> None:
    for proc, _, done_w in holders:
        done_w.send(True)
        proc.join(10)


def _timed(fn, rounds: int) -> tuple[float, float]:
    """Median wall seconds and mean CPU seconds (ours + children) per call."""
    walls = []
    cpu0 = time.process_time() + _children_cpu()
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        walls.append(time.perf_counter() - t0)
    cpu = (time.process_time() + _children_cpu() - cpu0) / rounds
    return statistics.median(walls), cpu


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_poll(n: int, rounds: int) -> dict:
    """Times our poll against the bare loop and ss -tin over n idle connections."""
    topo = Topology()
    holders = []
    try:
        holders = open_connections(topo, n)
        with topo.inside(topo.ns_b):
            poller = Poller()
        first = poller.poll()
        seen = first.inet.messages + first.inet6.messages
        for _ in range(3):
            poller.poll()  # let handshake-time counters settle
        # Alternate the two in short runs so that drift (frequency, the other core's load)
        # does not favour either.
        bare_fn = lambda: (poller.count_dump(socket.AF_INET6), poller.count_dump(socket.AF_INET))
        runs = [(_timed(poller.poll, 4), _timed(bare_fn, 4)) for _ in range(max(1, rounds // 4))]
        ours = (statistics.median(o[0] for o, _ in runs), statistics.mean(o[1] for o, _ in runs))
        bare = (statistics.median(b[0] for _, b in runs), statistics.mean(b[1] for _, b in runs))
        ss_cmd = ("ip", "netns", "exec", topo.ns_b, "ss", "-tin")
        ss = _timed(lambda: subprocess.run(ss_cmd, stdout=subprocess.DEVNULL, check=True),
                    max(3, rounds // 4))
        idle = poller.poll()
        return {"connections": n, "sockets_dumped": seen, "rounds": rounds,
                "tcpinfo": ours, "bare": bare, "ss": ss,
                "changed_on_idle_poll": len(idle.changes), "rss_mb": _rss_mb()}
    finally:
        close_connections(holders)
        topo.destroy()


def _vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def bench_daemon(n: int, seconds: float) -> dict:
    """Resident memory of the real tcp-info over n idle connections, archives on tmpfs."""
    import shutil
    import signal
    import tempfile
    topo = Topology()
    holders, out = [], tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        holders = open_connections(topo, n)
        proc = topo.popen(topo.ns_b, "tcp-info", "-output", out, "-prometheusx.listen-address=",
                          stderr=subprocess.DEVNULL)
        start = time.monotonic()
        files = 0
        while time.monotonic() - start < seconds + 120 and files < n:
            time.sleep(0.5)
            files = sum(len(f) for _, _, f in os.walk(out))
        time.sleep(seconds)
        rss = _vm_rss_mb(int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
                         if _is_wrapper(proc.pid) else proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        return {"connections": n, "archives": files, "rss_mb": round(rss, 1), "exit": code}
    finally:
        close_connections(holders)
        topo.destroy()
        shutil.rmtree(out, ignore_errors=True)


def _is_wrapper(pid: int) -> bool:
    """`ip netns exec` execs the program in place; be safe if it ever forks instead."""
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip() == "ip"


def print_poll(r: dict) -> None:
    (tw, tc), (bw, bc), (sw, sc) = r["tcpinfo"], r["bare"], r["ss"]
    print(f"{r['connections']} idle connections ({r['sockets_dumped']} sockets dumped), "
          f"median of {r['rounds']} polls; changed records on an idle poll: "
          f"{r['changed_on_idle_poll']}; collector RSS {r['rss_mb']:.0f} MB")
    print(f"| {'':18} | {'wall ms/poll':>12} | {'CPU ms/poll':>11} | {'vs bare':>7} |")
    print(f"|{'-' * 20}|{'-' * 14}|{'-' * 13}|{'-' * 9}|")
    for name, w, c in (("tcpinfo poll", tw, tc), ("bare C loop", bw, bc), ("ss -tin", sw, sc)):
        print(f"| {name:18} | {w * 1e3:12.2f} | {c * 1e3:11.2f} | {w / bw:6.2f}x |")
    print(f"tcpinfo is {tw / bw:.3f}x the bare loop and {sw / tw:.1f}x faster than ss -tin")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="tcpinfo-bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("poll", help="poll cost vs the bare C loop and ss -tin")
    p.add_argument("-n", "--connections", type=int, default=10000)
    p.add_argument("-r", "--rounds", type=int, default=40)
    d = sub.add_parser("daemon", help="resident memory of tcp-info over N idle connections")
    d.add_argument("-n", "--connections", type=int, default=10000)
    d.add_argument("-s", "--seconds", type=float, default=10.0)
    c = sub.add_parser("csvtool", help="csvtool rows/s in the default schema")
    c.add_argument("-n", "--records", type=int, default=200_000)
    w = sub.add_parser("saver", help="end-to-end records/s: split, encode, compress, write")
    w.add_argument("-n", "--records", type=int, default=300_000)
    w.add_argument("--anonymize", action="store_true")
    args = ap.parse_args(argv)
    if args.what == "csvtool":
        from tcpinfo import bench_csvtool
        print(bench_csvtool.run(args.records))
        return 0
    if args.what == "saver":
        from tcpinfo import bench_saver
        print(bench_saver.run(args.records, anonymize=args.anonymize))
        return 0
    if os.geteuid() != 0:
        print("tcpinfo-bench: needs root to create network namespaces", file=sys.stderr)
        return 2
    if args.what == "daemon":
        print(bench_daemon(args.connections, args.seconds))
    if args.what == "poll":
        print_poll(bench_poll(args.connections, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
