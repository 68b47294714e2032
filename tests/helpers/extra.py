"""The analysis commands run as if one of their dependencies were not installed."""
from __future__ import annotations

import subprocess
import sys
from pathlib import Path


def assert_missing_module_is_one_line(module: str, argv: list[str], cwd: Path) -> None:
    """``tcpinfo ARGV`` with ``module`` unimportable exits 1 with one line naming the module
    and the install command."""
    code = (f"import sys; sys.modules[{module!r}] = None; from tcpinfo.analysis.cli import main; "
            f"sys.exit(main({argv!r}))")
    result = subprocess.run([sys.executable, "-P", "-c", code], capture_output=True, cwd=cwd)
    err = result.stderr.decode()
    assert result.returncode == 1 and err.count("\n") == 1, err
    assert module in err and "pip install 'tcpinfo[analysis]'" in err
