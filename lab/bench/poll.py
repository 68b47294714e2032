"""`python3 -m lab.bench poll|filter|daemon`: what a poll costs, next to the kernel's floor and `ss`.

`poll` times one Poller.poll() on one and two dump threads against a bare C loop that only receives
the same dump and against `ss -tin`; `filter` compares filtering in userspace and in the kernel;
`daemon` runs the real tcp-info over N idle connections for its memory and achieved cadence.  All
three build private network namespaces (root).
"""
from __future__ import annotations

import multiprocessing
import os
import resource
import socket
import statistics
import subprocess
import time

from lab.netns import Topology
from tcpinfo.collector import shares
from tcpinfo.collector.poller import Poller
from tcpinfo.collector.sockfilter import Filter

PER_CHILD = 4000  # connections per holder process: 8,000 fds, under the 20,000 limit


def _hold(topo: Topology, port: int, count: int, ready, done, client_ns: str) -> None:
    """Child: opens `count` connections from client_ns to b:port and keeps them until told to stop."""
    listener = topo.listen(port=port)
    held = []
    with topo.inside(client_ns):
        for _ in range(count):
            client = socket.create_connection((topo.b4, port))
            held.append((client, listener.accept()[0]))
    ready.send(len(held))
    done.recv()


def open_connections(topo: Topology, n: int, port: int = 5000, same_ns: bool = False) -> list:
    """Starts holder processes until n connections exist (to b's ports from `port` up, one per
    holder; from a, or with `same_ns` from b itself, so that b holds both ends); returns their
    handles."""
    client_ns = topo.ns_b if same_ns else topo.ns_a
    # Ephemeral ports above the listeners' (port, port + 1, ...): with both ends in one
    # namespace a client could otherwise take a port that a later holder still has to bind.
    topo.exec(client_ns, "sysctl", "-qw", f"net.ipv4.ip_local_port_range={port + 1000} 65535")
    ctx = multiprocessing.get_context("fork")
    holders = []
    while n > 0:
        count = min(n, PER_CHILD)
        ready_r, ready_w = ctx.Pipe(False)
        done_r, done_w = ctx.Pipe(False)
        proc = ctx.Process(target=_hold, args=(topo, port, count, ready_w, done_r, client_ns),
                           daemon=True)
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


def _ports(holders: list, first: int) -> set[int]:
    return set(range(first, first + len(holders)))


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


def _summary(runs) -> tuple[float, float]:
    """Median wall and mean CPU over several _timed runs."""
    runs = list(runs)
    return statistics.median(w for w, _ in runs), statistics.mean(c for _, c in runs)


def _children_cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_CHILDREN)
    return ru.ru_utime + ru.ru_stime


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return 0.0


