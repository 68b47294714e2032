"""Archived connections fed snapshot by snapshot to the per-connection accumulator, as the collector
would feed it."""
from __future__ import annotations

from tcpinfo.archive.reader import read_archive
from tcpinfo.archive.record import parse_time
from tcpinfo.csvtool.modern import modern_fields
from tcpinfo.health.connection import Accumulator


def accumulate(paths) -> dict[str, Accumulator]:
    """Each connection of ``paths`` fed to an Accumulator snapshot by snapshot, as the collector
    would: keyed by UUID (or file#cookie without a header)."""
    accs: dict[str, Accumulator] = {}
    for path in paths:
        uuid = ""
        for _, line in read_archive(str(path)):
            fields, metadata = modern_fields(line)
            if metadata is not None:
                uuid = str(metadata.get("UUID", ""))
            if fields is None:
                continue
            ts = parse_time(fields["timestamp"])[0] if "timestamp" in fields else None
            key = uuid or f"{path}#{fields['idm.cookie']}"
            accs.setdefault(key, Accumulator()).add(ts, fields)
    return accs
