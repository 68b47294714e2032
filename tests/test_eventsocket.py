"""The event socket, against real client processes: bytes, ordering, slow clients, the socket file,
the client cap, hang-ups, and running out of file descriptors."""
from __future__ import annotations

import os
import socket
import stat
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

import pytest
import zstandard
from prometheus_client import CollectorRegistry

from helpers.paths import NDT, script
from tcpinfo.archive.record import decode_line, parse_time
from tcpinfo.collector.metrics import Metrics
from tcpinfo.events import client as eventclient
from tcpinfo.events.line import close_line, event_time, open_line
from tcpinfo.servers.eventserver import EventServer, NullServer

NDT_UUID = "ndt-7hhhv_1559749627_0000000000062D84"
# UPSTREAM.md section 8, verbatim: what upstream sends for the first record of the NDT archive.
NDT_OPEN = (b'{"Event":0,"Timestamp":"2019-07-01T00:00:12.092Z",'
            b'"UUID":"ndt-7hhhv_1559749627_0000000000062D84","ID":{"SPort":33475,"DPort":49730,'
            b'"SrcIP":"63.243.240.101","DstIP":"172.251.23.202","Interface":0,"Cookie":404868}}\n')
NDT_CLOSE = (b'{"Event":1,"Timestamp":"2019-07-01T00:00:22.8Z",'
             b'"UUID":"ndt-7hhhv_1559749627_0000000000062D84","ID":null}\n')

# A client process that copies everything the server sends to stdout until EOF.
RAW_READER = """
import socket, sys
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
while chunk := s.recv(65536):
    sys.stdout.buffer.write(chunk)
"""
# A client process that connects and never reads.
STUCK_READER = """
import socket, sys, time
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.connect(sys.argv[1])
time.sleep(60)
"""


@pytest.fixture(scope="module")
def ndt_record():
    """(timestamp ns, raw IDM) of the NDT archive's first snapshot."""
    with zstandard.ZstdDecompressor().stream_reader(NDT.open("rb")) as reader:
        head = reader.read(1 << 16)
    rec = decode_line(head.split(b"\n")[1])
    return rec.ts_ns, rec.raw_idm


@pytest.fixture
def sock_path(tmp_path):
    return str(tmp_path / "tcpevents.sock")


@pytest.fixture
def processes():
    """Client processes, killed at the end of the test whatever happens."""
    procs: list[subprocess.Popen] = []
    yield procs
    for proc in procs:
        proc.kill()
        proc.wait()


def spawn(processes, *args: str) -> subprocess.Popen:
    """Starts a client; its output goes to files, so it never blocks on a full pipe."""
    out, err = tempfile.TemporaryFile(), tempfile.TemporaryFile()
    proc = subprocess.Popen(args, stdout=out, stderr=err)
    proc.captured = (out, err)
    processes.append(proc)
    return proc


def output(proc: subprocess.Popen) -> tuple[bytes, str]:
    """Waits for a client to see EOF and exit; returns its stdout and stderr."""
    proc.wait(timeout=30)
    out, err = proc.captured
    out.seek(0)
    err.seek(0)
    return out.read(), err.read().decode()


def wait_for_clients(server: EventServer, n: int) -> None:
    """Connecting finishes before the server accepts; events only reach accepted clients."""
    deadline = time.monotonic() + 10
    while server.client_count != n:
        assert time.monotonic() < deadline, f"{server.client_count} clients, expected {n}"
        time.sleep(0.01)


METRICS = Metrics(CollectorRegistry())
"""The series these servers count in (what tcp-info builds at start)."""


def metric(name: str, **labels: str) -> float:
    return METRICS.registry.get_sample_value(name, labels) or 0.0


def started(path: str, **kw) -> EventServer:
    server = EventServer(path, METRICS.events, **kw)
    server.start()
    return server


