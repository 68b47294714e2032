"""The saver on real files: whole zstd frames, rotation, no truncation, failures and memory caps."""
from __future__ import annotations

import os
import subprocess

import pytest

from helpers.saver import PREFIX, T0, S, files, frames, line, numbers
from tcpinfo.archive.record import decode_line, parse_time
from tcpinfo.collector.saver import RETRY_NS, Limits, Saver


def counter(metrics, name: str, reason: str) -> float:
    return metrics.registry.get_sample_value(name, {"reason": reason}) or 0.0


def test_each_flush_appends_one_complete_frame_that_zstd_decodes(tmp_path, metrics):
    saver = Saver(str(tmp_path), PREFIX, metrics, Limits(flush_size=1000), {"PollInterval": "10ms"})
    for n in range(30):
        saver.write(7, T0 + n, line(T0 + n, n))
    saver.close(T0 + S)
    (path,) = tmp_path.rglob("*.zst")
    assert str(path.relative_to(tmp_path)) == f"2026/03/01/{PREFIX}_0000000000000007.00000.jsonl.zst"
    assert len(frames(path)) > 3
    assert numbers(path) == list(range(30))
    header = decode_line(frames(path)[0].splitlines()[0]).metadata
    assert header == {"UUID": f"{PREFIX}_0000000000000007", "Sequence": 0,
                      "StartTime": "2026-03-01T23:55:00Z", "PollInterval": "10ms"}
    subprocess.run(["zstd", "-t", "-q", str(path)], check=True)


def test_a_connection_that_went_quiet_goes_on_in_its_file_with_its_start_and_sequence(tmp_path,
                                                                                       metrics):
    """After its buffer is written for age, an idle connection is kept packed; its next record
    lands in the same file, and at rotation the next sequence keeps the first StartTime."""
    saver = Saver(str(tmp_path), PREFIX, metrics, Limits(flush_age_ns=5 * S, rotate_ns=360 * S))
    saver.write(9, T0, line(T0, 1))
    saver.flush_due(T0 + 6 * S)                 # written for age: now idle
    assert saver.cookies() == [9] and saver.open_connections == 1
    saver.write(9, T0 + 30 * S, line(T0 + 30 * S, 2))
    saver.flush_due(T0 + 40 * S)
    saver.write(9, T0 + 361 * S, line(T0 + 361 * S, 3))   # past the rotation: the next file
    saver.close(T0 + 370 * S)
    first, second = sorted(tmp_path.rglob("*.zst"), key=lambda p: p.name)
    assert (first.name.split(".")[1], second.name.split(".")[1]) == ("00000", "00001")
    assert numbers(first) == [1, 2] and numbers(second) == [3]
    assert second.parent.name == "02"           # dated by rotation time, the next day
    header = decode_line(frames(second)[0].splitlines()[0]).metadata
    assert header["Sequence"] == 1 and header["StartTime"] == "2026-03-01T23:55:00Z"


def test_nothing_is_written_before_the_flush_age_and_everything_after_it(tmp_path, metrics):
    saver = Saver(str(tmp_path), PREFIX, metrics, Limits(flush_age_ns=5 * S))
    saver.write(1, T0, line(T0, 1))
    saver.write(2, T0 + 2 * S, line(T0 + 2 * S, 2))
    saver.flush_due(T0 + 4 * S)
    assert files(tmp_path) == []
    saver.flush_due(T0 + 5 * S)
    assert len(files(tmp_path)) == 1 and saver.buffered_bytes == len(line(T0, 2))
    saver.flush_due(T0 + 7 * S)
    assert len(files(tmp_path)) == 2 and saver.buffered_bytes == 0


def test_rotation_dates_the_next_file_by_rotation_time_and_an_idle_gap_gives_one_file(tmp_path, metrics):
    saver = Saver(str(tmp_path), PREFIX, metrics, Limits(rotate_ns=600 * S))
    minute = 60 * S
    times = [T0 + m * minute for m in range(12)]          # 23:55 .. 00:06, rotating at 00:05
    times += [T0 + m * minute for m in (130, 131, 132)]  # after two idle hours
    for n, ts in enumerate(times):
        saver.write(1, ts, line(ts, n))
    saver.close(times[-1])
    uuid = f"{PREFIX}_0000000000000001"
    assert files(tmp_path) == [f"2026/03/01/{uuid}.00000.jsonl.zst",
                               f"2026/03/02/{uuid}.00001.jsonl.zst",
                               f"2026/03/02/{uuid}.00002.jsonl.zst"]
    seq = [tmp_path / f for f in files(tmp_path)]
    assert [numbers(p) for p in seq] == [list(range(10)), [10, 11], [12, 13, 14]]
    for i, path in enumerate(seq):
        header = decode_line(frames(path)[0].splitlines()[0]).metadata
        assert header["Sequence"] == i and parse_time(header["StartTime"])[0] == T0


