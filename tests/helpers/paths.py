"""Where the tests find the checkout, its test data and the installed console scripts.

Everything the tests read lives in the checkout (tests/testdata, see its README) or in the
environment the package was installed into, so `pytest` passes on a fresh clone alone.
"""
from __future__ import annotations

import os
import shutil
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[2]
TESTDATA = REPO / "tests" / "testdata"
ARCHIVES = sorted(TESTDATA.glob("*/*.jsonl.zst"))
"""Every archive with an expected-csv/ twin: upstream's (mlab/) and Linux 6.18's (kernel-6.18/)."""
NDT = TESTDATA / "mlab" / "ndt-7hhhv_1559749627_0000000000062D84.00000.jsonl.zst"
FINWAIT = TESTDATA / "mlab" / "finwait2-sample_1554836592_unsafe_000000000135A272.00000.jsonl.zst"


def script(name: str) -> str:
    """A console script of the Python running the tests (a venv's bin may not be on PATH)."""
    found = shutil.which(name, path=str(Path(sys.executable).parent)) or shutil.which(name)
    if found is None:
        raise FileNotFoundError(f"the {name} console script is not installed: "
                                f"pip install '.[test]' first")
    return found


def tool(name: str) -> str:
    """A system program a test needs (Debian package prometheus: promtool, prometheus).

    Missing, it fails the test under CI (`.ci/run` exports CI=true and installs it: a skip there
    would hide a gap) and skips it elsewhere, saying what to install.
    """
    found = shutil.which(name)
    if found is None:
        if os.environ.get("CI"):
            pytest.fail(f"{name} is missing in CI: apt-get install -y prometheus")
        pytest.skip(f"{name} not installed (Debian: apt-get install -y prometheus)")
    return found