def test_client_process_receives_open_then_close_bytes_as_upstream(sock_path, processes,
                                                                    ndt_record):
    ts_ns, idm = ndt_record
    server = started(sock_path)
    reader = spawn(processes, sys.executable, "-c", RAW_READER, sock_path)
    wait_for_clients(server, 1)
    opens, closes = metric("tcpinfo_flow_events_total", event="open"), \
        metric("tcpinfo_flow_events_total", event="close")

    server.flow_created(ts_ns, NDT_UUID, idm)
    server.flow_deleted(parse_time("2019-07-01T00:00:22.8Z")[0], NDT_UUID)
    server.close()

    out, err = output(reader)
    assert out == NDT_OPEN + NDT_CLOSE, err
    assert metric("tcpinfo_flow_events_total", event="open") == opens + 1
    assert metric("tcpinfo_flow_events_total", event="close") == closes + 1


def test_tcpinfo_events_prints_open_then_close(sock_path, processes, ndt_record):
    ts_ns, idm = ndt_record
    server = started(sock_path)
    client = spawn(processes, script("tcpinfo-events"), "-tcpinfo.eventsocket", sock_path)
    wait_for_clients(server, 1)
    server.flow_created(ts_ns, NDT_UUID, idm)
    server.flow_deleted(ts_ns + 10_708_000_000, NDT_UUID)
    server.close()

    out, err = output(client)
    assert client.returncode == 0, err
    assert out.decode().splitlines() == [
        f"Open 2019-07-01T00:00:12.092000+00:00 {NDT_UUID} "
        '{"SPort":33475,"DPort":49730,"SrcIP":"63.243.240.101","DstIP":"172.251.23.202",'
        '"Interface":0,"Cookie":404868}',
        f"Close 2019-07-01T00:00:22.800000+00:00 {NDT_UUID}",
    ]


