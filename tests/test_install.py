"""Installing tcpinfo compiles its C core; without a compiler that must say what to do."""
import os
import shutil
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_install_without_a_compiler_fails_with_a_clear_message(tmp_path):
    # A copy without build products: an earlier in-tree build must not let setuptools skip
    # the compiler.
    source = tmp_path / "src"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(
        ".git", "build", "*.egg-info", "*.so", "*.o", "_native.c", "__pycache__"))
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"))
    proc = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w",
                           str(tmp_path / "wheels"), str(source)],
                          capture_output=True, text=True, env=env, timeout=600)
    assert proc.returncode != 0
    assert "tcpinfo: could not compile its C core" in proc.stdout + proc.stderr
    assert "apt-get install gcc python3-dev" in proc.stdout + proc.stderr
