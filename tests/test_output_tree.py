"""Nothing escapes the output tree: another local user's links, FIFOs and files are never followed
or written, polling never blocks, and archives get private modes whatever the umask.

The tests run as root, like the collector usually does; the attacker is a real second user
(nobody, 65534) running its steps in a subprocess, in an output directory it may write to.
"""
from __future__ import annotations

import os
import pstats
import shutil
import stat
import subprocess
import tempfile
import threading
import time
from contextlib import contextmanager
from pathlib import Path

import pytest

from helpers.daemon import archives, metric, read_archive, records, scrape, uuid_of, wait_until
from helpers.saver import PREFIX, T0, S, files, frames, line, numbers
from lab.netns import cookie_of
from tcpinfo.collector.outtree import OPEN_DAYS, RECHECK_NS
from tcpinfo.collector.saver import RETRY_NS, Limits, Saver

NOBODY = 65534
DAY = "2026/03/01"          # T0's UTC day
UUID3 = f"{PREFIX}_0000000000000003"
VICTIM = b"root's own file\n"


def as_nobody(*command: str, cwd: Path, check: bool = True) -> subprocess.CompletedProcess:
    """Runs one of the attacker's steps as nobody: no root, no supplementary groups."""
    proc = subprocess.run(command, cwd=cwd, user=NOBODY, group=NOBODY, extra_groups=[],
                          capture_output=True, text=True, timeout=10)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


@pytest.fixture
def shared():
    """A tree other users can reach: out/ (mode 1777, as a shared spool), a root-owned victim
    file and a root-owned directory `elsewhere` outside it."""
    base = Path(tempfile.mkdtemp(prefix="tcpinfo-outtree-"))
    base.chmod(0o755)
    (base / "out").mkdir()
    (base / "out").chmod(0o1777)
    (base / "victim").write_bytes(VICTIM)
    (base / "victim").chmod(0o644)
    (base / "elsewhere").mkdir()
    assert as_nobody("sh", "-c", "echo x >> victim", cwd=base, check=False).returncode != 0
    yield base
    shutil.rmtree(base)


def unsafe(metrics, kind: str) -> float:
    return metrics.registry.get_sample_value("tcpinfo_unsafe_paths_total", {"kind": kind}) or 0.0


def write_errors(metrics, cause: str) -> float:
    return metrics.registry.get_sample_value("tcpinfo_write_errors_total", {"cause": cause}) or 0.0


def mode(path: Path) -> int:
    return stat.S_IMODE(path.lstat().st_mode)


def within(seconds: float, action) -> None:
    """Runs `action` in a thread and fails if it has not returned in time (an open that blocks);
    its exception, if any, is raised here."""
    raised: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as err:   # handed to the test's thread
            raised.append(err)

    worker = threading.Thread(target=run, daemon=True)
    worker.start()
    worker.join(seconds)
    assert not worker.is_alive(), f"blocked for more than {seconds} s"
    if raised:
        raise raised[0]


@contextmanager
def umask(value: int):
    previous = os.umask(value)
    try:
        yield
    finally:
        os.umask(previous)


# ------------------------------------------------------------------ the saver, case by case

def saver_with_archive(shared: Path, metrics) -> tuple[Saver, Path]:
    """A saver that wrote connection 3's first file into a day directory the attacker made in
    advance (and so may change), and that file's path."""
    out = shared / "out"
    as_nobody("mkdir", "-p", DAY, cwd=out)
    saver = Saver(str(out), PREFIX, metrics, Limits(flush_age_ns=S))
    saver.write(3, T0, line(T0, 1))
    saver.flush_due(T0 + S)
    first = out / DAY / f"{UUID3}.00000.jsonl.zst"
    assert numbers(first) == [1]
    return saver, first


def flush_again(saver: Saver, first: Path) -> Path:
    """Connection 3's next record, flushed (failing if the flush blocks); the next file's path."""
    saver.write(3, T0 + 2 * S, line(T0 + 2 * S, 2))
    within(5, lambda: saver.flush_due(T0 + 3 * S))   # a FIFO without reader never blocks
    saver.close(T0 + 4 * S)
    return first.with_name(f"{UUID3}.00001.jsonl.zst")


def test_an_archive_replaced_by_a_symlink_to_a_root_file_is_not_followed_and_the_records_go_on_in_the_next_file(
        shared, caplog, metrics):
    saver, first = saver_with_archive(shared, metrics)
    before = unsafe(metrics, "symlink")
    as_nobody("ln", "-sf", str(shared / "victim"), first.name, cwd=first.parent)
    second = flush_again(saver, first)

    assert (shared / "victim").read_bytes() == VICTIM
    assert os.readlink(first) == str(shared / "victim")   # the planted link is left alone
    assert numbers(second) == [2]
    assert b'"Sequence":1' in frames(second)[0].splitlines()[0]
    assert unsafe(metrics, "symlink") == before + 1
    assert f"{first} is now a symbolic link" in caplog.text


