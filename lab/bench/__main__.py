"""python3 -m lab.bench: measure the collector where a user can reproduce it (from a checkout).

`python3 -m lab.bench poll -n 10000` opens N idle TCP connections in a private pair of
network namespaces (held by several child processes, since one process may not
have 2N file descriptors) and prints, side by side, wall time and CPU per poll for:
  * tcpinfo: one Poller.poll() (dump both families, diff in C, nothing changed), on one
    dump thread and on two (what -dump-threads auto, the default, picks once polls take
    over 5 ms);
  * bare C loop: the same request, only received and counted (the kernel's floor);
  * ss -tin: iproute2 run once per poll, as a user would.
`filter` shows what kernel-side filtering saves when most sockets are excluded, `daemon`
the real tcp-info's memory and achieved cadence, `csvtool` and `saver` the converter and
the write path.  The socket benchmarks need root (namespaces).
"""
from __future__ import annotations

import argparse
import os
import sys

from lab.bench import poll
from tcpinfo import __version__


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(prog="python3 -m lab.bench", description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("-version", "--version", action="version", version=f"%(prog)s {__version__}")
    sub = ap.add_subparsers(dest="what", required=True)
    p = sub.add_parser("poll", help="poll cost vs the bare C loop and ss -tin")
    p.add_argument("-n", "--connections", type=int, default=10000)
    p.add_argument("-r", "--rounds", type=int, default=40)
    p.add_argument("--peer-table", type=int, default=16384, metavar="BUCKETS",
                   help="size of the client side's own socket hash table, so that the dumps "
                        "walk only the server's sockets, as on a host whose peers are other "
                        "machines (default 16384); 0: one table for both sides")
    d = sub.add_parser("daemon", help="resident memory of tcp-info over N idle connections")
    d.add_argument("-n", "--connections", type=int, default=10000)
    d.add_argument("-s", "--seconds", type=float, default=10.0)
    d.add_argument("--same-ns", action="store_true",
                   help="both ends in the daemon's namespace: 2N tracked sockets")
    d.add_argument("flags", nargs="*", help="tcp-info flags, after --: -- -dump-threads 2")
    f = sub.add_parser("filter", help="poll cost with most sockets excluded: userspace vs kernel")
    f.add_argument("-x", "--excluded", type=int, default=20000)
    f.add_argument("-n", "--included", type=int, default=1000)
    f.add_argument("-r", "--rounds", type=int, default=40)
    c = sub.add_parser("csvtool", help="csvtool rows/s in the default schema")
    c.add_argument("-n", "--records", type=int, default=200_000)
    x = sub.add_parser("export", help="tcpinfo export rows/s vs csvtool, its peak RSS, DuckDB summary time")
    x.add_argument("-n", "--records", type=int, default=200_000)
    x.add_argument("--big", type=int, default=1_000_000, help="records for the RSS and summary runs")
    x.add_argument("-r", "--rounds", type=int, default=3, help="alternating runs of the two converters")
    w = sub.add_parser("saver", help="end-to-end records/s: split, encode, compress, write")
    w.add_argument("-n", "--records", type=int, default=300_000)
    w.add_argument("--anonymize", action="store_true")
    sv = sub.add_parser("servers", help="poll rate while clients load the event socket and "
                                         "/metrics")
    sv.add_argument("-s", "--seconds", type=float, default=10.0, help="length of each window")
    ch = sub.add_parser("churn", help="highest rate of new connections that is fully recorded")
    ch.add_argument("--rates", default="500,1000,2000,4000", metavar="R1,R2,...",
                    help="new connections per second to try, in turn")
    ch.add_argument("-s", "--seconds", type=float, default=10.0, help="per rate")
    ch.add_argument("-w", "--workers", type=int, default=4, help="client processes")
    ch.add_argument("--same-host", action="store_true",
                    help="clients beside the server: the collector sees both ends")
    ch.add_argument("--hold", type=float, default=0.0, metavar="MS",
                    help="how long each client keeps its connection open (default 0)")
    ch.add_argument("--no-caps", action="store_true",
                    help="run tcp-info without capabilities, as a container does")
    ch.add_argument("flags", nargs="*", help="tcp-info flags, after --")
    ti = sub.add_parser("tiers", help="CPU of the tiers vs strict mode: idle host, mixed host, "
                                       "one sweep vs the floor")
    ti.add_argument("-n", "--connections", type=int, default=10000)
    ti.add_argument("-a", "--active", type=int, default=20, help="connections sending continuously")
    ti.add_argument("-s", "--seconds", type=float, default=10.0, help="length of each window")
    ti.add_argument("-r", "--rounds", type=int, default=40, help="sweeps timed per kind")
    args = ap.parse_args(argv)
    if args.what == "csvtool":
        from lab.bench import csvtool
        print(csvtool.run(args.records))
        return 0
    if args.what == "export":
        from lab.bench import export
        print(export.run(args.records, args.big, args.rounds))
        return 0
    if args.what == "saver":
        from lab.bench import saver
        print(saver.run(args.records, anonymize=args.anonymize))
        return 0
    if os.geteuid() != 0:
        print("lab.bench: needs root to create network namespaces", file=sys.stderr)
        return 2
    if args.what == "servers":
        from lab.bench import servers
        servers.print_rows(servers.bench("tcp-info", args.seconds))
    if args.what == "churn":
        from lab.bench import churn
        rates = [float(r) for r in args.rates.split(",")]
        print(churn.run(rates, args.seconds, args.workers, args.flags, args.same_host,
                              args.hold / 1e3, args.no_caps))
    if args.what == "tiers":
        from lab.bench import tiers
        print(tiers.run(args.connections, args.active, args.seconds, args.rounds))
    if args.what == "daemon":
        print(poll.bench_daemon(args.connections, args.seconds, args.flags, args.same_ns))
    if args.what == "poll":
        poll.print_poll(poll.bench_poll(args.connections, args.rounds, args.peer_table))
    if args.what == "filter":
        poll.print_filter(poll.bench_filter(args.excluded, args.included, args.rounds))
    return 0


if __name__ == "__main__":
    sys.exit(main())
