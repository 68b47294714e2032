"""The modern schema (csvtool ``--schema modern``): its column names and one archive line's fields.

csvtool prints these rows and ``tcpinfo export`` writes the same values to Parquet, so both read
them from here: every field the kernel sent and nothing it did not, named by the kernel.
"""
from __future__ import annotations

import argparse

from .inetdiag import (
    INET_DIAG_CONG,
    SCALAR_ATTRIBUTES,
    STRUCT_ATTRIBUTES,
    decode_attributes,
    decode_idm,
)
from .record import ZERO_TIME_NS, decode_line, format_time
from .tcp import state_name

IDM_COLUMNS = ["idm.family", "idm.state", "idm.state_name", "idm.timer", "idm.retrans", "idm.sport",
               "idm.dport", "idm.src", "idm.dst", "idm.interface", "idm.cookie", "idm.expires",
               "idm.rqueue", "idm.wqueue", "idm.uid", "idm.inode"]
MODERN_HEADER: list[str] = (
    ["uuid", "timestamp"] + IDM_COLUMNS + ["cong"]
    + [name for name, _ in SCALAR_ATTRIBUTES.values()]
    + [f"{prefix}.{name}" for prefix, layout in STRUCT_ATTRIBUTES.values() for name in layout.names]
)


class BadInput(Exception):
    """Stops a conversion; the message is one line naming file and line."""


def long_line(name: str, lineno: int, max_line_bytes: int) -> BadInput:
    """The error for a line the reader dropped because it was longer than ``max_line_bytes``."""
    return BadInput(f"{name}:{lineno}: line longer than {max_line_bytes} bytes (--max-line-bytes)")


def positive_int(text: str) -> int:
    """argparse type of the converters' ``--max-line-bytes``: an integer of at least 1."""
    try:
        value = int(text)
    except ValueError:
        value = 0
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: want a positive integer")
    return value


def modern_fields(line: bytes) -> tuple[dict[str, object] | None, dict | None]:
    """(decoded fields of a data line, or None for a header line; the line's Metadata or None).

    Absent means not sent: a field the kernel did not send is missing from the dict.
    """
    d = decode_line(line)
    if d.raw_idm is None:
        if d.metadata is None:
            raise ValueError("record has neither Metadata nor RawIDM")
        return None, d.metadata
    idm = decode_idm(d.raw_idm)
    fields: dict[str, object] = {}
    if d.ts_ns != ZERO_TIME_NS or d.offset_s:
        fields["timestamp"] = format_time(d.ts_ns, d.offset_s)
    fields.update({
        "idm.family": idm.family, "idm.state": idm.state, "idm.state_name": state_name(idm.state),
        "idm.timer": idm.timer, "idm.retrans": idm.retrans, "idm.sport": idm.sport, "idm.dport": idm.dport,
        "idm.src": idm.src, "idm.dst": idm.dst, "idm.interface": idm.interface, "idm.cookie": idm.cookie,
        "idm.expires": idm.expires, "idm.rqueue": idm.rqueue, "idm.wqueue": idm.wqueue,
        "idm.uid": idm.uid, "idm.inode": idm.inode,
    })
    if d.attributes:
        if d.attributes[INET_DIAG_CONG:INET_DIAG_CONG + 1] == [b""]:
            raise ValueError("empty CONG attribute")
        fields.update(decode_attributes(d.attributes))
    return fields, d.metadata
