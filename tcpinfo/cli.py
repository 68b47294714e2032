"""`tcp-info`: the collector daemon's entry point: flags, logging, assembly and exit status.

Exit status: 0 after a clean stop (SIGTERM, SIGINT, or -reps polls done) or -h; 2 for a bad flag
or environment value; 1 when the collector cannot start (output directory, metrics port, event
socket or netlink socket unavailable).
"""
from __future__ import annotations

import cProfile
import logging
import os
import sys
from collections.abc import Sequence

from tcpinfo import flags, metrics, shares
from tcpinfo.anonymize import make_anonymizer
from tcpinfo.cadence import Cadence
from tcpinfo.collector import Collector, archive_metadata
from tcpinfo.eventsocket import EventServer, NullServer
from tcpinfo.netlink import Poller
from tcpinfo.saver import Limits, Saver
from tcpinfo.sockfilter import Filter
from tcpinfo.uuidprefix import default_prefix

log = logging.getLogger("tcp-info")

TRACE_FILE = "trace.pstats"


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(filename)s:%(lineno)d: %(message)s",
                        datefmt="%Y/%m/%d %H:%M:%S")  # Go's log.LstdFlags|log.Lshortfile
    try:
        config = flags.parse(sys.argv[1:] if argv is None else argv, os.environ)
    except flags.HelpRequested:
        sys.stderr.write(flags.usage())
        return 0
    except flags.FlagError as err:
        print(f"tcp-info: {err} (tcp-info -h lists the flags)", file=sys.stderr)
        return 2
    if config.debug:
        logging.getLogger().setLevel(logging.DEBUG)
    for note in config.notes:
        log.warning("%s", note)
    for argument in config.arguments:
        log.info("Argument %s", argument)
    try:
        return run(config)
    except OSError as err:
        log.error("Cannot start: %s", err)
        return 1


def usable_cpus(cgroup: str = "/sys/fs/cgroup/cpu.max") -> int:
    """CPUs this process may use: its affinity, capped by a cgroup v2 CPU quota (a container
    limited to one CPU sees every host CPU in its affinity mask)."""
    cpus = len(os.sched_getaffinity(0))
    try:
        with open(cgroup) as f:
            quota, period = f.read().split()
        if quota != "max":
            cpus = min(cpus, max(1, -(-int(quota) // int(period))))
    except (OSError, ValueError):
        pass   # no cgroup v2 limit to read: the affinity stands
    return cpus


def run(config: flags.Config) -> int:
    """Builds the collector from the configuration and runs it until it stops."""
    if config.output:
        os.makedirs(config.output, mode=0o755, exist_ok=True)
        os.chdir(config.output)   # as upstream: relative paths below are relative to the output
    prefix = default_prefix() if config.uuid_prefix is None else config.uuid_prefix
    if config.listen_address:
        host, port = metrics.start_http_server(config.listen_address, config.max_connections)
        log.info("Serving metrics on http://%s:%d/metrics", f"[{host}]" if ":" in host else host,
                 port)
    sockets = Filter(local=config.exclude_local, srcports=set(config.exclude_srcport),
                     dstips=list(config.exclude_dstip), include_nets=list(config.include_ip),
                     include_ports=list(config.include_port))
    poller = Poller(sockets)
    try:
        if config.kernel_filter:
            refusal = poller.filter_in_kernel(sockets)
            if refusal:
                log.warning("Filtering sockets in userspace: %s", refusal)
            elif poller.bytecode_size:
                log.info("The kernel filters sockets with a %d-byte inet_diag program",
                         poller.bytecode_size)
            metrics.KERNEL_FILTER.set(poller.bytecode_size)
        if config.dump_threads > 1:
            refusal = poller.set_threads(config.dump_threads)
            if refusal:
                log.warning("Dumping on one thread: %s", refusal)
        elif config.dump_threads == 0 and not config.cpu_budget and usable_cpus() >= 2:
            poller.auto_threads(2)
            log.info("Dump threads: auto (a second one while polls take over %.0f ms)",
                     shares.ENGAGE_NS / 1e6)
        if config.destroy_events:
            poller.listen_destroyed()
            log.info("Listening for destroy notifications (receive buffer %d bytes)",
                     poller.destroy_rcvbuf())
    except OSError:
        poller.close()
        raise
    events = (EventServer(config.eventsocket, mode=config.eventsocket_mode,
                          queue_limit=config.eventsocket_queue, replay=config.eventsocket_replay,
                          max_clients=config.eventsocket_max_clients)
              if config.eventsocket else NullServer())
    try:
        events.start()
    except OSError:
        poller.close()
        raise
    limits = Limits(flush_size=config.flush_size, flush_age_ns=config.flush_age_ns,
                    conn_limit=config.conn_buffer_limit, total_limit=config.buffer_limit,
                    rotate_ns=config.rotate_interval_ns)
    saver = Saver(os.getcwd(), prefix, limits,
                  archive_metadata(flags.format_duration(config.poll_interval_ns)))
    collector = Collector(poller, saver, events, prefix,
                          Cadence(config.poll_interval_ns, config.cpu_budget),
                          make_anonymizer(config.anonymize_ip), frozenset(config.count_port))
    profiler = cProfile.Profile() if config.trace else None
    if profiler is not None:
        profiler.enable()
    try:
        collector.run(config.reps)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.dump_stats(TRACE_FILE)
            log.info("Wrote the profile to %s", os.path.abspath(TRACE_FILE))
    log.info("Done after %d polls", collector.polls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