def bench_poll(n: int, rounds: int, peer_table: int = 16384) -> dict:
    """Times our poll against the bare loop and ss -tin over n idle connections.

    peer_table > 0 gives the client namespace its own socket hash table, so the dumps walk only
    the server's sockets, as on a host whose peers are elsewhere.
    """
    topo = Topology(peer_table=peer_table)
    holders = []
    try:
        holders = open_connections(topo, n)
        with topo.inside(topo.ns_b):
            poller, threaded = Poller(), Poller()
        threaded.set_threads(2)
        first = poller.poll()
        seen = first.inet.messages + first.inet6.messages
        for _ in range(12):
            poller.poll()  # let handshake-time counters settle
            threaded._rebalance_at = 0   # rebalance after every poll, not every 2 s, so that
            threaded.poll()              # the shares settle before the timing starts
        # Alternate them in short runs so that drift (frequency, the other core's load)
        # does not favour any.
        def bare_fn() -> None:
            poller.count_dump(socket.AF_INET6)
            poller.count_dump(socket.AF_INET)
        runs = [(_timed(poller.poll, 4), _timed(bare_fn, 4), _timed(threaded.poll, 4))
                for _ in range(max(1, rounds // 4))]
        # ss is started from a thread in b, so it runs there with one spawn and no wrapper
        # (`ip netns exec` would add ~2 ms of its own to every run).
        with topo.inside(topo.ns_b):
            ss = _timed(lambda: subprocess.run(("ss", "-tin"), stdout=subprocess.DEVNULL,
                                               check=True), max(3, rounds // 4))
        idle = [poller.poll(), threaded.poll()]
        return {"connections": n, "sockets_dumped": seen, "rounds": rounds,
                "peer_table": peer_table, "first_share": threaded.first_share,
                "tcpinfo": _summary(r[0] for r in runs), "bare": _summary(r[1] for r in runs),
                "threads2": _summary(r[2] for r in runs), "ss": ss,
                "changed_on_idle_poll": sum(len(r.changes) for r in idle), "rss_mb": _rss_mb()}
    finally:
        close_connections(holders)
        topo.destroy()


def bench_filter(excluded: int, included: int, rounds: int) -> dict:
    """Poll cost when most sockets are excluded: filtered in userspace vs by the kernel.

    `excluded` connections go to ports that -exclude-srcport names (as M-Lab excludes its
    operational ports), `included` ones to another port; the poller runs in b.
    """
    topo = Topology()
    holders = []
    try:
        holders = open_connections(topo, excluded, port=5000)
        kept = open_connections(topo, included, port=7000)
        holders += kept
        sockets = Filter(srcports=_ports(holders[:len(holders) - len(kept)], 5000))
        with topo.inside(topo.ns_b):
            user, kernel = Poller(sockets), Poller(sockets)
        refusal = kernel.filter_in_kernel(sockets)
        if refusal:
            raise RuntimeError(refusal)
        counts = [len(p.poll().changes) for p in (user, kernel)]
        runs = [(_timed(user.poll, 4), _timed(kernel.poll, 4)) for _ in range(max(1, rounds // 4))]
        return {"excluded": excluded, "included": included, "recorded": counts,
                "program_bytes": kernel.bytecode_size, "rounds": rounds,
                "userspace": (statistics.median(u[0] for u, _ in runs),
                              statistics.mean(u[1] for u, _ in runs)),
                "kernel": (statistics.median(k[0] for _, k in runs),
                           statistics.mean(k[1] for _, k in runs))}
    finally:
        close_connections(holders)
        topo.destroy()


def print_filter(r: dict) -> None:
    (uw, uc), (kw, kc) = r["userspace"], r["kernel"]
    print(f"{r['excluded']} excluded + {r['included']} included idle connections; recorded "
          f"(userspace, kernel): {r['recorded']}; program {r['program_bytes']} bytes; "
          f"median of {r['rounds']} polls")
    print(f"| {'filter':18} | {'wall ms/poll':>12} | {'CPU ms/poll':>11} |")
    print(f"|{'-' * 20}|{'-' * 14}|{'-' * 13}|")
    for name, w, c in (("userspace (C)", uw, uc), ("kernel bytecode", kw, kc)):
        print(f"| {name:18} | {w * 1e3:12.2f} | {c * 1e3:11.2f} |")
    print(f"filtering in the kernel makes a poll {uw / kw:.1f}x faster")


def _vm_rss_mb(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        return next(int(line.split()[1]) / 1024 for line in f if line.startswith("VmRSS:"))


def daemon_metrics(topo: Topology) -> dict[str, float]:
    """Every sample of the /metrics of a daemon listening on 127.0.0.1:9990 in namespace b."""
    import urllib.request
    with topo.inside(topo.ns_b):
        with urllib.request.urlopen("http://127.0.0.1:9990/metrics", timeout=10) as reply:
            text = reply.read().decode()
    values = {}
    for row in text.splitlines():
        if row and not row.startswith("#"):
            name, _, value = row.rpartition(" ")
            values[name] = float(value)
    return values


def _poll_totals(topo: Topology) -> tuple[float, float]:
    """(seconds, polls) so far from the daemon's tcpinfo_polling_interval_histogram."""
    values = daemon_metrics(topo)
    return (values["tcpinfo_polling_interval_histogram_sum"],
            values["tcpinfo_polling_interval_histogram_count"])


def bench_daemon(n: int, seconds: float, flags: list[str], same_ns: bool = False) -> dict:
    """Resident memory and achieved poll cadence of the real tcp-info over n idle connections,
    archives on tmpfs; with `same_ns` both ends are in the daemon's namespace (2n sockets)."""
    import shutil
    import signal
    import tempfile
    topo = Topology()
    holders, out = [], tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    try:
        holders = open_connections(topo, n, same_ns=same_ns)
        sockets = 2 * n if same_ns else n
        proc = topo.popen(topo.ns_b, "tcp-info", "-output", out,
                          "-prometheusx.listen-address=127.0.0.1:9990", *flags,
                          stderr=subprocess.DEVNULL)
        start = time.monotonic()
        files = 0
        while time.monotonic() - start < seconds + 120 and files < sockets:
            time.sleep(0.5)
            files = sum(len(f) for _, _, f in os.walk(out))
        sum0, count0 = _poll_totals(topo)
        time.sleep(seconds)
        sum1, count1 = _poll_totals(topo)
        rss = _vm_rss_mb(int(subprocess.check_output(["pgrep", "-P", str(proc.pid)]).split()[0])
                         if _is_wrapper(proc.pid) else proc.pid)
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(60)
        return {"connections": n, "tracked_sockets": sockets, "flags": flags, "archives": files,
                "rss_mb": round(rss, 1), "bytes_per_socket": round(rss * 2**20 / sockets),
                "achieved_interval_ms": round((sum1 - sum0) / max(count1 - count0, 1) * 1e3, 1),
                "polls_per_s": round((count1 - count0) / seconds, 1), "exit": code}
    finally:
        close_connections(holders)
        topo.destroy()
        shutil.rmtree(out, ignore_errors=True)


def _is_wrapper(pid: int) -> bool:
    """`ip netns exec` execs the program in place; be safe if it ever forks instead."""
    with open(f"/proc/{pid}/comm") as f:
        return f.read().strip() == "ip"


def print_poll(r: dict) -> None:
    (tw, tc), (bw, bc), (pw, pc), (sw, sc) = r["tcpinfo"], r["bare"], r["threads2"], r["ss"]
    table = (f"peers in their own {r['peer_table']}-bucket table" if r["peer_table"]
             else "peers in the same socket table")
    print(f"{r['connections']} idle connections ({r['sockets_dumped']} sockets dumped, {table}), "
          f"median of {r['rounds']} polls; changed records on an idle poll: "
          f"{r['changed_on_idle_poll']}; collector RSS {r['rss_mb']:.0f} MB; with 2 threads the "
          f"poll thread dumps {r['first_share']:.0%} of each split family")
    print(f"| {'':18} | {'wall ms/poll':>12} | {'CPU ms/poll':>11} | {'vs bare':>7} |")
    print(f"|{'-' * 20}|{'-' * 14}|{'-' * 13}|{'-' * 9}|")
    for name, w, c in (("tcpinfo, 1 thread", tw, tc), ("tcpinfo, 2 threads", pw, pc),
                       ("bare C loop", bw, bc), ("ss -tin", sw, sc)):
        print(f"| {name:18} | {w * 1e3:12.2f} | {c * 1e3:11.2f} | {w / bw:6.2f}x |")
    print(f"tcpinfo on 1 thread is {tw / bw:.3f}x the bare loop and {sw / tw:.1f}x faster than "
          f"ss -tin; on 2 dump threads (-dump-threads auto at this size: "
          f"{'yes' if tw > shares.ENGAGE_NS / 1e9 else 'no'}) {pw / bw:.3f}x and {sw / pw:.1f}x")