def test_an_existing_file_is_never_truncated_the_next_free_sequence_is_used(tmp_path, metrics):
    uuid = f"{PREFIX}_0000000000000009"
    day = tmp_path / "2026/03/01"
    day.mkdir(parents=True)
    earlier = day / f"{uuid}.00000.jsonl.zst"
    earlier.write_bytes(b"written by an earlier run")
    saver = Saver(str(tmp_path), PREFIX, metrics)
    saver.write(9, T0, line(T0, 1))
    saver.close(T0)
    assert earlier.read_bytes() == b"written by an earlier run"
    header = decode_line(frames(day / f"{uuid}.00001.jsonl.zst")[0].splitlines()[0]).metadata
    assert header["Sequence"] == 1


def test_a_file_taken_away_between_flushes_continues_in_a_new_file_with_a_header(tmp_path, metrics):
    saver = Saver(str(tmp_path), PREFIX, metrics, Limits(flush_age_ns=S))
    saver.write(3, T0, line(T0, 1))
    saver.flush_due(T0 + S)
    (first,) = tmp_path.rglob("*.zst")
    first.unlink()   # an uploader moved it away
    saver.write(3, T0 + 2 * S, line(T0 + 2 * S, 2))
    saver.close(T0 + 3 * S)
    (second,) = tmp_path.rglob("*.zst")
    assert second.name.endswith(".00001.jsonl.zst") and numbers(second) == [2]


def test_failed_writes_are_retried_and_beyond_the_connection_limit_the_oldest_are_dropped(tmp_path, metrics):
    root = tmp_path / "root"
    root.write_text("not a directory: every write fails")
    saver = Saver(str(root), PREFIX, metrics, Limits(flush_size=1000, flush_age_ns=S, conn_limit=4000,
                                            total_limit=10**6))
    dropped_before = counter(metrics, "tcpinfo_dropped_records_total", "connection limit")
    errors_before = metrics.registry.get_sample_value("tcpinfo_write_errors_total",
                                              {"cause": "ENOTDIR"}) or 0
    size = len(line(T0, 0))
    for n in range(100):
        saver.write(5, T0 + n, line(T0, n))
    assert saver.buffered_bytes <= 4000
    kept = saver.buffered_bytes // size
    assert counter(metrics, "tcpinfo_dropped_records_total", "connection limit") - dropped_before == \
        100 - kept
    # One failure, then no attempt at all until the retry time.
    assert metrics.registry.get_sample_value("tcpinfo_write_errors_total", {"cause": "ENOTDIR"}) == \
        errors_before + 1

    root.unlink()
    root.mkdir()
    saver.flush_due(T0 + RETRY_NS + S)
    (path,) = root.rglob("*.zst")
    assert numbers(path) == list(range(100 - kept, 100))
    assert saver.buffered_bytes == 0


def test_the_global_limit_writes_the_oldest_buffers_first(tmp_path, metrics):
    saver = Saver(str(tmp_path), PREFIX, metrics, Limits(flush_size=10**5, conn_limit=10**5,
                                                total_limit=10**5))
    size = len(line(T0, 0))
    count = 10**5 // size + 1
    for cookie in range(count):
        saver.write(cookie + 1, T0 + cookie, line(T0, cookie))
    assert saver.buffered_bytes <= 10**5 * 3 // 4
    written = {int(p.name.split("_")[-1].split(".")[0], 16) for p in tmp_path.rglob("*.zst")}
    assert written == set(range(1, len(written) + 1)) and written


def test_the_global_limit_drops_the_oldest_records_while_writes_fail(tmp_path, metrics):
    root = tmp_path / "root"
    root.write_text("every write fails")
    saver = Saver(str(root), PREFIX, metrics, Limits(flush_size=10**4, conn_limit=10**4,
                                            total_limit=10**4))
    before = counter(metrics, "tcpinfo_dropped_records_total", "buffer limit")
    for cookie in range(200):
        saver.write(cookie, T0, line(T0, cookie))
    assert saver.buffered_bytes <= 10**4
    assert counter(metrics, "tcpinfo_dropped_records_total", "buffer limit") - before == \
        200 - saver.buffered_bytes // len(line(T0, 0))


@pytest.fixture
def small_disk(tmp_path):
    mount = tmp_path / "disk"
    mount.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=200k", "tmpfs", str(mount)], check=True)
    yield mount
    subprocess.run(["umount", "-l", str(mount)], check=True)


def test_a_partial_write_on_a_full_disk_is_cut_back_so_every_file_stays_whole_frames(small_disk, metrics):
    saver = Saver(str(small_disk), PREFIX, metrics, Limits(flush_size=20_000, conn_limit=10**6,
                                                  total_limit=10**7))
    before = metrics.registry.get_sample_value("tcpinfo_write_errors_total", {"cause": "ENOSPC"}) or 0
    ts = T0
    while metrics.registry.get_sample_value("tcpinfo_write_errors_total", {"cause": "ENOSPC"}) in \
            (None, before):
        ts += RETRY_NS   # past the retry time, so every flush is attempted
        for cookie in (1, 2, 3):
            saver.write(cookie, ts, line(ts, cookie, os.urandom(3000)))
    for path in small_disk.rglob("*.zst"):
        assert len(frames(path)) >= 1   # decodes to the end: no partial frame left behind
    subprocess.run(["zstd", "-t", "-q", *map(str, small_disk.rglob("*.zst"))], check=True)
