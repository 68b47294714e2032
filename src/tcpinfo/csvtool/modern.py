"""csvtool's modern schema: correct names, every field the kernel sent and nothing it did not.

One row per data line, as CSV (``MODERN_HEADER``) or JSON lines, with the connection's UUID from
the file's Metadata line, decoded wscale nibbles and app_limited bits, CGROUP_ID and SOCKOPT, the
real interface index, and no metadata row.  ``modern_fields`` is also what other readers of the
archives (analysis, tests) use to decode a line into named fields.
"""
from __future__ import annotations

from typing import BinaryIO

import orjson

from tcpinfo.archive.record import ZERO_TIME_NS, decode_line, format_time
from tcpinfo.csvtool.gocsv import go_csv_field
from tcpinfo.kernel.inetdiag import (
    INET_DIAG_CONG,
    SCALAR_ATTRIBUTES,
    STRUCT_ATTRIBUTES,
    decode_attributes,
    decode_idm,
)
from tcpinfo.kernel.tcp import state_name

IDM_COLUMNS = ["idm.family", "idm.state", "idm.state_name", "idm.timer", "idm.retrans", "idm.sport",
               "idm.dport", "idm.src", "idm.dst", "idm.interface", "idm.cookie", "idm.expires",
               "idm.rqueue", "idm.wqueue", "idm.uid", "idm.inode"]
MODERN_HEADER: list[str] = (
    ["uuid", "timestamp"] + IDM_COLUMNS + ["cong"]
    + [name for name, _ in SCALAR_ATTRIBUTES.values()]
    + [f"{prefix}.{name}" for prefix, layout in STRUCT_ATTRIBUTES.values() for name in layout.names]
)


def modern_fields(line: bytes) -> tuple[dict[str, object] | None, dict | None]:
    """(decoded fields of a data line, or None for a header line; the line's Metadata or None).

    Absent means not sent: a field the kernel did not send is missing from the dict.
    """
    d = decode_line(line)
    if d.raw_idm is None:
        if d.metadata is None:
            raise ValueError("record has neither Metadata nor RawIDM")
        return None, d.metadata
    fields: dict[str, object] = {}
    if d.ts_ns != ZERO_TIME_NS or d.offset_s:
        fields["timestamp"] = format_time(d.ts_ns, d.offset_s)
    fields.update(message_fields(d.raw_idm, d.attributes))
    return fields, d.metadata


def message_fields(raw_idm: bytes, attributes: list[bytes | None] | None) -> dict[str, object]:
    """One snapshot's inet_diag_msg and attributes by the modern schema's names (no timestamp):
    what csvtool prints and what the collector's query answer shows."""
    idm = decode_idm(raw_idm)
    fields: dict[str, object] = {
        "idm.family": idm.family, "idm.state": idm.state, "idm.state_name": state_name(idm.state),
        "idm.timer": idm.timer, "idm.retrans": idm.retrans, "idm.sport": idm.sport, "idm.dport": idm.dport,
        "idm.src": idm.src, "idm.dst": idm.dst, "idm.interface": idm.interface, "idm.cookie": idm.cookie,
        "idm.expires": idm.expires, "idm.rqueue": idm.rqueue, "idm.wqueue": idm.wqueue,
        "idm.uid": idm.uid, "idm.inode": idm.inode,
    }
    if attributes:
        if attributes[INET_DIAG_CONG:INET_DIAG_CONG + 1] == [b""]:
            raise ValueError("empty CONG attribute")
        fields.update(decode_attributes(attributes))
    return fields


class ModernConverter:
    """Rows of the modern schema (CSV or JSON lines); the UUID comes from the file's header line."""

    def __init__(self, json_lines: bool) -> None:
        self.json_lines = json_lines
        self.uuid = ""

    def header(self) -> str | None:
        return None if self.json_lines else ",".join(MODERN_HEADER)

    def start_file(self) -> None:
        self.uuid = ""

    def write_rows(self, text: bytes, pos: int, out: BinaryIO) -> tuple[int, int]:
        """No fast path: every line goes through ``row``."""
        return pos, 0

    def row(self, line: bytes) -> str | None:
        fields, metadata = modern_fields(line)
        if metadata is not None:
            self.uuid = str(metadata.get("UUID", ""))
        if fields is None:
            return None
        fields = {"uuid": self.uuid, **fields}
        if self.json_lines:
            return orjson.dumps(fields).decode()
        return ",".join(go_csv_field(str(fields.get(col, ""))) for col in MODERN_HEADER)
