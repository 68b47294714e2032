"""cffi out-of-line API build of tcpinfo's C core (``tcpinfo.core._native``).

Like ``cryptography``'s bindings, the cdef comes from the C header itself (the
part between the CDEF markers), so the C interface is declared exactly once.
Run directly (``python cffi_build/build_core.py``) to build the module in place
for development; ``pip install .`` builds it through setup.py's cffi_modules.
"""
from pathlib import Path

from cffi import FFI

HERE = Path(__file__).resolve().parent
HEADER = HERE / "tcpinfo_core.h"
SOURCES = ("table.c", "message.c", "filter.c", "netlink.c", "remnants.c", "poll.c", "lookup.c",
           "threads.c", "destroy.c", "encode.c", "lines.c", "csv.c", "columns.c")


def _cdef_text() -> str:
    text = HEADER.read_text()
    start = text.index("/* CDEF-BEGIN */") + len("/* CDEF-BEGIN */")
    return text[start:text.index("/* CDEF-END */")]


def _source(name: str) -> str:
    """A C file's path, relative to the cwd when possible (setuptools wants relative paths)."""
    path = HERE / name
    return str(path.relative_to(Path.cwd())) if HERE.is_relative_to(Path.cwd()) else str(path)


ffibuilder = FFI()
ffibuilder.cdef(_cdef_text())
ffibuilder.set_source(
    "tcpinfo.core._native",
    '#include "tcpinfo_core.h"',
    sources=[_source(name) for name in SOURCES],
    include_dirs=[str(HERE)],
    extra_compile_args=["-O2", "-std=gnu11", "-pthread", "-Wall", "-Wextra",
                        "-Wno-unused-parameter"],
    extra_link_args=["-pthread"],
)

if __name__ == "__main__":
    import os
    os.chdir(HERE.parent / "src")   # the module lands in src/tcpinfo/core/, beside its binding
    ffibuilder.compile(verbose=False)