def test_tcpinfo_events_exits_with_a_clear_error_when_the_socket_is_missing(sock_path):
    proc = subprocess.run([script("tcpinfo-events"), f"-tcpinfo.eventsocket={sock_path}"],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 1
    assert f"no event socket at {sock_path}" in proc.stderr


def test_stuck_client_neither_slows_the_producer_nor_starves_another_client(
        sock_path, processes, ndt_record):
    ts_ns, idm = ndt_record
    server = started(sock_path)  # default queue limit: 10000 events
    stuck = spawn(processes, sys.executable, "-c", STUCK_READER, sock_path)
    wait_for_clients(server, 1)
    reader = spawn(processes, sys.executable, "-c", RAW_READER, sock_path)
    wait_for_clients(server, 2)
    drops, disconnects = metric("tcpinfo_event_drops_total"), \
        metric("tcpinfo_event_disconnects_total")

    expected = []
    slowest = 0.0
    for i in range(15000):
        uuid = f"{NDT_UUID[:-16]}{i:016X}"
        t0 = time.perf_counter()
        server.flow_created(ts_ns + i, uuid, idm)
        server.flow_deleted(ts_ns + i + 1, uuid)
        slowest = max(slowest, time.perf_counter() - t0)
        expected += [open_line(ts_ns + i, uuid, idm), close_line(ts_ns + i + 1, uuid)]
        if i % 200 == 0:
            time.sleep(0.002)  # a real collector produces in bursts, one per poll
    # A blocking write would hang for good; 50 ms only allows for scheduling noise.
    assert slowest < 0.05
    assert server.client_count == 1, "the stuck client was not disconnected"
    server.close()

    out, err = output(reader)
    assert out == b"".join(expected), err
    assert metric("tcpinfo_event_disconnects_total") == disconnects + 1
    assert metric("tcpinfo_event_drops_total") > drops
    assert stuck.poll() is None  # it was cut off, not waited for


def test_close_does_not_wait_long_for_a_stuck_client(sock_path, processes, ndt_record):
    ts_ns, idm = ndt_record
    server = started(sock_path)
    spawn(processes, sys.executable, "-c", STUCK_READER, sock_path)
    wait_for_clients(server, 1)
    for i in range(5000):  # more than the kernel buffers hold: its writer is blocked
        server.flow_created(ts_ns, f"flow{i}", idm)
    t0 = time.monotonic()
    server.close()
    assert time.monotonic() - t0 < 3
    assert server.client_count == 0


def test_client_connecting_after_an_open_never_gets_its_close(sock_path, processes, ndt_record):
    ts_ns, idm = ndt_record
    server = started(sock_path)
    server.flow_created(ts_ns, "early", idm)
    reader = spawn(processes, sys.executable, "-c", RAW_READER, sock_path)
    wait_for_clients(server, 1)
    server.flow_deleted(ts_ns + 1, "early")
    server.flow_created(ts_ns + 2, "late", idm)
    server.flow_deleted(ts_ns + 3, "late")
    server.flow_deleted(ts_ns + 4, "never-opened")
    server.close()

    out, _ = output(reader)
    assert out == open_line(ts_ns + 2, "late", idm) + close_line(ts_ns + 3, "late")


def test_replay_sends_open_flows_to_a_new_client_before_live_events(sock_path, processes,
                                                                    ndt_record):
    ts_ns, idm = ndt_record
    server = started(sock_path, replay=True)
    server.flow_created(ts_ns, "gone", idm)
    server.flow_created(ts_ns + 1, "open", idm)
    server.flow_deleted(ts_ns + 2, "gone")
    reader = spawn(processes, sys.executable, "-c", RAW_READER, sock_path)
    wait_for_clients(server, 1)
    server.flow_deleted(ts_ns + 3, "open")
    server.flow_created(ts_ns + 4, "new", idm)
    server.close()

    out, _ = output(reader)
    assert out == (open_line(ts_ns + 1, "open", idm) + close_line(ts_ns + 3, "open")
                   + open_line(ts_ns + 4, "new", idm))


def test_stale_socket_is_replaced(sock_path, processes):
    stale = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    stale.bind(sock_path)  # bound and never listened on: what a killed collector leaves
    stale.close()
    server = started(sock_path)
    spawn(processes, sys.executable, "-c", RAW_READER, sock_path)
    wait_for_clients(server, 1)
    server.close()


def test_socket_of_a_running_server_is_not_taken_over(sock_path):
    server = started(sock_path)
    try:
        with pytest.raises(FileExistsError, match="in use"):
            started(sock_path)
        assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    finally:
        server.close()


def test_non_socket_path_is_refused_and_left_intact(sock_path):
    Path(sock_path).write_text("precious")
    with pytest.raises(FileExistsError, match="not a socket"):
        started(sock_path)
    assert Path(sock_path).read_text() == "precious"


def test_socket_is_removed_on_close(sock_path):
    server = started(sock_path)
    assert stat.S_ISSOCK(os.lstat(sock_path).st_mode)
    server.close()
    assert not os.path.lexists(sock_path)


@pytest.mark.parametrize("mode", [0o600, 0o666])
def test_socket_mode_is_applied(sock_path, mode):
    server = started(sock_path, mode=mode)
    try:
        assert stat.S_IMODE(os.lstat(sock_path).st_mode) == mode
    finally:
        server.close()


def test_client_count_metric_follows_connects_and_disconnects(sock_path, processes):
    before = metric("tcpinfo_event_clients")
    server = started(sock_path)
    spawn(processes, sys.executable, "-c", RAW_READER, sock_path)
    wait_for_clients(server, 1)
    assert metric("tcpinfo_event_clients") == before + 1
    server.close()
    assert metric("tcpinfo_event_clients") == before


def test_clients_beyond_the_cap_are_closed_at_once_counted_and_logged_once(
        sock_path, processes, ndt_record, caplog):
    ts_ns, idm = ndt_record
    server = started(sock_path, max_clients=2)
    served = [spawn(processes, sys.executable, "-c", RAW_READER, sock_path) for _ in range(2)]
    wait_for_clients(server, 2)
    refused = metric("tcpinfo_event_refused_total")
    extra = [spawn(processes, sys.executable, "-c", RAW_READER, sock_path) for _ in range(5)]
    for proc in extra:   # each sees EOF at once and exits with nothing read
        assert output(proc) == (b"", "")
    assert metric("tcpinfo_event_refused_total") == refused + 5
    server.flow_created(ts_ns, NDT_UUID, idm)
    server.close()

    for proc in served:
        assert output(proc)[0] == NDT_OPEN
    assert caplog.text.count("refused a client, 2 are connected") == 1


def test_a_client_that_hangs_up_is_closed_at_once_without_waiting_for_an_event(sock_path):
    server = started(sock_path)
    fds = len(os.listdir("/proc/self/fd"))
    client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    client.connect(sock_path)
    wait_for_clients(server, 1)
    assert len(os.listdir("/proc/self/fd")) == fds + 2   # both ends live in this process
    client.close()
    deadline = time.monotonic() + 1
    while len(os.listdir("/proc/self/fd")) != fds or server.client_count:
        assert time.monotonic() < deadline, "the server still holds the client's socket"
        time.sleep(0.01)
    server.close()


def test_clients_cost_a_socket_each_and_no_thread(sock_path):
    server = started(sock_path)
    threads = len(os.listdir("/proc/self/task"))
    clients = [socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) for _ in range(50)]
    for client in clients:
        client.connect(sock_path)
    wait_for_clients(server, 50)
    assert len(os.listdir("/proc/self/task")) == threads
    server.close()
    for client in clients:
        client.close()


