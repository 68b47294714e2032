"""UUIDs of archived connections: `<prefix>_<%016X cookie>` (UPSTREAM.md §11).

The cookie is unique per boot; the prefix (host name and boot time, or an operator-supplied string)
makes the UUID globally unique, so it names the archive files and the event-socket messages.
"""
from __future__ import annotations

import socket
import time


def default_prefix() -> str:
    """m-lab/uuid's fallback `<hostname>_<boot unix seconds>_unsafe`, with its error spellings."""
    try:
        host = socket.gethostname()
    except OSError:
        host = "BADHOSTNAME"
    try:
        with open("/proc/uptime") as f:
            uptime_us = int(float(f.read().split()[0]) * 1_000_000)
    except (OSError, ValueError, IndexError):
        return f"{host}_BADBOOTTIME"
    boot_s = (time.time_ns() // 1000 - uptime_us) // 1_000_000
    return f"{host}_{boot_s}_unsafe"


def make_uuid(prefix: str, cookie: int) -> str:
    return f"{prefix}_{cookie:016X}"
