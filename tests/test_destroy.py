"""The kernel's destroy notifications: final records, short flows, and what polls still close."""
from __future__ import annotations

import json
import signal
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

from helpers.poller import drain_until, listening_poller
from lab.netns import cookie_of
from tcpinfo.collector.poller import FINAL, SHORT, Poller
from tcpinfo.collector.sockfilter import Filter
from tcpinfo.kernel.inetdiag import split_message
from tcpinfo.kernel.tcp import decode_tcp_info

TCP_CLOSE = 7
INFO = 2


def drained_stat(poller: Poller, name: str, timeout: float = 3.0) -> int:
    """Drains until the DestroyStats counter `name` moves; asserts nothing was recorded meanwhile."""
    deadline = time.monotonic() + timeout
    total = 0
    while not total and time.monotonic() < deadline:
        result = poller.drain()
        assert result.destroyed == []
        total += getattr(result.destroy, name)
    return total


def info_of(payload: bytes) -> dict:
    _, attributes = split_message(payload)
    return decode_tcp_info(attributes[INFO])


def test_closing_a_polled_connection_yields_its_final_tcp_info(testnet):
    poller = listening_poller(testnet, testnet.ns_a)
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    assert cookie in {c.cookie for c in poller.poll().changes}
    client.sendall(b"x" * 50_000)
    received = 0
    while received < 50_000:
        received += len(server.recv(65536))
    server.close()
    time.sleep(0.05)
    client.close()

    final = drain_until(poller, {cookie})[cookie]
    assert final.kind == FINAL and final.family == socket.AF_INET
    assert final.payload[1] == TCP_CLOSE
    assert info_of(final.payload)["bytes_acked"] >= 50_000
    assert abs(final.timestamp_ns - time.time_ns()) < 5 * 10**9
    later = poller.poll()
    assert cookie not in {c.cookie for c in later.changes + later.vanished + later.destroyed}


def test_connection_opened_and_closed_between_polls_is_a_short_flow(testnet):
    poller = listening_poller(testnet, testnet.ns_a)
    poller.poll()
    client, server, listener = testnet.connect()
    cookie, ports = cookie_of(client), (client.getsockname()[1], client.getpeername()[1])
    client.sendall(b"y" * 10_000)
    server.recv(65536)
    server.close()
    client.close()
    listener.close()

    short = drain_until(poller, {cookie})[cookie]
    assert short.kind == SHORT
    assert struct.unpack_from("!HH", short.payload, 4) == ports
    assert info_of(short.payload)["bytes_acked"] >= 10_000
    assert cookie not in {c.cookie for c in poller.poll().vanished}


def test_time_wait_remnant_of_a_finished_connection_is_not_a_new_one(testnet):
    poller = listening_poller(testnet, testnet.ns_a)
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    poller.poll()
    client.close()   # the server keeps its end open: the client waits in FIN_WAIT2 as time-wait
    drain_until(poller, {cookie})
    for _ in range(5):
        result = poller.poll()
        assert cookie not in {c.cookie for c in result.changes + result.vanished}
        time.sleep(0.02)
    server.close()


def test_socket_reset_but_still_held_is_closed_after_the_grace_and_its_late_notice_dropped(
        testnet):
    poller = listening_poller(testnet, testnet.ns_a, grace_ns=200_000_000)
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    poller.poll()
    server.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    server.close()   # RST: the client's socket is CLOSE, out of the dumps, but not freed
    time.sleep(0.05)
    assert cookie not in {c.cookie for c in poller.poll().vanished}   # within the grace
    time.sleep(0.25)
    vanished = poller.poll().vanished
    assert [c.cookie for c in vanished] == [cookie]
    client.close()
    assert drained_stat(poller, "late") == 1


def test_excluded_connections_notifications_are_dropped(testnet):
    listener = testnet.listen()
    port = listener.getsockname()[1]
    poller = listening_poller(testnet, testnet.ns_b, Filter(srcports={port}))
    poller.poll()
    client, server, _ = testnet.connect(listener=listener)
    server.close()
    client.close()
    assert drained_stat(poller, "excluded") >= 1


