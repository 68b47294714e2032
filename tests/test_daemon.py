"""The real `tcp-info` daemon in a network namespace, with real connections and traffic."""
from __future__ import annotations

import ipaddress
import os
import pstats
import socket
import stat
import struct
import subprocess
import sys
import time
from pathlib import Path

import orjson
import pytest
import zstandard

from helpers.daemon import CLIENT, archives, metric, read_archive, records, scrape, uuid_of, wait_until
from lab.netns import cookie_of, run
from tcpinfo.archive.record import decode_line, parse_time
from tcpinfo.kernel.tcp import decode_tcp_info


def test_each_connection_gets_one_archive_series_with_header_and_records(testnet, tmp_path,
                                                                         daemons):
    held = [testnet.connect(socket.AF_INET), testnet.connect(socket.AF_INET6)]
    conns = [client for client, _, _ in held]
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-reps=20")
    assert daemon.proc.wait(10) == 0, daemon.text()

    assert set(archives(out)) == {uuid_of(c) for c in conns}
    for client in conns:
        (path,) = archives(out)[uuid_of(client)]
        assert path.name == f"{uuid_of(client)}.00000.jsonl.zst"
        header, *data = read_archive(path)
        assert header.raw_idm is None and header.attributes is None
        meta = header.metadata
        assert list(meta)[:3] == ["UUID", "Sequence", "StartTime"]
        assert (meta["UUID"], meta["Sequence"]) == (uuid_of(client), 0)
        assert parse_time(meta["StartTime"])[0] == data[0].ts_ns
        assert meta["TCPInfoLength"] == len(data[0].attributes[2])
        assert meta["PollInterval"] == "10ms" and meta["KernelRelease"] == os.uname().release
        start = time.gmtime(data[0].ts_ns // 10**9)
        assert path.parent.relative_to(out) == Path(time.strftime("%Y/%m/%d", start))
        assert data and all(struct.unpack_from("<Q", d.raw_idm, 44)[0] == cookie_of(client)
                            for d in data)


def test_sending_data_adds_records_and_an_idle_connection_adds_none(testnet, tmp_path,
                                                                    daemons):
    held = [testnet.connect(), testnet.connect()]
    busy, idle = held[0][0], held[1][0]
    time.sleep(0.1)  # handshakes and their ACKs are over
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-flush-age=20ms")
    wait_until(lambda: len(archives(out)) == 2)
    before = len(records(out, cookie_of(busy)))
    for _ in range(5):
        busy.sendall(b"x" * 1000)
        time.sleep(0.05)
    time.sleep(0.2)
    assert daemon.stop() == 0, daemon.text()

    assert len(records(out, cookie_of(busy))) > before
    assert len(records(out, cookie_of(idle))) == 1


def test_excluded_ports_destinations_and_local_addresses_produce_no_files(testnet, tmp_path,
                                                                          daemons):
    excluded_port = testnet.listen(socket.AF_INET)
    kept_port = testnet.listen(socket.AF_INET)
    kept_port6 = testnet.listen(socket.AF_INET6, kept_port.getsockname()[1])
    held = [testnet.connect(family, listener=listener) for family, listener in
            ((socket.AF_INET, excluded_port), (socket.AF_INET, kept_port),
             (socket.AF_INET6, kept_port6))]
    by_port, kept, by_dstip = (server for _, server, _ in held)
    with testnet.inside(testnet.ns_b):
        loop_listener = socket.create_server(("127.0.0.1", 0))
        loop_client = socket.create_connection(loop_listener.getsockname())
        loop_server = loop_listener.accept()[0]
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_b, out, "-reps=10",
                     f"-exclude-srcport=1,{excluded_port.getsockname()[1]}",
                     "-exclude-dstip", testnet.a6)
    assert daemon.proc.wait(10) == 0, daemon.text()
    assert set(archives(out)) == {uuid_of(kept)}

    everything = tmp_path / "everything"
    daemon = daemons(testnet, testnet.ns_b, everything, "-reps=10", "-exclude-local=false")
    assert daemon.proc.wait(10) == 0, daemon.text()
    assert set(archives(everything)) >= {uuid_of(s) for s in (by_port, kept, by_dstip,
                                                                loop_client, loop_server)}


def _addresses(raw_idm: bytes) -> tuple[ipaddress._BaseAddress, ipaddress._BaseAddress]:
    if raw_idm[0] == socket.AF_INET:
        return ipaddress.ip_address(raw_idm[8:12]), ipaddress.ip_address(raw_idm[24:28])
    return ipaddress.ip_address(raw_idm[8:24]), ipaddress.ip_address(raw_idm[24:40])


