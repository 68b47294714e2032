"""struct tcp_info (UPSTREAM.md §6.2) and TCP state names.

The kernel appends fields to tcp_info release after release and sends only as many bytes as it
knows, so a decoder must take any length: a field lies entirely inside the received bytes or it is
absent (never zero-filled, which would be indistinguishable from a real zero).  One table drives
every decoder here, including the Go-compatible view csvtool needs for upstream's CSV.
"""
from __future__ import annotations

import struct
from typing import NamedTuple

STATE_NAMES: tuple[str, ...] = (
    "INVALID",
    "ESTABLISHED",
    "SYN_SENT",
    "SYN_RECV",
    "FIN_WAIT1",
    "FIN_WAIT2",
    "TIME_WAIT",
    "CLOSE",
    "CLOSE_WAIT",
    "LAST_ACK",
    "LISTEN",
    "CLOSING",
)
ALL_STATES_MASK = 0xFFF


def state_name(state: int) -> str:
    """Upstream's ``tcp.State.String()``: the kernel name or ``UNKNOWN_STATE_<n>``."""
    if 0 <= state < len(STATE_NAMES):
        return STATE_NAMES[state]
    return f"UNKNOWN_STATE_{state}"


class Field(NamedTuple):
    """One struct member: kernel name, upstream CSV name, offset, kernel format, upstream format.

    ``fmt`` is the kernel's own type; ``go_fmt`` is how upstream's Go struct reads it (several
    u64 counters are int64 there, so ~0 prints as -1).  ``go_name`` is the column name upstream's
    csvtool prints, quirks included; both are None for members upstream's struct lacks.
    """

    name: str
    go_name: str | None
    offset: int
    fmt: str
    go_fmt: str | None


def _parse_fields(rows: str) -> tuple[Field, ...]:
    """Fields from ``name GoName fmt go_fmt`` rows (``-`` = none), naturally aligned like C."""
    out = []
    offset = 0
    for row in rows.split("\n"):
        if not row.strip():
            continue
        name, go_name, fmt, go_fmt = row.split()
        size = struct.calcsize(fmt)
        offset = (offset + size - 1) // size * size
        out.append(Field(name, None if go_name == "-" else go_name, offset, fmt,
                         None if go_fmt == "-" else go_fmt))
        offset += size
    return tuple(out)


def pad(n: int) -> str:
    """n pad bytes as one struct code ("44x", not 44 "x"s, which unpack would step through one by one)."""
    return f"{n}x" if n else ""


def struct_for(fields: tuple[Field, ...], attr: str = "fmt", start: int = 0) -> struct.Struct:
    """A little-endian Struct reading ``fields`` (sorted by offset, none before ``start``) with
    explicit padding, to be used with ``unpack_from(buf, start)``."""
    fmt, pos = "<", start
    for f in fields:
        fmt += pad(f.offset - pos) + getattr(f, attr)
        pos = f.offset + struct.calcsize(f.fmt)
    return struct.Struct(fmt)


