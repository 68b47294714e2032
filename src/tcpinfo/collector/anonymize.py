"""`-anonymize.ip=netblock`: blur the remote address in archived records (UPSTREAM.md §10).

M-Lab publishes its archives, so client addresses are cut to their network block before they reach
disk: IPv4 to /24, IPv6 to /48, IPv4-mapped IPv6 to the /24 of the IPv4 address.  Addresses of the
host itself are kept whole (upstream issue #115): the server side is not private, and keeping it lets
analysis tell the two ends apart.  Only archives are anonymized; the event socket keeps real addresses.
"""
from __future__ import annotations

import ipaddress
import socket
from collections.abc import Callable, Iterable

from tcpinfo.kernel.inetdiag import IDM

_ADDRESS_OFFSETS = (IDM["src"], IDM["dst"])
_V4MAPPED = bytes(10) + b"\xff\xff"
_ZERO10 = bytes(10)

Anonymizer = Callable[[bytes], bytes]


def host_addresses() -> list[str]:
    """Every address on the host's interfaces (loopback included), read once at startup as upstream."""
    from pyroute2 import IPRoute
    with IPRoute() as ipr:
        return [msg.get_attr("IFA_LOCAL") or msg.get_attr("IFA_ADDRESS") for msg in ipr.get_addr()]


class Netblock:
    """Zeroes the host part of each address in a raw inet_diag_msg that is not one of the host's own."""

    def __init__(self, own_addresses: Iterable[str]) -> None:
        self._own = {_key16(a) for a in own_addresses}

    def __call__(self, idm: bytes) -> bytes:
        """A copy of the 72-byte message with src and dst anonymized; ValueError for another family."""
        family = idm[IDM["family"]]
        out = bytearray(idm)
        own = self._own
        for off in _ADDRESS_OFFSETS:
            if family == socket.AF_INET:
                if _V4MAPPED + idm[off:off + 4] not in own:
                    out[off + 3] = 0
            elif family == socket.AF_INET6:
                addr = idm[off:off + 16]
                if addr in own:
                    continue
                if addr[:12] == _V4MAPPED:
                    out[off + 15] = 0
                else:
                    out[off + 6:off + 16] = _ZERO10
            else:
                raise ValueError(f"cannot anonymize address family {family}")
        return bytes(out)


def _key16(address: str) -> bytes:
    """16-byte form in which an IPv4 address equals its ::ffff: mapping (Go's net.IP.Equal)."""
    ip = ipaddress.ip_address(address)
    return _V4MAPPED + ip.packed if ip.version == 4 else ip.packed


def make_anonymizer(method: str) -> Anonymizer | None:
    """The anonymizer for a validated `-anonymize.ip` value; None means records are kept as they are."""
    return Netblock(host_addresses()) if method == "netblock" else None
