"""`tcp-info`: the collector daemon's entry point: flags, logging, assembly and exit status.

Exit status: 0 after a clean stop (a stop signal, see `stopsignals`, or -reps polls done), -h or
-version; 2 for a bad flag or environment value; 1 when the collector cannot start (output
directory, metrics port, event socket or netlink socket unavailable), with a message naming the
flag and value at fault.
"""
from __future__ import annotations

import cProfile
import functools
import logging
import marshal
import os
import sys
from collections.abc import Sequence

from tcpinfo import __version__
from tcpinfo.archive.uuids import default_prefix, make_uuid
from tcpinfo.base.goflag import format_duration
from tcpinfo.collector import flags, shares
from tcpinfo.collector.anonymize import make_anonymizer
from tcpinfo.collector.cadence import Cadence
from tcpinfo.collector.daemon import Collector, archive_metadata
from tcpinfo.collector.metrics import Metrics, daemon_registry
from tcpinfo.collector.outtree import directory_mode, make_output_dir, replace_file
from tcpinfo.collector.poller import Poller
from tcpinfo.collector.query import ConnectionQueries
from tcpinfo.collector.saver import Saver
from tcpinfo.collector.selfcheck import SelfCheckMetrics, self_report
from tcpinfo.collector.sockfilter import Filter
from tcpinfo.collector.stopsignals import StopSignals
from tcpinfo.collector.tiers import Tiers
from tcpinfo.health.aggregate import Aggregator
from tcpinfo.remotewrite.writer import RemoteWriter
from tcpinfo.servers import httpserver
from tcpinfo.servers.eventserver import EventServer, NullServer

log = logging.getLogger("tcp-info")

TRACE_FILE = "trace.pstats"


class StartError(Exception):
    """The collector cannot start; the message names the flag and the value at fault."""


def main(argv: Sequence[str] | None = None) -> int:
    """Console-script entry point; returns the exit status."""
    stops = StopSignals()
    stops.install()   # first: nothing may be created before a signal can stop it cleanly
    try:
        return _main(argv, stops)
    finally:
        stops.restore()


def _main(argv: Sequence[str] | None, stops: StopSignals) -> int:
    logging.basicConfig(level=logging.INFO, stream=sys.stderr,
                        format="%(asctime)s %(filename)s:%(lineno)d: %(message)s",
                        datefmt="%Y/%m/%d %H:%M:%S")  # Go's log.LstdFlags|log.Lshortfile
    try:
        config = flags.parse(sys.argv[1:] if argv is None else argv, os.environ)
    except flags.HelpRequested:
        sys.stderr.write(flags.usage())
        return 0
    except flags.VersionRequested:
        print(f"tcp-info {__version__}")
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
        return run(config, stops)
    except StartError as err:
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


def prepare_output(output: str, mode: int) -> None:
    """Creates the output directory if needed (with the directory form of the archives' `mode`)
    and makes it the working directory, as upstream."""
    if not output:
        return
    if os.path.exists(output) and not os.path.isdir(output):
        raise StartError(f"-output {output!r} is not a directory")
    try:
        make_output_dir(output, directory_mode(mode))
        os.chdir(output)   # as upstream: relative paths below are relative to the output
    except OSError as err:
        raise StartError(f"-output {output!r}: {err.strerror or err}") from None


_EVERY_INTERFACE = {"::": "every interface, IPv4 and IPv6", "0.0.0.0": "every IPv4 interface"}


def metrics_url(host: str, port: int) -> str:
    """The bound /metrics URL, saying so when it answers on every interface: the default ":9990"
    binds "::", which a dual-stack host also serves over IPv4, and an operator must know that."""
    url = f"http://[{host}]:{port}/metrics" if ":" in host else f"http://{host}:{port}/metrics"
    where = _EVERY_INTERFACE.get(host)
    return f"{url} ({where})" if where else url


def start_metrics(listen_address: str, max_connections: int,
                  metrics: Metrics) -> httpserver.HTTPServer | None:
    """Serves the daemon's registry at /metrics, unless the listen address is empty."""
    if not listen_address:
        return None
    try:
        server = httpserver.serve(listen_address, metrics.registry, metrics.http, max_connections)
        host, port = server.address
    except OSError as err:
        raise StartError(f"-prometheusx.listen-address {listen_address!r}: "
                         f"{err.strerror or err}") from None
    log.info("Serving metrics on %s", metrics_url(host, port))
    return server


def sweep_interval_ns(config: flags.Config) -> int:
    """-sweep-interval, or -poll-interval if that is longer (a sweep is a poll too)."""
    return max(config.sweep_interval_ns, config.poll_interval_ns)


