"""Helpers for tests that run the real tcp-info: archives, the daemon process, metrics, events."""
from __future__ import annotations

import signal
import socket
import subprocess
import time
import urllib.request
from pathlib import Path

import zstandard

from lab.netns import cookie_of
from tcpinfo.archive.record import DecodedLine, decode_line

PREFIX = "test-host_1700000000"


def read_archive(path: Path) -> list[DecodedLine]:
    """Every line of a multi-frame .jsonl.zst file."""
    with open(path, "rb") as f:
        data = zstandard.ZstdDecompressor().stream_reader(f, read_across_frames=True).read()
    return [decode_line(line) for line in data.splitlines()]


def archives(root: Path) -> dict[str, list[Path]]:
    """Archive files by UUID, in sequence order."""
    series: dict[str, list[Path]] = {}
    for path in sorted(root.rglob("*.jsonl.zst"), key=lambda p: p.name):
        series.setdefault(path.name.split(".")[0], []).append(path)
    return series


def records(root: Path, cookie: int) -> list[DecodedLine]:
    """The data records (headers left out) of one connection, across its files."""
    lines: list[DecodedLine] = []
    for path in archives(root).get(f"{PREFIX}_{cookie:016X}", []):
        lines += [line for line in read_archive(path) if line.raw_idm is not None]
    return lines


def uuid_of(sock: socket.socket) -> str:
    return f"{PREFIX}_{cookie_of(sock):016X}"


class Daemon:
    """tcp-info running in a namespace, its stderr in a file in `workdir`."""

    def __init__(self, workdir: Path, topo, ns: str, out: Path, *flags: str,
                 env: dict | None = None) -> None:
        prefix_file = workdir / "prefix"
        prefix_file.write_text(PREFIX)
        self.log = workdir / f"tcp-info.{len(list(workdir.glob('*.log')))}.log"
        with open(self.log, "ab") as log:
            self.proc = topo.popen(ns, "tcp-info", "-output", str(out), "-uuid-prefix-file",
                                   str(prefix_file), "-prometheusx.listen-address=", *flags,
                                   stdout=subprocess.DEVNULL, stderr=log, env=env)

    def text(self) -> str:
        return self.log.read_text()

    def wait_for(self, text: str, timeout: float = 10.0) -> None:
        deadline = time.monotonic() + timeout
        while text not in self.text():
            assert self.proc.poll() is None, f"tcp-info exited:\n{self.text()}"
            assert time.monotonic() < deadline, f"never logged {text!r}:\n{self.text()}"
            time.sleep(0.02)

    def stop(self, timeout: float = 5.0) -> int:
        self.proc.send_signal(signal.SIGTERM)
        return self.proc.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()


def wait_until(condition, timeout: float = 5.0) -> None:
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition never became true"
        time.sleep(0.02)


def metric(text: str, name: str) -> float:
    """A sample's value from Prometheus text exposition (`name` includes any labels)."""
    for row in text.splitlines():
        if row.startswith(name + " "):
            return float(row.split()[-1])
    raise AssertionError(f"{name} not exposed")


def scrape(topo, ns: str | None = None) -> str:
    """/metrics of a daemon listening on 127.0.0.1:9990 in `ns` (default: b)."""
    with topo.inside(ns or topo.ns_b):
        with urllib.request.urlopen("http://127.0.0.1:9990/metrics", timeout=5) as reply:
            return reply.read().decode()


CLIENT = """
import socket, sys
s = socket.socket(socket.AF_UNIX)
s.connect(sys.argv[1])
for line in s.makefile("rb"):
    sys.stdout.buffer.write(line)
    sys.stdout.flush()
"""
