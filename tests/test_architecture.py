"""The layout of docs/architecture.md, held to: layers, imports without side effects, one home per
fact across Python and C, the lab outside the package, and a clean lint and type check."""
from __future__ import annotations

import ast
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from helpers.paths import REPO
from tcpinfo.core.binding import ffi, lib
from tcpinfo.kernel.inetdiag import IDM, IDM_LEN, INET_DIAG_INFO, MAX_ATTR_TYPE
from tcpinfo.kernel.tcp import TCP_INFO

SRC = REPO / "src"
PACKAGE = SRC / "tcpinfo"


def run_tool(*args: str) -> subprocess.CompletedProcess:
    """A checker run on the checkout's sources (not the installed copy), as a developer runs it."""
    return subprocess.run([sys.executable, "-m", *args], cwd=REPO, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(SRC)), timeout=600)


def test_the_import_layers_of_pyproject_hold():
    proc = run_tool("importlinter.cli")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]
    assert "broken" not in proc.stdout.split("Contracts:")[-1].replace("0 broken", "")


def test_ruff_finds_nothing_in_the_package_the_lab_or_the_tests():
    proc = run_tool("ruff", "check", "--no-cache", "src", "lab", "tests")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


def test_mypy_finds_no_type_error_in_the_package(tmp_path):
    proc = run_tool("mypy", "--no-incremental", "--cache-dir", str(tmp_path))
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-2000:]


# What a consumer's import may bring along: never metrics, and the compiled core only for csvtool,
# whose upstream schema is C.
CONSUMERS = {
    "tcpinfo.events.client": False,
    "tcpinfo.events.cli": False,
    "tcpinfo.archive.record": False,
    "tcpinfo.archive.reader": False,
    "tcpinfo.kernel.inetdiag": False,
    "tcpinfo.csvtool.modern": False,
    "tcpinfo.csvtool.cli": True,
}
PROBE = """
import json, sys
before = set(sys.modules)
import {module}
print(json.dumps(sorted(set(sys.modules) - before)))
"""


@pytest.mark.parametrize("module", sorted(CONSUMERS))
def test_importing_a_consumer_module_loads_no_metrics_and_only_the_core_it_uses(module):
    proc = subprocess.run([sys.executable, "-c", PROBE.format(module=module)], cwd="/",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    loaded = set(eval(proc.stdout))   # a JSON list of names is a Python literal
    assert not {m for m in loaded if m.split(".")[0] == "prometheus_client"}
    assert not {m for m in loaded if m.startswith(("tcpinfo.collector", "tcpinfo.servers"))}
    assert ("tcpinfo.core._native" in loaded) == CONSUMERS[module]


DAEMON_IMPORTS = """
import prometheus_client
from prometheus_client import CollectorRegistry, Counter, generate_latest
import tcpinfo.collector.main, tcpinfo.collector.metrics, tcpinfo.servers.eventserver
names = {m.name for m in prometheus_client.REGISTRY.collect()}
assert not {n for n in names if n.startswith("tcpinfo") or n.startswith("git_")}, names
fresh = CollectorRegistry()
Counter("probe", "a counter made after the imports", registry=fresh).inc()
assert b"probe_created" in generate_latest(fresh), "importing changed a process-wide setting"
print("ok")
"""


def test_importing_the_daemon_registers_nothing_and_changes_no_process_setting():
    proc = subprocess.run([sys.executable, "-c", DAEMON_IMPORTS], cwd="/", capture_output=True,
                          text=True, timeout=60)
    assert (proc.returncode, proc.stdout) == (0, "ok\n"), proc.stderr


def test_only_the_binding_imports_the_compiled_module():
    importers = set()
    for path in PACKAGE.rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            names = ([node.module or ""] if isinstance(node, ast.ImportFrom)
                     else [a.name for a in node.names] if isinstance(node, ast.Import) else [])
            if any(name.endswith("_native") for name in names):
                importers.add(path.relative_to(PACKAGE).as_posix())
    assert importers == {"core/binding.py"}


def test_the_python_message_table_agrees_with_the_c_cores_offsetof():
    layout = ffi.new("struct tcpi_layout *")
    lib.tcpi_layout(layout)
    assert layout.idm_len == IDM_LEN
    for name, c_name in (("family", "idm_family"), ("state", "idm_state"), ("timer", "idm_timer"),
                         ("sport", "idm_sport"), ("dport", "idm_dport"), ("src", "idm_src"),
                         ("dst", "idm_dst"), ("interface", "idm_if"), ("cookie", "idm_cookie")):
        assert IDM[name] == getattr(layout, c_name), name
    assert (layout.max_slot, layout.info_type) == (MAX_ATTR_TYPE, INET_DIAG_INFO)
    # Upstream's Compare reads tcp_info up to the last_* timers, then from pmtu to busy_time.
    assert list(layout.compared) == [0, TCP_INFO.offsets["last_data_sent"], TCP_INFO.offsets["pmtu"],
                                     TCP_INFO.offsets["busy_time"]]


def test_the_architecture_page_names_every_module_of_the_package():
    page = (REPO / "docs" / "architecture.md").read_text()
    table = {(folder, module) for folder, modules in re.findall(r"^\| `(\w+)/` \| (.*) \|$", page, re.M)
             for module in re.findall(r"`(\w+)`", modules)}
    present = {(p.parent.name, p.stem) for p in PACKAGE.glob("*/*.py") if p.stem != "__init__"}
    assert present == table


def test_the_benchmarks_run_from_a_checkout_and_the_lab_is_not_installed():
    proc = subprocess.run([sys.executable, "-m", "lab.bench", "--version"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and proc.stdout.startswith("python3 -m lab.bench "), proc.stderr
    elsewhere = subprocess.run([sys.executable, "-c", "import lab"], cwd="/", capture_output=True,
                               text=True, timeout=60)
    assert elsewhere.returncode != 0 and "No module named 'lab'" in elsewhere.stderr
    installed = Path(__import__("tcpinfo").__file__).parent
    assert not [p for p in installed.rglob("*.py") if "bench" in p.name or p.name == "netns.py"]