@pytest.mark.parametrize("replacement,kind", [
    ("rm -f $1 && mkfifo $1", "not a regular file"),
    ("rm -f $1 && mkdir $1", "not a regular file"),
    ("rm -f $1 && echo attacker > $1", "replaced file"),
])
def test_an_archive_replaced_by_a_fifo_directory_or_other_file_is_left_alone_without_blocking(
        shared, caplog, replacement, kind, metrics):
    saver, first = saver_with_archive(shared, metrics)
    as_nobody("sh", "-c", replacement, "attacker", first.name, cwd=first.parent)
    planted = first.lstat()
    before = unsafe(metrics, kind)
    second = flush_again(saver, first)

    assert first.lstat().st_ino == planted.st_ino and first.lstat().st_size == planted.st_size
    assert numbers(second) == [2]
    assert unsafe(metrics, kind) == before + 1
    assert f"{first} is now" in caplog.text


def test_a_fifo_with_a_reader_in_place_of_an_archive_gets_nothing_written(shared, metrics):
    saver, first = saver_with_archive(shared, metrics)
    as_nobody("sh", "-c", "rm -f $1 && mkfifo -m 666 $1", "attacker", first.name,
              cwd=first.parent)
    reader = os.open(first, os.O_RDONLY | os.O_NONBLOCK)   # so that opening to write succeeds
    try:
        before = unsafe(metrics, "not a regular file")
        second = flush_again(saver, first)
        assert os.read(reader, 65536) == b""   # opened and closed, nothing written into it
    finally:
        os.close(reader)
    assert unsafe(metrics, "not a regular file") == before + 1
    assert numbers(second) == [2]


@pytest.mark.parametrize("level,plant,cause,kind", [
    ("2026", "ln -s $1 $2", "ELOOP", "symlink"),
    ("2026/03", "ln -s $1 $2", "ELOOP", "symlink"),
    ("2026/03/01", "ln -s $1 $2", "ELOOP", "symlink"),
    ("2026", "mkfifo $2", "ENOTDIR", "not a directory"),
])
def test_a_link_or_fifo_where_a_directory_should_be_is_never_followed_and_the_records_wait(
        shared, caplog, level, plant, cause, kind, metrics):
    out = shared / "out"
    if "/" in level:
        as_nobody("mkdir", "-p", str(Path(level).parent), cwd=out)
    as_nobody("sh", "-c", f"{plant}", "attacker", str(shared / "elsewhere"), level, cwd=out)
    saver = Saver(str(out), PREFIX, metrics, Limits(flush_age_ns=S))
    errors, unsafe_before = write_errors(metrics, cause), unsafe(metrics, kind)
    saver.write(3, T0, line(T0, 1))
    within(5, lambda: saver.flush_due(T0 + S))

    assert list((shared / "elsewhere").iterdir()) == []
    assert write_errors(metrics, cause) == errors + 1 and unsafe(metrics, kind) == unsafe_before + 1
    assert f"{out}/{level} is " in caplog.text and "where a directory should be" in caplog.text
    assert saver.buffered_bytes == len(line(T0, 1))   # kept in memory, retried every second

    as_nobody("rm", level, cwd=out)
    saver.flush_due(T0 + S + RETRY_NS)
    assert numbers(out / DAY / f"{UUID3}.00000.jsonl.zst") == [1]
    assert "Archive writes work again" in caplog.text
    assert list((shared / "elsewhere").iterdir()) == []
    saver.close(T0 + 3 * S)


@pytest.mark.parametrize("replaced", [False, True])
def test_when_an_old_day_directory_is_removed_or_replaced_the_connection_goes_on_today(tmp_path, replaced, metrics):
    out = tmp_path / "out"
    saver = Saver(str(out), PREFIX, metrics, Limits(flush_age_ns=S))
    saver.write(3, T0, line(T0, 1))
    saver.flush_due(T0 + S)
    (out / DAY).rename(tmp_path / "uploaded")
    if replaced:
        (out / DAY).symlink_to(tmp_path / "uploaded")
    before = unsafe(metrics, "symlink")
    after_midnight = T0 + 400 * S
    saver.write(3, after_midnight, line(after_midnight, 2))
    saver.close(after_midnight + S)

    assert files(out) == [f"2026/03/02/{UUID3}.00001.jsonl.zst"]   # the old day is not made again
    assert files(tmp_path / "uploaded") == [f"{UUID3}.00000.jsonl.zst"]
    assert numbers(tmp_path / "uploaded" / f"{UUID3}.00000.jsonl.zst") == [1]
    assert unsafe(metrics, "symlink") == before + replaced