def make_poller(config: flags.Config, metrics: Metrics) -> Poller:
    """The C core with the filter, dump threads and destroy listener the flags ask for."""
    sockets = Filter(local=config.exclude_local, srcports=set(config.exclude_srcport),
                     dstips=list(config.exclude_dstip), include_nets=list(config.include_ip),
                     include_ports=list(config.include_port))
    try:
        poller = Poller(sockets)
    except OSError as err:
        raise StartError(f"cannot open the netlink socket: {err.strerror or err}") from None
    try:
        if config.kernel_filter:
            refusal = poller.filter_in_kernel(sockets)
            if refusal:
                log.warning("Filtering sockets in userspace: %s", refusal)
            elif poller.bytecode_size:
                log.info("The kernel filters sockets with a %d-byte inet_diag program",
                         poller.bytecode_size)
            metrics.kernel_filter.set(poller.bytecode_size)
        if config.dump_threads > 1:
            refusal = poller.set_threads(config.dump_threads)
            if refusal:
                log.warning("Dumping on one thread: %s", refusal)
        elif config.dump_threads == 0 and not config.cpu_budget and usable_cpus() >= 2:
            engage = shares.engage_ns(config.poll_interval_ns if config.strict
                                      else sweep_interval_ns(config))
            poller.auto_threads(2, engage, engage * shares.RELEASE_RATIO)
            log.info("Dump threads: auto (a second one while sweeps of %d or more connections take "
                     "over %.0f ms)", shares.SPLIT_MIN, engage / 1e6)
        if config.strict:
            log.info("Strict mode: every socket dumped every %s, one dump per family",
                     format_duration(config.poll_interval_ns))
        else:
            poller.set_one_walk(True)
            poller.set_fast_tier(max(1, -(-config.active_linger_ns // config.poll_interval_ns)))
            log.info("Sweeping every socket every %s at most (one walk of both families), looking "
                     "up active connections every %s between sweeps",
                     format_duration(sweep_interval_ns(config)),
                     format_duration(config.poll_interval_ns))
        if config.destroy_events:
            poller.listen_destroyed()
            log.info("Listening for destroy notifications (receive buffer %d bytes)",
                     poller.destroy_rcvbuf())
    except OSError as err:
        poller.close()
        raise StartError(str(err)) from None
    return poller


def start_events(config: flags.Config, metrics: Metrics) -> EventServer | NullServer:
    """The event socket, or a NullServer without -tcpinfo.eventsocket."""
    path = config.eventsocket
    if not path:
        return NullServer()
    parent = os.path.dirname(path) or "."
    if not os.path.isdir(parent):
        raise StartError(f"-tcpinfo.eventsocket {path!r}: directory {parent!r} does not exist")
    events = EventServer(path, metrics.events, mode=config.eventsocket_mode,
                         queue_limit=config.eventsocket_queue, replay=config.eventsocket_replay,
                         max_clients=config.eventsocket_max_clients)
    try:
        events.start()
    except OSError as err:
        raise StartError(f"-tcpinfo.eventsocket {path!r}: {err.strerror or err}") from None
    return events


def start_remote_write(config: flags.Config, metrics: Metrics) -> RemoteWriter | None:
    """The push of every series to -remote-write.url, or None without one."""
    push = config.remote_write_config()
    if push is None:
        return None
    writer = RemoteWriter(push, metrics.registry, metrics.registry)
    try:
        writer.start()
    except (OSError, RuntimeError) as err:
        raise StartError(f"-remote-write.url: cannot start the push thread: {err}") from None
    return writer


def run(config: flags.Config, stops: StopSignals) -> int:
    """Builds the collector from the configuration and runs it until it stops."""
    prepare_output(config.output, config.output_mode)
    prefix = default_prefix() if config.uuid_prefix is None else config.uuid_prefix
    metrics = Metrics(daemon_registry())
    report = self_report()
    for line in report.log_lines():
        log.info("%s", line)
    SelfCheckMetrics(report, metrics.registry)
    health = (Aggregator(config.health_config(), metrics.registry,
                         functools.partial(make_uuid, prefix)) if config.health else None)
    saver = Saver(os.getcwd(), prefix, metrics, config.limits(),
                  archive_metadata(format_duration(config.poll_interval_ns)), config.output_mode)
    http = start_metrics(config.listen_address, config.max_connections, metrics)
    poller = make_poller(config, metrics)
    queries = ConnectionQueries(prefix, poller, health)
    try:
        writer = start_remote_write(config, metrics)
    except StartError:
        poller.close()
        raise
    try:
        events = start_events(config, metrics)   # last: nothing after it can fail and leave it
    except StartError:
        if writer is not None:
            writer.stop()
        poller.close()
        raise
    collector = Collector(poller, saver, events, prefix,
                          Cadence(config.poll_interval_ns, config.cpu_budget), stops, metrics,
                          make_anonymizer(config.anonymize_ip), frozenset(config.count_port),
                          health, queries,
                          Tiers(config.poll_interval_ns, sweep_interval_ns(config), config.strict))
    if http is not None:
        http.queries = queries.ask   # GET /v1/connections/<uuid> from now on
    profiler = cProfile.Profile() if config.trace else None
    if profiler is not None:
        profiler.enable()
    try:
        collector.run(config.reps)
    finally:
        if profiler is not None:
            profiler.disable()
            profiler.create_stats()   # Profile.dump_stats would write through a planted link
            replace_file(TRACE_FILE, marshal.dumps(profiler.stats), config.output_mode)
            log.info("Wrote the profile to %s", os.path.abspath(TRACE_FILE))
        if writer is not None:
            writer.stop()   # a last push: every series ends with a stale marker
    log.info("Done after %d polls", collector.polls)
    return 0


if __name__ == "__main__":
    sys.exit(main())
