"""`python3 -m lab.bench churn`: the highest rate of new connections at which every one is recorded.

A server in namespace b accepts connections and closes each once its client has sent a small
request and closed; client processes open them at a steady target rate, each closing `--hold` ms
after it connected (0: at once, so the polls rarely see it and only its destroy notification
records it).  The real `tcp-info` runs in b, archives on tmpfs; `--same-host` puts the clients in b
too, so it sees both ends (and the clients' TIME_WAIT sockets fill the table its dumps walk), and
`--no-caps` runs it without capabilities, as a container does, so the kernel keeps only
net.core.rmem_max of destroy notifications for it.  After each rate the collector is stopped and
the first record of every archive read: a rate passes when every end of every connection the server
accepted has exactly one archive.
"""
from __future__ import annotations

import base64
import collections
import multiprocessing
import os
import selectors
import shutil
import signal
import socket
import struct
import subprocess
import tempfile
import time

import orjson
import zstandard

from lab.bench.poll import daemon_metrics
from lab.netns import Topology

PORT = 7000
REQUEST = b"r" * 100


def _serve(topo: Topology, stop, accepted) -> None:
    """Child: accepts each connection and closes it once the client has closed; counts them."""
    listener = topo.listen(port=PORT)
    listener.setblocking(False)
    sel = selectors.DefaultSelector()
    sel.register(listener, selectors.EVENT_READ)
    count = 0
    while not stop.is_set():
        for key, _ in sel.select(0.2):
            if key.fileobj is listener:
                try:
                    conn, _ = listener.accept()
                except BlockingIOError:
                    continue
                count += 1
                sel.register(conn, selectors.EVENT_READ)
            elif not key.fileobj.recv(4096):   # the client's FIN
                sel.unregister(key.fileobj)
                key.fileobj.close()
    accepted.value = count


def _clients(topo: Topology, ns: str, rate: float, seconds: float, hold: float) -> None:
    """Child: opens connections from `ns` at `rate` per second for `seconds`, each sending a
    request and closing `hold` seconds later; paced without catch-up bursts."""
    period = 1.0 / rate
    held: collections.deque = collections.deque()
    with topo.inside(ns):
        start = next_at = time.monotonic()
        while next_at - start < seconds or held:
            now = time.monotonic()
            while held and held[0][0] <= now:
                held.popleft()[1].close()
            if next_at - start >= seconds:
                if not held:
                    break
                time.sleep(max(0.0, held[0][0] - now))
                continue
            if next_at > now:
                time.sleep(min(next_at, held[0][0] if held else next_at) - now)
                continue
            try:
                client = socket.create_connection((topo.b4, PORT), timeout=5)
                client.sendall(REQUEST)
                held.append((now + hold, client))
            except OSError:
                pass   # counted by the server side only if it was accepted
            next_at = max(next_at + period, now - period)


