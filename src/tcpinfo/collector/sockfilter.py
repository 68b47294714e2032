"""Which sockets are recorded, and the same rule compiled to inet_diag bytecode for the kernel.

Upstream drops unwanted sockets in userspace after the kernel has serialized them; on a host where
most sockets are uninteresting that is most of a dump's cost.  `compile_filter` turns the rule into
an INET_DIAG_REQ_BYTECODE program, so the kernel skips them while it walks its tables.  The C core
applies the same rule in userspace as well (to destroy notifications, which bytecode never sees,
and as the fallback when a kernel rejects a program), so both must mean exactly the same thing:
addresses follow the kernel's host conditions (an IPv4 prefix also matches the ``::ffff:a.b.c.d``
form of a dual-stack socket; an IPv6 prefix matches only IPv6 sockets).

The program is built the way iproute2's ``ss`` builds its filters: each fragment accepts by running
off its end and rejects by jumping four bytes past it, and AND, OR and NOT are made by
concatenation, one extra jump and patching of reject targets.
"""
from __future__ import annotations

import ipaddress
import struct
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network

# Upstream's "local" addresses (loopback, link-local, multicast, unspecified), as prefixes.
LOCAL_NETS: tuple[IPNetwork, ...] = tuple(ipaddress.ip_network(n) for n in (
    "127.0.0.0/8", "169.254.0.0/16", "224.0.0.0/4", "0.0.0.0/32",
    "::1/128", "::/128", "fe80::/10", "ff00::/8"))

MAX_PROGRAM = 65535 - 4   # the program travels in one netlink attribute


def ip_address(text: str) -> IPAddress:
    """An address; an IPv4-mapped IPv6 address means its IPv4 host (the kernel's view too)."""
    addr = ipaddress.ip_address(text)
    if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
        return addr.ipv4_mapped
    return addr


def ip_network(text: str) -> IPNetwork:
    """A CIDR prefix (host bits are cleared); ``::ffff:a.b.c.d/n`` (n >= 96) means IPv4."""
    net = ipaddress.ip_network(text, strict=False)
    mapped = ipaddress.IPv6Network("::ffff:0:0/96")
    if isinstance(net, ipaddress.IPv6Network) and net.prefixlen >= 96 and net.subnet_of(mapped):
        v4 = ipaddress.IPv4Address(net.network_address.packed[12:])
        return ipaddress.IPv4Network((v4, net.prefixlen - 96))
    return net


@dataclass
class Filter:
    """The recording rule: upstream's exclusions (bugs fixed), then optional include lists.

    A socket is dropped if its local port is in `srcports`, if `local` and either address is
    local, or if its remote address is in `dstips`.  If `include_nets` is given, one of its two
    addresses must be in one of them; if `include_ports` is given, one of its two ports must be in
    one of the (first, last) ranges.
    """

    local: bool = True
    srcports: set[int] = field(default_factory=set)
    dstips: list[str] = field(default_factory=list)
    include_nets: list[str] = field(default_factory=list)
    include_ports: list[tuple[int, int]] = field(default_factory=list)

    def __post_init__(self) -> None:
        for port in self.srcports:
            if not 0 <= port <= 65535:
                raise ValueError(f"port {port} is outside 0-65535")
        for first, last in self.include_ports:
            if not 0 <= first <= last <= 65535:
                raise ValueError(f"port range {first}-{last} is not within 0-65535")

    def addresses(self) -> list[IPAddress]:
        return [ip_address(text) for text in self.dstips]

    def networks(self) -> list[IPNetwork]:
        return [ip_network(text) for text in self.include_nets]


# --- inet_diag bytecode ------------------------------------------------------------------------

_NOP, _JMP, _S_GE, _S_LE, _D_GE, _D_LE, _AUTO, _S_COND, _D_COND = range(9)
_OP = struct.Struct("=BBH")            # struct inet_diag_bc_op: code, yes, no
_HOSTCOND = struct.Struct("=BBxxi")    # struct inet_diag_hostcond: family, prefix_len, port


