"""The binding of tcpinfo's C core: the one module that loads the compiled `_native`.

The core is built by cffi in out-of-line API mode from `cffi_build/` (its header's marked part is
the cdef, so the interface is declared once).  Python modules that call C import `ffi` and `lib`
from here, and read the core's enum values from the compiled module through the names below, so
no number the C side defines is written a second time in Python.  Everything else in tcpinfo (the
event client, the archive decoders and reader, the kernel decoders) runs without it.
"""
from __future__ import annotations

from tcpinfo.core._native import ffi, lib

__all__ = ["ffi", "lib", "CHANGE_NAMES", "PREVIOUS_WAS_NIL", "FINAL", "SHORT", "STATUS_NAMES"]

CHANGE_NAMES: dict[int, str] = {
    lib.TCPI_NO_CHANGE: "NoMajorChange",
    lib.TCPI_STATE_CHANGE: "IDiagStateChange",
    lib.TCPI_NO_TCPINFO: "NoTCPInfo",
    lib.TCPI_NEW_ATTRIBUTE: "NewAttribute",
    lib.TCPI_LOST_ATTRIBUTE: "LostAttribute",
    lib.TCPI_ATTRIBUTE_LENGTH: "AttributeLength",
    lib.TCPI_STATE_OR_COUNTER: "StateOrCounterChange",
    lib.TCPI_PACKET_COUNT: "PacketCountChange",
    lib.TCPI_PREVIOUS_WAS_NIL: "PreviousWasNil",
    lib.TCPI_OTHER: "Other",
}
"""Upstream's ChangeType names (UPSTREAM.md 3.3), by the core's value."""
PREVIOUS_WAS_NIL: int = lib.TCPI_PREVIOUS_WAS_NIL
"""A record of a connection new to the polls."""
FINAL: int = lib.TCPI_FINAL
"""From a destroy notification: the last tcp_info of a connection the polls had seen."""
SHORT: int = lib.TCPI_SHORT
"""From a destroy notification: a connection that lived between two polls."""

STATUS_NAMES: dict[int, str] = {
    lib.TCPI_E_SYSCALL: "syscall",
    lib.TCPI_E_SEQ: "wrong seq num",
    lib.TCPI_E_PID: "wrong pid",
    lib.TCPI_E_NLMSG_ERROR: "NLMSG_ERROR",
    lib.TCPI_E_TRUNCATED: "truncated",
    lib.TCPI_E_NOMEM: "out of memory",
}
"""Why a family's dump failed, by the core's status value (the metric's label values)."""