# Serves events and /metrics under a 64-file limit, then uses up every descriptor: new clients
# wait in the backlogs while the connected one is still served, until descriptors come back.
OUT_OF_FDS = """
import os, resource, sys, time
import logging
logging.basicConfig(stream=sys.stderr, level=logging.INFO, format="%(message)s")
from prometheus_client import CollectorRegistry
from tcpinfo.collector.metrics import Metrics
from tcpinfo.servers import httpserver
from tcpinfo.servers.eventserver import EventServer

path, idm = sys.argv[1], bytes.fromhex(sys.argv[2])
resource.setrlimit(resource.RLIMIT_NOFILE, (64, 64))
metrics = Metrics(CollectorRegistry())
events = EventServer(path, metrics.events, max_clients=16)
events.start()
http = httpserver.HTTPServer("127.0.0.1", 0, metrics.registry, metrics.http, max_connections=8)
http.start()

def step(*said):
    print(*said, flush=True)
    sys.stdin.readline()

def wait_clients(n):
    deadline = time.monotonic() + 10
    while events.client_count != n:
        assert time.monotonic() < deadline, events.client_count
        time.sleep(0.01)

step("port", http.address[1])       # the parent connects client A
wait_clients(1)
hog = []
try:
    while True:
        hog.append(os.open("/dev/null", os.O_RDONLY))
except OSError:
    pass
step("full")                        # the parent connects B and C, and sends a scrape
time.sleep(0.5)                     # accept() fails with EMFILE, again and again
events.flow_created(1, "during", idm)
step("clients", events.client_count)  # the parent reads A's event
for fd in hog:
    os.close(fd)
wait_clients(3)
events.flow_created(2, "after", idm)
events.close()
value = metrics.registry.get_sample_value
step("errors", value("tcpinfo_event_accept_errors_total", {"error": "EMFILE"}),
     value("tcpinfo_http_accept_errors_total", {"error": "EMFILE"}))
"""