def test_netblock_anonymizes_the_remote_address_and_keeps_the_hosts_own(testnet, tmp_path,
                                                                        daemons):
    held = [testnet.connect(socket.AF_INET), testnet.connect(socket.AF_INET6)]
    v4, v6 = (server for _, server, _ in held)
    with testnet.inside(testnet.ns_b):   # dual stack: an IPv4 peer seen as ::ffff:198.18.0.1
        dual = socket.create_server(("::", 0), family=socket.AF_INET6, dualstack_ipv6=True)
    with testnet.inside(testnet.ns_a):
        _dual_client = socket.create_connection((testnet.b4, dual.getsockname()[1]))
    mapped = dual.accept()[0]
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_b, out, "-reps=10", "-anonymize.ip=netblock")
    assert daemon.proc.wait(10) == 0, daemon.text()

    expect = {v4: ("198.18.0.2", "198.18.0.0"), v6: ("fd00:18::2", "fd00:18::"),
              mapped: ("::ffff:198.18.0.2", "::ffff:198.18.0.0")}
    for sock, (src, dst) in expect.items():
        for rec in records(out, cookie_of(sock)):
            assert _addresses(rec.raw_idm) == (ipaddress.ip_address(src), ipaddress.ip_address(dst))
            assert rec.raw_idm[4:6] == struct.pack(">H", sock.getsockname()[1])
            assert rec.raw_idm[6:8] == struct.pack(">H", sock.getpeername()[1])


def test_sigterm_leaves_every_file_complete_with_the_latest_records(testnet, tmp_path, daemons):
    held = [testnet.connect(family) for family in (socket.AF_INET, socket.AF_INET6) * 3]
    clients = [(client, server) for client, server, _ in held]
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out)   # default flush age: nothing written yet
    daemon.wait_for("First poll done")
    for i, (client, server) in enumerate(clients):
        client.sendall(b"y" * (1000 * (i + 1)))
        server.recv(65536)
    time.sleep(0.3)
    started = time.monotonic()
    assert daemon.stop() == 0, daemon.text()
    assert time.monotonic() - started < 3

    files = list(out.rglob("*.jsonl.zst"))
    assert len(files) == len(clients)
    run("zstd", "-t", "-q", *map(str, files))
    for i, (client, _) in enumerate(clients):
        last = records(out, cookie_of(client))[-1]
        assert decode_tcp_info(last.attributes[2])["bytes_acked"] == 1000 * (i + 1) + 1  # +SYN


def test_restart_appends_a_new_sequence_and_never_truncates(testnet, tmp_path, daemons):
    client, *held = testnet.connect()
    out = tmp_path / "out"
    assert daemons(testnet, testnet.ns_a, out, "-reps=5").proc.wait(10) == 0
    (first,) = archives(out)[uuid_of(client)]
    first_bytes = first.read_bytes()
    assert daemons(testnet, testnet.ns_a, out, "-reps=5").proc.wait(10) == 0

    old, new = archives(out)[uuid_of(client)]
    assert old == first and old.read_bytes() == first_bytes
    assert new.name == f"{uuid_of(client)}.00001.jsonl.zst"
    header = read_archive(new)[0].metadata
    assert (header["UUID"], header["Sequence"]) == (uuid_of(client), 1)


