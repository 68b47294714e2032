"""Installing tcpinfo: the wheel's tag, licence and scripts, and what a missing compiler says."""
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

import tcpinfo
from helpers.paths import REPO, script

SCRIPTS = ("tcp-info", "csvtool", "tcpinfo-events", "tcpinfo")


def source_copy(tmp_path: Path) -> Path:
    """The checkout without build products: an earlier in-tree build must not let setuptools
    skip the compiler or put a stale module in the wheel."""
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "*.o", "_native.c", "__pycache__"))
    return source


def build_wheel(source: Path, out: Path, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(out), str(source)],
                          capture_output=True, text=True, env=env, timeout=600)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    proc = build_wheel(source_copy(tmp), tmp / "wheels")
    assert proc.returncode == 0, proc.stdout + proc.stderr
    (path,) = (tmp / "wheels").glob("*.whl")
    with zipfile.ZipFile(path) as archive:
        yield archive


def test_install_without_a_compiler_fails_with_a_clear_message(tmp_path):
    proc = build_wheel(source_copy(tmp_path), tmp_path / "wheels",
                       env=dict(os.environ, CC=str(tmp_path / "no-such-cc")))
    assert proc.returncode != 0
    assert "tcpinfo: could not compile its C core" in proc.stdout + proc.stderr
    assert "apt-get install gcc python3-dev" in proc.stdout + proc.stderr


def test_the_wheel_is_tagged_abi3_like_the_limited_api_module_it_carries(wheel):
    # cffi compiles against the limited API (tcpinfo/core/_native.abi3.so): one wheel for every
    # CPython >= 3.11, so the tag must say cp311-abi3, not cp3XY-cp3XY nor py3-none-any.
    modules = [n for n in wheel.namelist() if n.endswith(".so")]
    assert modules == ["tcpinfo/core/_native.abi3.so"]
    name, version, python, abi, platform = Path(wheel.filename).stem.split("-")
    assert (name, version, python, abi) == ("tcpinfo", tcpinfo.__version__, "cp311", "abi3")
    assert platform.startswith("linux_") or platform.startswith("manylinux")
    info = f"tcpinfo-{tcpinfo.__version__}.dist-info"
    assert f"Tag: cp311-abi3-{platform}" in wheel.read(f"{info}/WHEEL").decode().splitlines()


def test_the_wheel_carries_the_package_alone_no_benchmarks_or_test_hosts(wheel):
    tops = {n.split("/")[0] for n in wheel.namelist()}
    assert tops == {"tcpinfo", f"tcpinfo-{tcpinfo.__version__}.dist-info"}
    assert not [n for n in wheel.namelist() if "bench" in n or n.endswith("netns.py")]


def test_the_wheel_declares_apache_2_and_carries_the_licence_text(wheel):
    info = f"tcpinfo-{tcpinfo.__version__}.dist-info"
    metadata = wheel.read(f"{info}/METADATA").decode().split("\n\n")[0].splitlines()
    assert f"Version: {tcpinfo.__version__}" in metadata
    assert "License-Expression: Apache-2.0" in metadata
    assert "License-File: LICENSE" in metadata
    assert wheel.read(f"{info}/licenses/LICENSE") == (REPO / "LICENSE").read_bytes()
    entry_points = wheel.read(f"{info}/entry_points.txt").decode()
    assert all(f"\n{name} = " in entry_points for name in SCRIPTS)


@pytest.mark.parametrize("flag", ["--version", "-version"])
@pytest.mark.parametrize("name", SCRIPTS)
def test_every_console_script_prints_its_name_and_the_package_version(name, flag):
    proc = subprocess.run([script(name), flag], capture_output=True, text=True, timeout=30)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, f"{name} {tcpinfo.__version__}\n", "")