def test_out_of_descriptors_new_clients_wait_while_connected_ones_are_served(sock_path,
                                                                             ndt_record):
    ts_ns, idm = ndt_record
    server = subprocess.Popen([sys.executable, "-c", OUT_OF_FDS, sock_path, idm.hex()],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE, text=True)
    try:
        def said() -> list[str]:
            line = server.stdout.readline().split()
            assert line, server.stderr.read()
            return line

        def go() -> None:
            server.stdin.write("\n")
            server.stdin.flush()

        def connect() -> socket.socket:
            client = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
            client.settimeout(10)
            client.connect(sock_path)
            return client

        port = int(said()[1])
        a = connect()
        go()
        assert said() == ["full"]
        b, c = connect(), connect()        # queued in the backlog: no descriptor to accept them
        scrape = socket.create_connection(("127.0.0.1", port), timeout=10)
        scrape.sendall(b"GET /metrics HTTP/1.1\r\n\r\n")
        go()
        assert said() == ["clients", "1"]
        a_lines = a.makefile("rb")
        assert b'"UUID":"during"' in a_lines.readline()   # A is served while accepts fail
        go()
        _, event_errors, http_errors = said()
        go()
        assert server.wait(10) == 0
        log = server.stderr.read()

        assert float(event_errors) >= 2 and float(http_errors) >= 2   # retried after back-offs
        assert log.count("event socket") and log.count("cannot accept a connection") == 2
        assert b'"UUID":"after"' in a_lines.readline()
        for late in (b, c):
            assert b'"UUID":"after"' in late.makefile("rb").readline()
        reply = scrape.makefile("rb").readline()
        assert reply == b"HTTP/1.1 200 OK\r\n"   # answered once descriptors came back
    finally:
        server.kill()
        server.wait()


def test_null_server_accepts_every_call_and_creates_nothing(sock_path, ndt_record):
    server = NullServer()
    server.start()
    server.flow_created(ndt_record[0], NDT_UUID, ndt_record[1])
    server.flow_deleted(ndt_record[0], NDT_UUID)
    server.close()
    assert not os.path.lexists(sock_path)


class Recorder:
    """A Handler that remembers what it was called with."""

    def __init__(self) -> None:
        self.calls: list[tuple] = []

    def open(self, ts, uuid, sockid) -> None:
        self.calls.append(("open", ts.isoformat(), uuid, sockid))

    def close(self, ts, uuid) -> None:
        self.calls.append(("close", ts.isoformat(), uuid))


def serve_lines(path: str, payload: bytes) -> threading.Thread:
    """A bare server that sends `payload` to its first client and hangs up."""
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    listener.bind(path)
    listener.listen(1)

    def send() -> None:
        with listener, listener.accept()[0] as conn:
            conn.sendall(payload)

    thread = threading.Thread(target=send)
    thread.start()
    return thread


def test_client_library_dispatches_and_skips_unknown_event_types(sock_path, ndt_record):
    ts_ns, idm = ndt_record
    unknown = b'{"Event":7,"Timestamp":"2019-07-01T00:00:13Z","UUID":"x","ID":null}\n'
    sender = serve_lines(sock_path, NDT_OPEN + unknown + NDT_CLOSE)
    handler = Recorder()
    eventclient.run(sock_path, handler)
    sender.join()
    assert handler.calls == [
        ("open", "2019-07-01T00:00:12.092000+00:00", NDT_UUID,
         {"SPort": 33475, "DPort": 49730, "SrcIP": "63.243.240.101",
          "DstIP": "172.251.23.202", "Interface": 0, "Cookie": 404868}),
        ("close", "2019-07-01T00:00:22.800000+00:00", NDT_UUID),
    ]


def test_client_library_keeps_the_senders_time_zone():
    assert event_time("2019-08-26T19:55:42.754686952-04:00").isoformat() == \
        "2019-08-26T19:55:42.754686-04:00"


def test_client_library_rejects_a_malformed_line(sock_path):
    sender = serve_lines(sock_path, b"not json\n")
    with pytest.raises(ValueError, match="malformed event line"):
        eventclient.run(sock_path, Recorder())
    sender.join()


def test_client_library_returns_when_stop_is_set(sock_path):
    server = started(sock_path)
    stop = threading.Event()
    runner = threading.Thread(target=eventclient.run, args=(sock_path, Recorder(), stop))
    runner.start()
    wait_for_clients(server, 1)
    stop.set()
    runner.join(timeout=5)
    assert not runner.is_alive()
    server.close()


def test_client_library_names_the_missing_socket(sock_path):
    with pytest.raises(FileNotFoundError, match="no event socket at .*tcpevents.sock"):
        eventclient.run(sock_path, Recorder())