def test_without_a_listener_a_closed_connection_vanishes_at_the_next_poll(testnet):
    with testnet.inside(testnet.ns_a):
        poller = Poller()
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    poller.poll()
    client.close()
    server.close()
    time.sleep(0.05)
    result = poller.poll()
    assert cookie in {c.cookie for c in result.vanished} and result.destroyed == []


# A poller in a process of its own, so that the test can stop it (reader thread included)
# while the kernel sends notifications; it reports what it saw as JSON lines.
STOPPABLE_POLLER = """
import json, sys, time
from tcpinfo.collector.poller import Poller
poller = Poller()
poller.listen_destroyed(rcvbuf=1, grace_ns=100_000_000)   # the kernel's minimum
print(json.dumps(sorted(c.cookie for c in poller.poll().changes)), flush=True)
sys.stdin.readline()   # the test stopped us, closed the connections and let us go on
closed, overruns, by_polls = set(), 0, []
deadline = time.monotonic() + 5
while len(closed) < int(sys.argv[1]) and time.monotonic() < deadline:
    result = poller.poll()
    overruns += result.destroy.overruns
    closed |= {c.cookie for c in result.destroyed + result.vanished}
    by_polls += [c.payload.hex() for c in result.vanished]
    time.sleep(0.05)
print(json.dumps([sorted(closed), overruns, by_polls]), flush=True)
"""


def wait_stopped(pid: int, timeout: float = 5.0) -> None:
    """Returns once every thread of the process is in the stopped state ('T' in its stat):
    kill() only queues SIGSTOP, and a busy machine may run a thread a while longer."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        states = []
        for stat in Path(f"/proc/{pid}/task").glob("*/stat"):
            try:
                states.append(stat.read_text().rsplit(")", 1)[1].split()[0])
            except (FileNotFoundError, IndexError):
                continue
        if states and all(state == "T" for state in states):
            return
        time.sleep(0.005)
    raise AssertionError(f"process {pid} did not stop within {timeout} s")


def test_notifications_lost_to_a_full_buffer_are_counted_and_polls_close_the_rest(testnet):
    """...with no message: while notifications are heard the table keeps only what Compare
    needs of each connection (struct image), not a message to report at its close."""
    pairs = testnet.open_many(60)
    cookies = {cookie_of(client) for client, _ in pairs}
    proc = testnet.popen(testnet.ns_a, sys.executable, "-c", STOPPABLE_POLLER,
                         str(len(pairs)), stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert set(json.loads(proc.stdout.readline())) == cookies
        proc.send_signal(signal.SIGSTOP)   # nobody reads: most notifications are dropped
        wait_stopped(proc.pid)             # (a reader thread not yet stopped would read them)
        for client, server in pairs:
            client.close()
            server.close()
        time.sleep(0.3)
        proc.send_signal(signal.SIGCONT)
        proc.stdin.write("go\n")
        proc.stdin.flush()
        closed, overruns, by_polls = json.loads(proc.stdout.readline())
    finally:
        proc.kill()
        proc.wait()
    assert overruns >= 1
    assert set(closed) == cookies
    assert by_polls and set(by_polls) == {""}


def test_notifications_wait_in_the_collector_while_the_poll_thread_is_busy(testnet):
    """The kernel's buffer holds a dozen notifications here, and nobody polls for a second
    while 300 connections close one by one: the core's reader thread has queued every one."""
    with testnet.inside(testnet.ns_a):
        poller = Poller()
        poller.listen_destroyed(rcvbuf=16384, grace_ns=100_000_000)
    pairs = testnet.open_many(300)
    cookies = {cookie_of(client) for client, _ in pairs}
    assert {c.cookie for c in poller.poll().changes} == cookies
    for client, server in pairs:   # the poll thread is "busy": this loop is all it does
        client.close()
        server.close()
        time.sleep(0.003)
    result = poller.drain()
    assert result.destroy.overruns == 0
    assert {c.cookie for c in result.destroyed} == cookies
