"""Running the installed csvtool as a user would, and measuring what it costs."""
from __future__ import annotations

import os
import subprocess
import tempfile
import time
from pathlib import Path
from typing import NamedTuple

import orjson
import pytest
import zstandard

from helpers.paths import FINWAIT, script

CSVTOOL = script("csvtool")


def expected_csv(archive: Path) -> bytes:
    return (archive.parent / "expected-csv" / archive.name.replace(".jsonl.zst", ".csv")).read_bytes()


def plain(archive: Path) -> bytes:
    with open(archive, "rb") as compressed:
        return zstandard.ZstdDecompressor().stream_reader(compressed).read()


def run(*args: str, stdin: bytes | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CSVTOOL, *args], input=stdin, capture_output=True, timeout=120)


class Measured(NamedTuple):
    returncode: int
    stderr: str
    peak_rss_kib: int
    """wait4's ru_maxrss: csvtool's peak resident set, or pytest's if that was higher (a vforked
    child inherits its parent's high-water mark until it execs), so an upper bound of csvtool's."""
    rows: int
    """Lines it wrote (counted by ``wc -l`` as they stream, so output of any size costs no memory)."""


class MeasuredRun:
    """csvtool started on real files, stdin read from the file ``stdin``; its output is counted by
    ``wc -l`` as it streams, so output of any size costs no memory.  Several can run at once."""

    def __init__(self, *args: str, stdin: str = os.devnull) -> None:
        self.args = args
        with open(stdin, "rb") as source:
            self._err = tempfile.TemporaryFile()
            self._wc = subprocess.Popen(["wc", "-l"], stdin=subprocess.PIPE, stdout=subprocess.PIPE)
            self._proc = subprocess.Popen([CSVTOOL, *args], stdin=source, stdout=self._wc.stdin,
                                          stderr=self._err)
        self._wc.stdin.close()

    def result(self, timeout: float = 120) -> Measured:
        """Waits for csvtool; fails the test if it has not ended after ``timeout`` seconds (input
        without end must still end, with an error)."""
        deadline = time.monotonic() + timeout
        while not (waited := os.wait4(self._proc.pid, os.WNOHANG))[0]:
            if time.monotonic() > deadline:
                self._proc.kill()
                os.wait4(self._proc.pid, 0)
                self._wc.wait()
                pytest.fail(f"csvtool {' '.join(self.args)} still running after {timeout} s")
            time.sleep(0.02)
        _, status, usage = waited
        self._proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
        with self._wc.stdout as counted:
            count = int(counted.read())
        self._wc.wait()
        with self._err as err:
            err.seek(0)
            return Measured(self._proc.returncode, err.read().decode(), usage.ru_maxrss, count)


def run_measured(*args: str, stdin: str = os.devnull, timeout: float = 120) -> Measured:
    """One MeasuredRun to its end."""
    return MeasuredRun(*args, stdin=stdin).result(timeout)


def bad_inputs(tmp: Path) -> dict[str, tuple[Path, int]]:
    """name -> (file, line number the error must name)."""
    good = plain(FINWAIT).splitlines(keepends=True)
    idm = orjson.loads(good[1])["RawIDM"]
    cases = {
        "truncated-zstd.jsonl.zst": (FINWAIT.read_bytes()[:-200], 1),
        "corrupt-frame.jsonl.zst": (FINWAIT.read_bytes()[:60] + bytes(40) + FINWAIT.read_bytes()[100:], 1),
        "not-json.jsonl": (b"".join(good[:3]) + b"{oops\n" + b"".join(good[3:]), 4),
        "wrong-types.jsonl": (good[0] + b'{"Timestamp":[],"RawIDM":3}\n', 2),
        "attribute-type.jsonl": (good[0] + b'{"RawIDM":"%s","Attributes":[null,7]}\n' % idm.encode(), 2),
        "attribute-list.jsonl": (good[0] + b'{"RawIDM":"%s","Attributes":[null,[1]]}\n' % idm.encode(), 2),
        "short-idm.jsonl": (b"".join(good[:5]) + b'{"RawIDM":"AAAA"}\n', 6),
        "empty-cong.jsonl": (good[0] + b'{"RawIDM":"%s","Attributes":[null,null,null,null,""]}\n' % idm.encode(), 2),
        "bad-base64.jsonl": (good[0] + b'{"RawIDM":"%s!"}\n' % idm.encode(), 2),
        "empty-record.jsonl": (good[0] + b'{"Timestamp":"2019-08-26T19:55:42Z"}\n', 2),
    }
    out = {}
    for name, (data, line) in cases.items():
        (tmp / name).write_bytes(data)
        out[name] = (tmp / name, line)
    out["missing.jsonl.zst"] = (tmp / "missing.jsonl.zst", 0)
    return out