@pytest.fixture
def tiny_disk(tmp_path):
    """A 1 MiB tmpfs, mounted for the test and removed after it."""
    mount = tmp_path / "disk"
    mount.mkdir()
    run("mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(mount))
    yield mount
    run("umount", "-l", str(mount))


def test_full_disk_is_survived_and_writing_resumes_when_space_returns(testnet, tiny_disk,
                                                                        daemons):
    out = tiny_disk / "out"
    out.mkdir()
    filler = tiny_disk / "filler"
    with open(filler, "wb", buffering=0) as f:
        try:
            while True:
                f.write(os.urandom(4096))
        except OSError:
            pass
    client, server, _ = testnet.connect()
    daemon = daemons(testnet, testnet.ns_a, out, "-flush-age=20ms")
    daemon.wait_for("Cannot write archives")
    for _ in range(5):
        client.sendall(b"z" * 100)
        time.sleep(0.05)
    assert daemon.proc.poll() is None
    assert daemon.text().count("Cannot write archives") == 1    # logged once per cause

    filler.unlink()
    daemon.wait_for("Archive writes work again")
    wait_until(lambda: len(records(tiny_disk / "out", cookie_of(client))) > 1)
    assert daemon.stop() == 0, daemon.text()
    run("zstd", "-t", "-q", *map(str, out.rglob("*.jsonl.zst")))


def test_sigterm_ends_a_long_poll_wait_at_once(testnet, tmp_path, daemons):
    daemon = daemons(testnet, testnet.ns_a, tmp_path / "out", "-poll-interval=1m")
    daemon.wait_for("First poll done")
    started = time.monotonic()
    assert daemon.stop() == 0, daemon.text()
    assert time.monotonic() - started < 2


def test_trace_writes_a_python_profile_into_the_output_directory(testnet, tmp_path, daemons):
    out = tmp_path / "out"
    assert daemons(testnet, testnet.ns_a, out, "-reps=3", "-trace").proc.wait(10) == 0
    stats = pstats.Stats(str(out / "trace.pstats"))
    assert any(name == "poll_once" for _, _, name in stats.stats)


def test_event_socket_announces_each_connection_opening_closing_and_open_at_shutdown(
        testnet, tmp_path, daemons):
    path = tmp_path / "events.sock"
    daemon = daemons(testnet, testnet.ns_a, tmp_path / "out", f"-tcpinfo.eventsocket={path}")
    daemon.wait_for("First poll done")
    listener = socket.socket(socket.AF_UNIX)
    listener.settimeout(5)
    listener.connect(str(path))
    events = listener.makefile("rb")
    time.sleep(0.1)  # the server has registered us before the flows appear

    closing, closing_server, _ = testnet.connect()
    opened = orjson.loads(events.readline())
    assert (opened["Event"], opened["UUID"]) == (0, uuid_of(closing))
    assert opened["ID"]["SPort"] == closing.getsockname()[1]
    staying, staying_server, _ = testnet.connect(socket.AF_INET6)
    assert orjson.loads(events.readline())["UUID"] == uuid_of(staying)
    closing.close()
    closing_server.close()
    closed = orjson.loads(events.readline())
    assert (closed["Event"], closed["UUID"], closed["ID"]) == (1, opened["UUID"], None)

    assert daemon.stop() == 0, daemon.text()
    final = orjson.loads(events.readline())
    assert (final["Event"], final["UUID"]) == (1, uuid_of(staying))


def complete_frames(path: Path) -> bytes:
    """What a file's complete frames hold; only its very last frame may be cut short."""
    data, out = path.read_bytes(), b""
    while data:
        dobj = zstandard.ZstdDecompressor().decompressobj()
        chunk = dobj.decompress(data)
        if not dobj.eof:
            return out   # a torn last frame: everything before it still decodes
        out, data = out + chunk, dobj.unused_data
    return out


def test_after_sigkill_every_file_decodes_up_to_its_last_flushed_frame(testnet, tmp_path,
                                                                       daemons):
    held = [testnet.connect() for _ in range(4)]
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-flush-age=10ms")
    wait_until(lambda: len(archives(out)) == len(held))
    for _ in range(10):
        for client, _, _ in held:
            client.sendall(b"k" * 100)
        time.sleep(0.02)
    daemon.proc.kill()
    daemon.proc.wait()
    for client, _, _ in held:
        (path,) = archives(out)[uuid_of(client)]
        lines = [decode_line(x) for x in complete_frames(path).splitlines()]
        assert lines[0].metadata["UUID"] == uuid_of(client) and len(lines) > 2


def test_metrics_count_files_snapshots_open_connections_ports_and_bytes_sent(testnet, tmp_path,
                                                                              daemons):
    listener = testnet.listen()
    port = listener.getsockname()[1]
    held = [testnet.connect(listener=listener) for _ in range(3)]
    daemon = daemons(testnet, testnet.ns_b, tmp_path / "out", "-flush-age=10ms",
                     "-prometheusx.listen-address=127.0.0.1:9990", f"-count-port={port}")
    daemon.wait_for("First poll done")
    held[0][1].sendall(b"m" * 100_000)   # from the server side, seen by the daemon in b
    received = 0
    while received < 100_000:
        received += len(held[0][0].recv(65536))
    time.sleep(1.5)   # rates are reported once a second
    text = scrape(testnet)
    assert metric(text, "tcpinfo_open_connections") == 3
    assert metric(text, f'tcpinfo_port_connections{{port="{port}"}}') == 3
    assert metric(text, "tcpinfo_new_file_total") >= 3
    assert metric(text, "tcpinfo_snapshot_total") > 3
    assert metric(text, "tcpinfo_send_rate_histogram_sum") >= 8 * 100_000
    assert metric(text, 'tcpinfo_cache_total{op="new"}') >= 3
    assert metric(text, 'tcpinfo_cache_total{op="changed"}') >= 1

    client, server, _ = held.pop()
    client.close()
    server.close()
    time.sleep(1.5)
    after = scrape(testnet)
    assert daemon.stop() == 0, daemon.text()
    assert metric(after, "tcpinfo_open_connections") == 2
    assert metric(after, f'tcpinfo_port_connections{{port="{port}"}}') == 2
    assert metric(after, 'tcpinfo_cache_total{op="expired"}') >= 1
    assert metric(after, 'tcpinfo_cache_total{op="total"}') > metric(text, 'tcpinfo_cache_total{op="total"}')


def test_a_busy_connection_rotates_into_numbered_files_with_one_start_time(testnet, tmp_path,
                                                                           daemons):
    client, server, _ = testnet.connect()
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-rotate-interval=200ms", "-flush-age=20ms")
    deadline = time.monotonic() + 1.0
    while time.monotonic() < deadline:
        client.sendall(b"r" * 100)
        server.recv(100)
        time.sleep(0.02)
    assert daemon.stop() == 0, daemon.text()

    files = archives(out)[uuid_of(client)]
    assert len(files) >= 3
    headers = [read_archive(path)[0].metadata for path in files]
    assert [h["Sequence"] for h in headers] == list(range(len(files)))
    assert [path.name.split(".")[1] for path in files] == [f"{i:05d}" for i in range(len(files))]
    assert len({h["StartTime"] for h in headers}) == 1


def test_event_socket_flags_set_its_permissions_and_replay_open_connections(
        testnet, tmp_path, daemons):
    path = tmp_path / "replay.sock"
    already_open, _server, _ = testnet.connect()
    daemon = daemons(testnet, testnet.ns_a, tmp_path / "out", f"-tcpinfo.eventsocket={path}",
                     "-tcpinfo.eventsocket-mode=0600", "-tcpinfo.eventsocket-replay")
    daemon.wait_for("First poll done")
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    late = socket.socket(socket.AF_UNIX)
    late.settimeout(5)
    late.connect(str(path))
    replayed = orjson.loads(late.makefile("rb").readline())
    assert (replayed["Event"], replayed["UUID"]) == (0, uuid_of(already_open))
    assert daemon.stop() == 0, daemon.text()
    assert not path.exists()


def test_bad_event_socket_mode_exits_2(testnet, tmp_path):
    proc = testnet.exec(testnet.ns_a, "tcp-info", "-tcpinfo.eventsocket-mode=999")
    assert proc.returncode == 2 and proc.stderr.count("\n") == 1, proc.stderr


def test_a_client_process_gets_upstreams_exact_open_and_close_bytes(testnet, tmp_path, daemons):
    path = tmp_path / "events.sock"
    daemon = daemons(testnet, testnet.ns_a, tmp_path / "out", f"-tcpinfo.eventsocket={path}")
    daemon.wait_for("First poll done")
    reader = subprocess.Popen([sys.executable, "-c", CLIENT, str(path)], stdout=subprocess.PIPE)
    time.sleep(0.3)  # the client is registered before the flow appears
    client, server, _ = testnet.connect()
    opened = reader.stdout.readline()
    ts = orjson.loads(opened)["Timestamp"]
    parse_time(ts)
    assert ts.endswith("Z")
    cookie, uuid = cookie_of(client), uuid_of(client)
    signed = cookie - (1 << 64) if cookie >= 1 << 63 else cookie
    expected = (f'{{"Event":0,"Timestamp":"{ts}","UUID":"{uuid}","ID":{{"SPort":'
                f'{client.getsockname()[1]},"DPort":{client.getpeername()[1]},"SrcIP":"{testnet.a4}",'
                f'"DstIP":"{testnet.b4}","Interface":0,"Cookie":{signed}}}}}\n').encode()
    assert opened == expected
    client.close()
    server.close()
    closed = reader.stdout.readline()
    close_ts = orjson.loads(closed)["Timestamp"]
    assert closed == f'{{"Event":1,"Timestamp":"{close_ts}","UUID":"{uuid}","ID":null}}\n'.encode()
    assert parse_time(close_ts)[0] >= parse_time(ts)[0]
    assert daemon.stop() == 0, daemon.text()
    reader.wait(5)
