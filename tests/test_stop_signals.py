"""Every catchable signal that would end the collector ends it cleanly: exit 0, all flushed."""
from __future__ import annotations

import signal
import time
from pathlib import Path

import pytest

from helpers.daemon import PREFIX, archives, read_archive, wait_until
from tcpinfo.collector.stopsignals import STOP_SIGNALS

CONNECTIONS = 40


@pytest.mark.parametrize("sig", STOP_SIGNALS, ids=lambda s: signal.Signals(s).name)
def test_a_stop_signal_flushes_every_archive_removes_the_socket_and_exits_0(
        testnet, tmp_path: Path, daemons, sig):
    pairs = testnet.open_many(CONNECTIONS)
    path, out = tmp_path / "events.sock", tmp_path / "out"
    # A long flush age: nothing reaches the disk unless the stop writes it.
    daemon = daemons(testnet, testnet.ns_a, out, "-flush-age=1h", f"-tcpinfo.eventsocket={path}")
    daemon.wait_for("First poll done")
    daemon.proc.send_signal(sig)
    assert daemon.proc.wait(10) == 0, daemon.text()
    assert f"Stopping on {signal.Signals(sig).name}" in daemon.text()
    assert not path.exists()
    series = archives(out)
    assert len(series) == CONNECTIONS
    for (first, *_) in series.values():
        lines = read_archive(first)
        assert lines[0].metadata["UUID"].startswith(PREFIX) and lines[1].raw_idm is not None
    for client, server in pairs:
        client.close()
        server.close()


@pytest.mark.parametrize("delay", [0.0, 0.05, 0.15, 0.3, 0.6])
def test_a_signal_during_start_up_never_leaves_a_socket_file_or_a_broken_archive(
        testnet, tmp_path: Path, daemons, delay):
    """Before the handlers exist (interpreter start-up) the signal kills a process that has
    created nothing; from then on it is a clean stop, exit 0, whatever start-up had done."""
    client, server, _ = testnet.connect()
    path, out = tmp_path / "events.sock", tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, f"-tcpinfo.eventsocket={path}")
    time.sleep(delay)
    daemon.proc.send_signal(signal.SIGTERM)
    status = daemon.proc.wait(10)
    assert status in (0, -signal.SIGTERM), daemon.text()
    assert not path.exists()
    if status != 0:
        assert not out.exists() or not any(out.rglob("*.zst"))
    for (first, *_) in archives(out).values():
        assert read_archive(first)[0].metadata is not None
    client.close()
    server.close()


def test_a_signal_as_soon_as_the_event_socket_exists_is_a_clean_stop(testnet, tmp_path, daemons):
    path, out = tmp_path / "events.sock", tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, f"-tcpinfo.eventsocket={path}")
    wait_until(path.exists, timeout=10)
    daemon.proc.send_signal(signal.SIGTERM)
    assert daemon.proc.wait(10) == 0, daemon.text()
    assert not path.exists()


def test_a_second_signal_does_not_cut_the_flush_short(testnet, tmp_path: Path, daemons):
    pairs = testnet.open_many(CONNECTIONS)
    out = tmp_path / "out"
    daemon = daemons(testnet, testnet.ns_a, out, "-flush-age=1h")
    daemon.wait_for("First poll done")
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        daemon.proc.send_signal(sig)
    assert daemon.proc.wait(10) == 0, daemon.text()
    assert len(archives(out)) == CONNECTIONS
    for client, server in pairs:
        client.close()
        server.close()
