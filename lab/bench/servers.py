"""Benchmark: the daemon's poll rate and CPU per poll while clients load its event socket and /metrics.

The real tcp-info runs in a private namespace over a few idle connections, with its event socket and
/metrics server on, and each load runs as its own process beside it, as an unprivileged local user or
a scanner would:
  * a connect/close loop on the event socket, as fast as one process can go;
  * event clients that connect and never read, held;
  * slow HTTP clients (half send nothing, half a partial request), held, then closed at once.
For every window it prints polls per second, daemon CPU per poll (all its threads: what the servers
cost lands here), and the peak threads, open file descriptors and resident memory.

    python3 -m lab.bench.servers [-s SECONDS] [--tcp-info PATH]   (from the checkout root)

The loads are subcommands too (`flood-events`, `hold-events`, `hold-http`), so the tests start the
very same load processes.  Needs root (namespaces).
"""
from __future__ import annotations

import argparse
import errno
import os
import re
import resource
import select
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path

from lab import CHECKOUT
from lab.netns import Topology

METRICS_PORT = 9990
PARTIAL_REQUEST = b"GET /metrics HTTP/1.1\r\nHost: x\r\n"   # no blank line: never complete


def raise_fd_limit() -> None:
    """Lets this process hold thousands of client sockets (the hard limit here is 20,000)."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))


class _TimeUp(Exception):
    pass


def _time_up(*_args) -> None:
    raise _TimeUp()


def flood_events(path: str, seconds: float) -> tuple[int, int]:
    """Connects to the event socket and hangs up, over and over; returns (connections, failures).

    Connects block, as a plain client's do, so a full backlog paces the loop instead of making it
    spin; a timer ends the loop even inside a connect that never completes.
    """
    done = failed = 0
    signal.signal(signal.SIGALRM, _time_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        while True:
            with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as s:
                try:
                    s.connect(path)
                    done += 1
                except OSError:
                    failed += 1
    except _TimeUp:
        return done, failed


def connect_unix(path: str, n: int, seconds: float = 30.0) -> list[socket.socket]:
    """Up to n event clients that never read, connected within `seconds` (blocking connects)."""
    held: list[socket.socket] = []
    signal.signal(signal.SIGALRM, _time_up)
    signal.setitimer(signal.ITIMER_REAL, seconds)
    try:
        while len(held) < n:
            s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            held.append(s)
            s.connect(path)
    except (_TimeUp, OSError):
        held.pop().close()
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
    return held


def connect_slow_http(host: str, port: int, n: int, timeout: float = 10.0) -> list[socket.socket]:
    """n TCP connections to the server; every other one sends a partial request, none completes.

    Connects without blocking, so a server whose backlog overflows delays nothing but the
    connections it drops; those are left out of the result.
    """
    pending = []
    for _ in range(n):
        s = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET)
        s.setblocking(False)
        code = s.connect_ex((host, port))
        if code not in (0, errno.EINPROGRESS):
            s.close()
            continue
        pending.append(s)
    poller = select.poll()
    by_fd = {s.fileno(): s for s in pending}
    for fd in by_fd:
        poller.register(fd, select.POLLOUT)
    connected = []
    deadline = time.monotonic() + timeout
    while by_fd and time.monotonic() < deadline:
        for fd, _ in poller.poll(100):
            s = by_fd.pop(fd)
            poller.unregister(fd)
            if s.getsockopt(socket.SOL_SOCKET, socket.SO_ERROR):
                s.close()
                continue
            if len(connected) % 2:
                try:
                    s.send(PARTIAL_REQUEST)
                except OSError:
                    pass
            connected.append(s)
    for s in by_fd.values():
        s.close()
    return connected


def _hold(held: list[socket.socket]) -> None:
    """Reports how many are held, keeps them until stdin closes, then closes them all at once."""
    print(f"held {len(held)}", flush=True)
    sys.stdin.read()
    for s in held:
        s.close()
    print("closed", flush=True)


class Load:
    """A load process in the daemon's namespace; `held` is what it reported once ready."""

    def __init__(self, topo: Topology, ns: str, *args: str) -> None:
        self.proc = topo.popen(ns, sys.executable, "-m", "lab.bench.servers", *args, cwd=CHECKOUT,
                               stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.held = 0

    def wait_held(self) -> int:
        """Blocks until a hold-* load has its clients; returns how many."""
        line = self.proc.stdout.readline()
        assert line.startswith("held "), f"load process failed: {line!r}"
        self.held = int(line.split()[1])
        return self.held

    def release(self) -> str:
        """Closes every held client at once (or waits for a timed load); returns its last line."""
        out, _ = self.proc.communicate(timeout=120)
        return out.strip().splitlines()[-1] if out.strip() else ""

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


# ---------------------------------------------------------------------------------------------
# What the daemon looks like from outside.

def proc_status(pid: int) -> dict:
    """Threads, open fds, resident MB and CPU seconds (user + system, all threads) of a process."""
    with open(f"/proc/{pid}/status") as f:
        status = f.read()
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return {"threads": int(re.search(r"^Threads:\s+(\d+)", status, re.M)[1]),
            "fds": len(os.listdir(f"/proc/{pid}/fd")),
            "rss_mb": int(re.search(r"^VmRSS:\s+(\d+)", status, re.M)[1]) / 1024,
            "cpu_s": (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")}


def polls(topo: Topology, ns: str, port: int = METRICS_PORT,
          timeout: float = 30.0) -> tuple[float, float]:
    """(polls, seconds between their starts) so far, from tcpinfo_polling_interval_histogram."""
    with topo.inside(ns):
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=timeout) as r:
            text = r.read().decode()
    values = [float(re.search(rf"^tcpinfo_polling_interval_histogram_{name} (\S+)$", text, re.M)[1])
              for name in ("count", "sum")]
    return values[0], values[1]


def measure(topo: Topology, ns: str, pid: int, seconds: float) -> dict:
    """Polls per second and CPU ms per poll over a window, and the process's peak threads, open
    fds and resident MB, sampled every 0.1 s.

    The rate is the daemon's own: polls over the time between their starts, so a scrape that
    waits (e.g. for a SYN retry while slow clients fill the backlog) does not count as slow polls.
    """
    (n0, s0), c0 = polls(topo, ns), proc_status(pid)["cpu_s"]
    peak = proc_status(pid)
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        time.sleep(0.1)
        now = proc_status(pid)
        peak = {k: max(v, now[k]) for k, v in peak.items()}
    n1, s1 = polls(topo, ns)
    cpu = proc_status(pid)["cpu_s"]
    return {"polls_per_s": (n1 - n0) / max(s1 - s0, 1e-9),
            "cpu_ms_per_poll": (cpu - c0) * 1e3 / max(n1 - n0, 1),
            "threads": peak["threads"], "fds": peak["fds"], "rss_mb": peak["rss_mb"]}


# ---------------------------------------------------------------------------------------------
# The benchmark.

def bench(tcp_info: str, seconds: float) -> list[tuple[str, dict]]:
    topo = Topology()
    out = Path(tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None))
    path = str(out / "events.sock")
    held = [topo.connect() for _ in range(20)]
    rows: list[tuple[str, dict]] = []
    loads: list[Load] = []
    with open(out / "tcp-info.log", "wb") as log:
        daemon = topo.popen(topo.ns_b, tcp_info, "-output", str(out / "archive"),
                            f"-prometheusx.listen-address=127.0.0.1:{METRICS_PORT}",
                            f"-tcpinfo.eventsocket={path}", stderr=log)
    try:
        deadline = time.monotonic() + 30
        while not os.path.exists(path) or not _answers(topo):
            assert daemon.poll() is None and time.monotonic() < deadline, "tcp-info did not start"
            time.sleep(0.1)
        pid = daemon.pid
        time.sleep(2)   # past the first polls and startup
        rows.append(("idle", measure(topo, topo.ns_b, pid, seconds)))

        flood = Load(topo, topo.ns_b, "flood-events", path, str(seconds + 2))
        loads.append(flood)
        time.sleep(1)
        rows.append(("event connect/close loop", measure(topo, topo.ns_b, pid, seconds)))
        rows[-1][1]["load"] = flood.release()
        rows.append(("after the loop", measure(topo, topo.ns_b, pid, seconds)))

        for n in (1000, 3000):
            hold = Load(topo, topo.ns_b, "hold-http", "127.0.0.1", str(METRICS_PORT), str(n))
            loads.append(hold)
            hold.wait_held()
            rows.append((f"{n} slow HTTP clients held", measure(topo, topo.ns_b, pid, seconds)))
            rows[-1][1]["load"] = f"{hold.held} connected"
            hold.release()
            rows.append((f"just after closing the {n}", measure(topo, topo.ns_b, pid, seconds)))

        hold = Load(topo, topo.ns_b, "hold-events", path, "1000")
        loads.append(hold)
        hold.wait_held()
        rows.append(("1000 event clients held, never reading",
                     measure(topo, topo.ns_b, pid, seconds)))
        rows[-1][1]["load"] = f"{hold.held} connected"
        hold.release()
        rows.append(("after they hang up", measure(topo, topo.ns_b, pid, seconds)))

        started = time.monotonic()
        daemon.send_signal(signal.SIGTERM)
        code = daemon.wait(60)
        rows.append(("SIGTERM", {"exit": code, "seconds": time.monotonic() - started}))
        return rows
    finally:
        for load in loads:
            load.kill()
        if daemon.poll() is None:
            daemon.kill()
            daemon.wait()
        for pair in held:
            for s in pair:
                s.close()
        topo.destroy()
        shutil.rmtree(out, ignore_errors=True)


def _answers(topo: Topology) -> bool:
    try:
        polls(topo, topo.ns_b, timeout=2)
    except OSError:
        return False
    return True


def print_rows(rows: list[tuple[str, dict]]) -> None:
    print(f"| {'load':40} | {'polls/s':>7} | {'CPU ms/poll':>11} | {'threads':>7} | {'fds':>5} | "
          f"{'RSS MB':>6} | load |  (threads, fds, RSS: peaks)")
    print(f"|{'-' * 42}|{'-' * 9}|{'-' * 13}|{'-' * 9}|{'-' * 7}|{'-' * 8}|------|")
    for name, r in rows:
        if "polls_per_s" not in r:
            print(f"| {name:40} | exit {r['exit']} after {r['seconds']:.2f} s")
            continue
        print(f"| {name:40} | {r['polls_per_s']:7.1f} | {r['cpu_ms_per_poll']:11.3f} | "
              f"{r['threads']:7d} | {r['fds']:5d} | {r['rss_mb']:6.1f} | {r.get('load', '')} |")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m lab.bench.servers", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-s", "--seconds", type=float, default=10.0, help="length of each window")
    ap.add_argument("--tcp-info", default="tcp-info", help="the daemon to run (default: PATH's)")
    sub = ap.add_subparsers(dest="load")
    f = sub.add_parser("flood-events", help="connect/close loop on the event socket")
    f.add_argument("path")
    f.add_argument("seconds", type=float)
    e = sub.add_parser("hold-events", help="hold event clients that never read")
    e.add_argument("path")
    e.add_argument("n", type=int)
    h = sub.add_parser("hold-http", help="hold slow HTTP clients")
    h.add_argument("host")
    h.add_argument("port", type=int)
    h.add_argument("n", type=int)
    args = ap.parse_args(argv)
    if args.load == "flood-events":
        done, failed = flood_events(args.path, args.seconds)
        print(f"{done} connections, {failed} failed")
        return 0
    if args.load in ("hold-events", "hold-http"):
        raise_fd_limit()
        _hold(connect_unix(args.path, args.n) if args.load == "hold-events"
              else connect_slow_http(args.host, args.port, args.n))
        return 0
    if os.geteuid() != 0:
        print("lab.bench.servers: needs root to create network namespaces", file=sys.stderr)
        return 2
    print_rows(bench(args.tcp_info, args.seconds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
