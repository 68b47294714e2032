"""Build hook: compiles the C core (cffi out-of-line API mode) from cffi_build/.

pyproject.toml holds the metadata; this file exists only because setuptools takes
``cffi_modules`` and the wheel's limited-API tag from setup(), and because a missing C
compiler deserves a clear message instead of a distutils traceback.
"""
from setuptools import setup
from setuptools.command.build_ext import build_ext


class BuildCore(build_ext):
    """build_ext that turns a compiler failure into one actionable error."""

    def run(self) -> None:
        try:
            super().run()
        except Exception as exc:  # CompileError, DistutilsExecError, PlatformError...
            raise SystemExit(
                "tcpinfo: could not compile its C core (cffi_build/*.c): "
                f"{exc}\n"
                "tcpinfo needs a C compiler and the Python headers: on Debian, "
                "`apt-get install gcc python3-dev` (or libpython3-dev for your Python)."
            ) from exc


setup(
    cffi_modules=["cffi_build/build_core.py:ffibuilder"],
    cmdclass={"build_ext": BuildCore},
    # cffi builds the module against Python's limited API (tcpinfo/_native.abi3.so), so the wheel
    # is tagged cp311-abi3: one wheel for every CPython >= 3.11 (requires-python), not just 3.11.
    options={"bdist_wheel": {"py_limited_api": "cp311"}},
)