def _op(code: int, yes: int, no: int) -> bytes:
    return _OP.pack(code, yes, no)


def _port(code: int, port: int) -> bytes:
    """Compare the local (S_*) or remote (D_*) port; the operand rides in a second op."""
    return _op(code, 8, 12) + _op(_NOP, 0, port)


def _host(code: int, net: IPNetwork) -> bytes:
    """S_COND/D_COND: the local or remote address is in net (any port)."""
    family = 2 if net.version == 4 else 10
    cond = _HOSTCOND.pack(family, net.prefixlen, -1) + net.network_address.packed
    size = _OP.size + len(cond)
    return _op(code, size, size + 4) + cond


def _ops(program: bytes) -> Iterable[int]:
    """Offsets of the ops on the fall-through chain (what the kernel's audit walks)."""
    pos = 0
    while pos < len(program):
        yield pos
        pos += program[pos + 1]


def _and(a: bytes, b: bytes) -> bytes:
    """a's rejects (jumps to just past a) now jump past b; a's acceptance falls into b."""
    out = bytearray(a)
    for pos in _ops(a):
        code, yes, no = _OP.unpack_from(out, pos)
        if no == len(a) - pos + 4:
            _OP.pack_into(out, pos, code, yes, no + len(b))
    return bytes(out) + b


def _or(a: bytes, b: bytes) -> bytes:
    """a's rejects land on b; a's acceptance reaches a jump over b to the end."""
    return a + _op(_JMP, 4, len(b) + 4) + b


def _not(a: bytes) -> bytes:
    """a's acceptance reaches a jump to the reject target; a's rejects land on the end."""
    return a + _op(_JMP, 4, 8)


def _any(fragments: Sequence[bytes], combine=_or) -> bytes:
    program = fragments[0]
    for fragment in fragments[1:]:
        program = combine(program, fragment)
    return program


def _port_range(ge: int, le: int, first: int, last: int) -> bytes:
    if first == 0:
        return _port(le, last)
    if last == 65535:
        return _port(ge, first)
    return _and(_port(ge, first), _port(le, last))


def _ranges(ports: Iterable[int]) -> list[tuple[int, int]]:
    """Sorted ports as maximal runs: {1, 2, 3, 7} -> [(1, 3), (7, 7)]."""
    runs: list[tuple[int, int]] = []
    for port in sorted(ports):
        if runs and runs[-1][1] == port - 1:
            runs[-1] = (runs[-1][0], port)
        else:
            runs.append((port, port))
    return runs


def port_share(local: bool, first: int, last: int) -> bytes:
    """A program keeping sockets whose local (or remote) port is within first..last."""
    return _port_range(_S_GE, _S_LE, first, last) if local else _port_range(_D_GE, _D_LE, first, last)


def both(a: bytes, b: bytes) -> bytes:
    """A program keeping what a and b both keep (b"" keeps everything)."""
    return _and(a, b) if a and b else a or b


def compile_filter(f: Filter) -> bytes:
    """The filter as an inet_diag bytecode program; b"" when it keeps everything.

    Raises ValueError when the program would not fit in one netlink attribute.
    """
    excluded = [_port_range(_S_GE, _S_LE, *r) for r in _ranges(f.srcports)]
    if f.local:
        excluded += [_host(code, net) for net in LOCAL_NETS for code in (_S_COND, _D_COND)]
    excluded += [_host(_D_COND, ipaddress.ip_network(addr)) for addr in f.addresses()]
    parts = [_not(_any(excluded))] if excluded else []
    nets = f.networks()
    if nets:
        parts.append(_any([_or(_host(_S_COND, n), _host(_D_COND, n)) for n in nets]))
    if f.include_ports:
        parts.append(_any([_or(_port_range(_S_GE, _S_LE, *r), _port_range(_D_GE, _D_LE, *r))
                           for r in f.include_ports]))
    program = _any(parts, _and) if parts else b""
    if len(program) > MAX_PROGRAM:
        raise ValueError(f"the filter compiles to {len(program)} bytes of bytecode; the kernel "
                         f"takes at most {MAX_PROGRAM}")
    return program