def _archived_ends(out: str) -> collections.Counter:
    """How many connections' archives hold a server end (local port PORT), a client end (remote
    port PORT) or anything else, from the records of each archive's first file (the kernel has
    been seen to report port 0 for a socket in LAST_ACK, so one record is not enough).  A socket
    recorded twice (say, once more for a time-wait remnant) counts twice."""
    ends: collections.Counter = collections.Counter()
    dctx = zstandard.ZstdDecompressor()
    for root, _, files in os.walk(out):
        for name in files:
            if ".00000." not in name:
                continue
            with open(os.path.join(root, name), "rb") as f:
                lines = dctx.stream_reader(f, read_across_frames=True).read().split(b"\n")
            end = "other"
            for line in filter(None, lines[1:]):
                idm = base64.b64decode(orjson.loads(line)["RawIDM"])
                sport, dport = struct.unpack_from("!HH", idm, 4)
                if PORT in (sport, dport):
                    end = "server" if sport == PORT else "client"
                    break
            ends[end] += 1
    return ends


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_rate(rate: float, seconds: float, workers: int, flags: list[str],
             same_host: bool = False, hold: float = 0.0, no_caps: bool = False) -> dict:
    """One rate: the collector's view of `rate` new connections per second for `seconds`.

    same_host: the clients run beside the server, so the collector sees both ends of every
    connection, and the clients' TIME_WAIT sockets fill the table its dumps walk."""
    topo = Topology(peer_table=0 if same_host else 16384)
    client_ns = topo.ns_b if same_host else topo.ns_a
    out = tempfile.mkdtemp(dir="/dev/shm" if os.path.isdir("/dev/shm") else None)
    ctx = multiprocessing.get_context("fork")
    try:
        for setting in ("net.ipv4.ip_local_port_range=1024 65535", "net.ipv4.tcp_tw_reuse=1"):
            topo.exec(client_ns, "sysctl", "-qw", setting)
        # As a container runs it (--cap-drop=ALL): without CAP_NET_ADMIN, the destroy
        # listener's buffer is capped by net.core.rmem_max.
        setpriv = ["setpriv", "--bounding-set=-all", "--inh-caps=-all"] if no_caps else []
        proc = topo.popen(topo.ns_b, *setpriv, "tcp-info", "-output", out,
                          "-prometheusx.listen-address=127.0.0.1:9990", *flags,
                          stderr=subprocess.DEVNULL)
        time.sleep(1.0)
        stop, accepted = ctx.Event(), ctx.Value("q", 0)
        server = ctx.Process(target=_serve, args=(topo, stop, accepted), daemon=True)
        server.start()
        time.sleep(0.3)
        before = daemon_metrics(topo)
        cpu0 = _cpu_seconds(proc.pid)
        clients = [ctx.Process(target=_clients, args=(topo, client_ns, rate / workers, seconds,
                                                      hold), daemon=True) for _ in range(workers)]
        started = time.monotonic()
        for c in clients:
            c.start()
        for c in clients:
            c.join()
        elapsed = time.monotonic() - started
        time.sleep(2.0)   # every connection closed, its notification read
        stop.set()
        server.join(5)
        after = daemon_metrics(topo)
        cpu = _cpu_seconds(proc.pid) - cpu0
        proc.send_signal(signal.SIGTERM)
        code = proc.wait(120)
        ends = _archived_ends(out)

        def delta(name: str) -> float:
            return after.get(name, 0.0) - before.get(name, 0.0)
        return {"target_per_s": rate, "achieved_per_s": round(accepted.value / elapsed),
                "accepted": accepted.value, "server_ends": ends["server"],
                "client_ends": ends["client"] if same_host else None, "other": ends["other"],
                "overruns": int(delta("tcpinfo_destroy_overruns_total")),
                "polls_per_s": round(delta("tcpinfo_polling_interval_histogram_count")
                                     / (elapsed + 2.3), 1),
                "cpu_share": round(cpu / (elapsed + 2.3), 2), "exit": code}
    finally:
        topo.destroy()
        shutil.rmtree(out, ignore_errors=True)


def run(rates: list[float], seconds: float, workers: int, flags: list[str],
        same_host: bool = False, hold: float = 0.0, no_caps: bool = False) -> str:
    """Every rate in turn; the table and the highest rate with every socket recorded."""
    rows = [run_rate(rate, seconds, workers, flags, same_host, hold, no_caps) for rate in rates]
    ends = "both ends observed" if same_host else "server end observed"
    lines = [f"{seconds:g} s per rate, connections held {hold * 1e3:g} ms, {workers} client "
             f"processes, {ends}, tcp-info {'without capabilities ' if no_caps else ''}"
             f"{' '.join(flags)}",
             "| target/s | achieved/s | accepted | server ends archived | client ends archived "
             "| overruns | polls/s | CPU (cores) |",
             "|---|---|---|---|---|---|---|---|"]
    for r in rows:
        client = "-" if r["client_ends"] is None else r["client_ends"]
        lines.append(f"| {r['target_per_s']:g} | {r['achieved_per_s']} | {r['accepted']} | "
                     f"{r['server_ends']} | {client} | {r['overruns']} | {r['polls_per_s']} | "
                     f"{r['cpu_share']} |")
    complete = [r["achieved_per_s"] for r in rows
                if r["server_ends"] == r["accepted"] and r["client_ends"] in (None, r["accepted"])
                and not r["other"]]
    lines.append(f"highest rate with every socket archived exactly once: "
                 f"{max(complete) if complete else 'none'} per second")
    return "\n".join(lines)
