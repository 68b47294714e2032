"""tcp-info with destroy notifications: final records, short flows and prompt Close events."""
from __future__ import annotations

import subprocess
import sys
import time

import orjson

from helpers.daemon import CLIENT, metric, records, scrape, uuid_of
from lab.netns import cookie_of
from tcpinfo.kernel.tcp import decode_tcp_info

TCP_CLOSE = 7
INFO = 2


def event_reader(path) -> subprocess.Popen:
    """A real client process printing each event line it gets."""
    reader = subprocess.Popen([sys.executable, "-c", CLIENT, str(path)], stdout=subprocess.PIPE)
    time.sleep(0.3)   # connected and registered before the flows of interest
    return reader


def next_event(reader: subprocess.Popen) -> dict:
    line = reader.stdout.readline()
    assert line, "the event socket closed"
    return orjson.loads(line)


def send_all(client, server, size: int) -> None:
    client.sendall(b"z" * size)
    received = 0
    while received < size:
        received += len(server.recv(1 << 20))


def test_connection_within_one_poll_interval_gets_archive_final_record_and_open_close(
        testnet, tmp_path, daemons):
    path, out = tmp_path / "events.sock", tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-poll-interval=1h",
                     f"-tcpinfo.eventsocket={path}", "-prometheusx.listen-address=127.0.0.1:9990")
    daemon.wait_for("First poll done")
    reader = event_reader(path)
    client, server, _ = testnet.connect()
    uuid, cookie = uuid_of(client), cookie_of(client)
    send_all(client, server, 300_000)
    client.close()
    server.close()

    opened, closed = next_event(reader), next_event(reader)
    assert (opened["Event"], opened["UUID"], closed["Event"], closed["UUID"]) == (0, uuid, 1, uuid)
    assert opened["ID"]["SPort"] > 0 and closed["ID"] is None
    exposition = scrape(testnet, testnet.ns_a)   # counted before the events were sent
    assert metric(exposition, 'tcpinfo_destroy_notifications_total{outcome="short"}') == 1
    assert metric(exposition, 'tcpinfo_cache_total{op="new"}') == 1
    assert metric(exposition, 'tcpinfo_cache_total{op="expired"}') == 1
    assert daemon.stop() == 0, daemon.text()
    (final,) = records(out, cookie)   # the first poll never saw it: one record, the kernel's last
    assert final.raw_idm[1] == TCP_CLOSE
    assert decode_tcp_info(final.attributes[INFO])["bytes_acked"] >= 300_000


def test_close_of_a_polled_connection_is_announced_long_before_the_next_poll(
        testnet, tmp_path, daemons):
    client, server, _ = testnet.connect()
    uuid, cookie = uuid_of(client), cookie_of(client)
    path, out = tmp_path / "events.sock", tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-poll-interval=30s",
                     f"-tcpinfo.eventsocket={path}", "-tcpinfo.eventsocket-replay")
    daemon.wait_for("First poll done")
    reader = event_reader(path)
    assert next_event(reader)["UUID"] == uuid   # replayed Open
    send_all(client, server, 100_000)
    closed_at = time.monotonic()
    client.close()
    server.close()
    closed = next_event(reader)
    assert (closed["Event"], closed["UUID"]) == (1, uuid)
    assert time.monotonic() - closed_at < 3, "the Close waited for a poll"

    assert daemon.stop() == 0, daemon.text()
    first, *_, last = records(out, cookie)
    assert first.raw_idm[1] != TCP_CLOSE and last.raw_idm[1] == TCP_CLOSE
    assert decode_tcp_info(last.attributes[INFO])["bytes_acked"] >= 100_000


def test_without_destroy_events_a_connection_between_polls_is_never_seen(
        testnet, tmp_path, daemons):
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-poll-interval=1h", "-destroy-events=false")
    daemon.wait_for("First poll done")
    client, server, _ = testnet.connect()
    cookie = cookie_of(client)
    send_all(client, server, 10_000)
    client.close()
    server.close()
    time.sleep(0.5)
    assert daemon.stop() == 0, daemon.text()
    assert records(out, cookie) == []