class Layout:
    """A kernel struct that grows over releases, decoded two ways from one field table.

    ``decode`` is the correct view: only members wholly inside the received bytes, bit fields split
    out.  ``decode_go`` is upstream's snapshot view: a fixed Go struct, short input zero-padded,
    longer input "not fully parsed".
    """

    def __init__(self, rows: str, bitfields: dict[str, tuple[tuple[str, int, int], ...]] | None = None,
                 go_size: int | None = None) -> None:
        self.fields = _parse_fields(rows)
        self.offsets: dict[str, int] = {f.name: f.offset for f in self.fields}
        last = self.fields[-1]
        self.size = last.offset + struct.calcsize(last.fmt)
        self.bitfields = bitfields or {}
        self.names: tuple[str, ...] = tuple(
            sub for f in self.fields
            for sub in ([b[0] for b in self.bitfields[f.name]] if f.name in self.bitfields else [f.name])
        )
        go_fields = tuple(f for f in self.fields if f.go_fmt is not None)
        self.go_names: tuple[str, ...] = tuple(f.go_name or f.name for f in go_fields)
        self.go_struct = struct_for(go_fields, "go_fmt")
        self.go_size = go_size or self.go_struct.size
        self._by_length: dict[int, tuple[struct.Struct, tuple[str, ...]]] = {}

    def _prefix(self, length: int) -> tuple[struct.Struct, tuple[str, ...]]:
        layout = self._by_length.get(length)
        if layout is None:
            present = tuple(f for f in self.fields if f.offset + struct.calcsize(f.fmt) <= length)
            layout = (struct_for(present, "fmt"), tuple(f.name for f in present))
            self._by_length[length] = layout
        return layout

    def struct_of(self, *names: str) -> struct.Struct:
        """A Struct reading these members (in offset order) with ``unpack_from(raw)``: for code
        that needs a few fields fast, without repeating their offsets."""
        fields = tuple(f for f in self.fields if f.name in names)
        if len(fields) != len(names):
            raise ValueError(f"unknown members: {set(names) - {f.name for f in fields}}")
        return struct_for(fields)

    def decode(self, raw: bytes) -> dict[str, int]:
        """Members present in ``raw`` by kernel name; bytes beyond the known layout are ignored."""
        layout, names = self._prefix(min(len(raw), self.size))
        values: dict[str, int] = {}
        for name, value in zip(names, layout.unpack_from(raw)):
            parts = self.bitfields.get(name)
            if parts is None:
                values[name] = value
            else:
                for sub, shift, width in parts:
                    values[sub] = (value >> shift) & ((1 << width) - 1)
        return values

    def decode_go(self, raw: bytes) -> tuple[tuple[int, ...], bool]:
        """Upstream's values and whether it considered the attribute fully parsed (not too long)."""
        n = len(raw)
        if n < self.go_struct.size:
            raw = raw + bytes(self.go_struct.size - n)
        return self.go_struct.unpack_from(raw), n <= self.go_size


# struct tcp_info up to Linux 6.18 (280 bytes, AccECN counters).  Upstream's Go struct stops at
# snd_wnd (232 bytes); its CSV header names last_ack_recv "LastDataRecv" a second time.
TCP_INFO = Layout(
    """
state State B B
ca_state CAState B B
retransmits Retransmits B B
probes Probes B B
backoff Backoff B B
options Options B B
wscale WScale B B
app_limited AppLimited B B
rto RTO I I
ato ATO I I
snd_mss SndMSS I I
rcv_mss RcvMSS I I
unacked Unacked I I
sacked Sacked I I
lost Lost I I
retrans Retrans I I
fackets Fackets I I
last_data_sent LastDataSent I I
last_ack_sent LastAckSent I I
last_data_recv LastDataRecv I I
last_ack_recv LastDataRecv I I
pmtu PMTU I I
rcv_ssthresh RcvSsThresh I I
rtt RTT I I
rttvar RTTVar I I
snd_ssthresh SndSsThresh I I
snd_cwnd SndCwnd I I
advmss AdvMSS I I
reordering Reordering I I
rcv_rtt RcvRTT I I
rcv_space RcvSpace I I
total_retrans TotalRetrans I I
pacing_rate PacingRate Q q
max_pacing_rate MaxPacingRate Q q
bytes_acked BytesAcked Q q
bytes_received BytesReceived Q q
segs_out SegsOut I i
segs_in SegsIn I i
notsent_bytes NotsentBytes I I
min_rtt MinRTT I I
data_segs_in DataSegsIn I I
data_segs_out DataSegsOut I I
delivery_rate DeliveryRate Q q
busy_time BusyTime Q q
rwnd_limited RWndLimited Q q
sndbuf_limited SndBufLimited Q q
delivered Delivered I I
delivered_ce DeliveredCE I I
bytes_sent BytesSent Q q
bytes_retrans BytesRetrans Q q
dsack_dups DSackDups I I
reord_seen ReordSeen I I
rcv_ooopack RcvOooPack I I
snd_wnd SndWnd I I
rcv_wnd - I -
rehash - I -
total_rto - H -
total_rto_recoveries - H -
total_rto_time - I -
received_ce - I -
delivered_e1_bytes - I -
delivered_e0_bytes - I -
delivered_ce_bytes - I -
received_e1_bytes - I -
received_e0_bytes - I -
received_ce_bytes - I -
accecn_fail_mode - H -
accecn_opt_seen - H -
""",
    bitfields={
        "wscale": (("snd_wscale", 0, 4), ("rcv_wscale", 4, 4)),
        "app_limited": (("delivery_rate_app_limited", 0, 1), ("fastopen_client_fail", 1, 2)),
    },
)


def decode_tcp_info(raw: bytes) -> dict[str, int]:
    """Decode a tcp_info of any length into kernel-named fields; absent fields are left out."""
    return TCP_INFO.decode(raw)