def test_a_day_directory_moved_away_gets_no_new_files_after_a_second(tmp_path, metrics):
    out = tmp_path / "out"
    saver = Saver(str(out), PREFIX, metrics, Limits(flush_age_ns=S))
    saver.write(3, T0, line(T0, 1))
    saver.flush_due(T0 + S)
    (out / "2026").rename(tmp_path / "moved")
    later = T0 + S + RECHECK_NS
    saver.write(4, later, line(later, 2))
    saver.close(later + S)
    assert files(tmp_path / "moved") == [f"03/01/{UUID3}.00000.jsonl.zst"]
    assert files(out) == [f"{DAY}/{PREFIX}_0000000000000004.00000.jsonl.zst"]


def test_descriptors_stay_a_few_for_thousands_of_connections_over_many_days(tmp_path, metrics):
    def open_fds() -> int:
        return len(os.listdir("/proc/self/fd"))

    baseline = open_fds()
    saver = Saver(str(tmp_path), PREFIX, metrics, Limits(flush_age_ns=S))
    peak = 0
    for cookie in range(1, 3001):
        ts = T0 + (cookie // 300) * 86_400 * S    # ten days, 300 connections each
        saver.write(cookie, ts, line(ts, cookie))
        saver.flush_due(ts + S)
        peak = max(peak, open_fds() - baseline)
    assert len(files(tmp_path)) == 3000
    assert peak <= OPEN_DAYS
    saver.close(T0 + 11 * 86_400 * S)
    assert open_fds() == baseline


@pytest.mark.parametrize("mask", [0o000, 0o022, 0o077], ids=["umask000", "umask022", "umask077"])
@pytest.mark.parametrize("file_mode,dir_mode", [(None, 0o750), (0o644, 0o755), (0o600, 0o700)],
                         ids=["default", "0644", "0600"])
def test_archives_and_directories_get_exactly_the_mode_whatever_the_umask(tmp_path, mask, file_mode, dir_mode, metrics):
    with umask(mask):
        saver = (Saver(str(tmp_path), PREFIX, metrics) if file_mode is None
                 else Saver(str(tmp_path), PREFIX, metrics, file_mode=file_mode))
        saver.write(3, T0, line(T0, 1))
        saver.close(T0)
    (path,) = tmp_path.rglob("*.zst")
    assert mode(path) == (0o640 if file_mode is None else file_mode)
    assert [mode(tmp_path / d) for d in ("2026", "2026/03", DAY)] == [dir_mode] * 3


# ------------------------------------------------------------------------- the real daemon

def days_ahead(seconds: int = 120) -> list[str]:
    """Today's UTC day directory and the one `seconds` from now (a test may cross midnight)."""
    return sorted({time.strftime("%Y/%m/%d", time.gmtime(time.time() + s))
                   for s in (0, seconds)})


def poll_count(testnet) -> float:
    return metric(scrape(testnet, testnet.ns_a), "tcpinfo_polling_interval_histogram_count")


METRICS = "-prometheusx.listen-address=127.0.0.1:9990"


def daemon_with_archive(testnet, shared: Path, daemons):
    """tcp-info that wrote a connection's first archive into day directories the attacker made
    in advance: (daemon, client, server side, that archive's path)."""
    out = shared / "out"
    as_nobody("mkdir", "-p", *days_ahead(), cwd=out)
    client, server, _ = testnet.connect()
    daemon = daemons(testnet, testnet.ns_a, out, "-flush-age=20ms", METRICS)
    wait_until(lambda: uuid_of(client) in archives(out))
    (first,) = archives(out)[uuid_of(client)]
    return daemon, client, server, first


def test_the_daemon_never_appends_through_an_archive_replaced_by_a_symlink(
        testnet, shared, daemons):
    daemon, client, server, first = daemon_with_archive(testnet, shared, daemons)
    out = shared / "out"
    as_nobody("ln", "-sf", str(shared / "victim"), first.name, cwd=first.parent)
    for _ in range(5):
        client.sendall(b"s" * 1000)
        server.recv(65536)
        time.sleep(0.05)
    wait_until(lambda: len(archives(out)[uuid_of(client)]) == 2)
    text = scrape(testnet, testnet.ns_a)
    assert daemon.stop() == 0, daemon.text()

    assert (shared / "victim").read_bytes() == VICTIM and first.is_symlink()
    second = archives(out)[uuid_of(client)][1]
    assert second.name == f"{uuid_of(client)}.00001.jsonl.zst"
    header, *data = read_archive(second)
    assert header.metadata["Sequence"] == 1 and data
    assert metric(text, 'tcpinfo_unsafe_paths_total{kind="symlink"}') >= 1
    assert "is now a symbolic link" in daemon.text()


def test_the_daemon_keeps_records_while_the_year_directory_is_a_symlink_and_writes_them_after(
        testnet, shared, daemons):
    out = shared / "out"
    years = {day[:4] for day in days_ahead()}
    for year in years:
        as_nobody("ln", "-s", str(shared / "elsewhere"), year, cwd=out)
    client, server, _ = testnet.connect()
    daemon = daemons(testnet, testnet.ns_a, out, "-flush-age=20ms", METRICS)
    daemon.wait_for("where a directory should be")
    time.sleep(0.5)
    text = scrape(testnet, testnet.ns_a)
    assert metric(text, 'tcpinfo_write_errors_total{cause="ELOOP"}') >= 1
    assert metric(text, 'tcpinfo_unsafe_paths_total{kind="symlink"}') >= 1
    assert metric(text, "tcpinfo_buffered_bytes") > 0
    assert list((shared / "elsewhere").iterdir()) == []
    removed_ns = time.time_ns()
    for year in years:
        as_nobody("rm", year, cwd=out)

    daemon.wait_for("Archive writes work again")
    wait_until(lambda: records(out, cookie_of(client)))
    assert daemon.stop() == 0, daemon.text()
    assert list((shared / "elsewhere").iterdir()) == []
    assert daemon.text().count("Cannot write archives") == 1   # once per cause
    assert records(out, cookie_of(client))[0].ts_ns < removed_ns   # held, then written


def test_an_archive_replaced_by_a_fifo_blocks_neither_polling_nor_shutdown(
        testnet, shared, daemons):
    daemon, client, server, first = daemon_with_archive(testnet, shared, daemons)
    as_nobody("sh", "-c", "rm -f $1 && mkfifo $1", "attacker", first.name, cwd=first.parent)
    client.sendall(b"f" * 1000)
    server.recv(65536)
    daemon.wait_for("is now a FIFO")

    polls = poll_count(testnet)
    time.sleep(0.5)
    assert poll_count(testnet) > polls + 10     # 10 ms polls go on
    started = time.monotonic()
    assert daemon.stop() == 0, daemon.text()
    assert time.monotonic() - started < 3
    assert stat.S_ISFIFO(first.lstat().st_mode)
    header, *data = read_archive(first.with_name(f"{uuid_of(client)}.00001.jsonl.zst"))
    assert header.metadata["Sequence"] == 1 and data


@pytest.mark.parametrize("mask,flag,env,file_mode,dir_mode", [
    (0o000, None, None, 0o640, 0o750),
    (0o022, None, None, 0o640, 0o750),
    (0o000, "-output-mode=0644", None, 0o644, 0o755),
    (0o022, None, {"OUTPUT_MODE": "0600"}, 0o600, 0o700),
], ids=["default-umask000", "default-umask022", "flag0644-umask000", "env0600-umask022"])
def test_the_daemon_creates_output_directories_and_archives_with_the_output_mode(
        testnet, tmp_path, daemons, mask, flag, env, file_mode, dir_mode):
    client, _server, _ = testnet.connect()
    out = tmp_path / "new" / "out"   # neither exists: the daemon makes both
    with umask(mask):
        daemon = daemons(testnet, testnet.ns_a, out, "-reps=5", *([flag] if flag else []),
                         env=None if env is None else {**os.environ, **env})
    assert daemon.proc.wait(10) == 0, daemon.text()

    (path,) = archives(out)[uuid_of(client)]
    assert mode(path) == file_mode
    tree = [tmp_path / "new", out] + [out / p for p in list(path.relative_to(out).parents)[:-1]]
    assert [mode(d) for d in tree] == [dir_mode] * 5


def test_the_trace_profile_replaces_a_planted_link_instead_of_writing_through_it(
        testnet, shared, daemons):
    out = shared / "out"
    as_nobody("ln", "-s", str(shared / "victim"), "trace.pstats", cwd=out)
    daemon = daemons(testnet, testnet.ns_a, out, "-reps=3", "-trace")
    assert daemon.proc.wait(10) == 0, daemon.text()
    assert (shared / "victim").read_bytes() == VICTIM
    trace = out / "trace.pstats"
    assert stat.S_ISREG(trace.lstat().st_mode) and mode(trace) == 0o640
    assert any(name == "poll_once" for _, _, name in pstats.Stats(str(trace)).stats)
