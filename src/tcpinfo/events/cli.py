"""tcpinfo-events: prints one line per tcp-info flow event until tcp-info goes away.

    tcpinfo-events -tcpinfo.eventsocket /var/local/tcpinfoeventsocket/tcpevents.sock

Output, one event per line (the ID object exactly as received):

    Open 2019-07-01T00:00:12.092000+00:00 ndt-7hhhv_1559749627_0000000000062D84 {"SPort":33475,...}
    Close 2019-07-01T00:00:22.800000+00:00 ndt-7hhhv_1559749627_0000000000062D84

The flag has the same name as the server's, and TCPINFO_EVENTSOCKET is read when
it is not given, as upstream's flagx.ArgsFromEnv does.  Exits 1 with a message if
the socket is missing.  It is also the example of a consumer: `Printer` is the whole
handler that `tcpinfo.events.client.run` needs.
"""
from __future__ import annotations

import argparse
import os
import sys
from datetime import datetime

import orjson

from tcpinfo import __version__
from tcpinfo.events import client


class Printer:
    """Prints each event as it arrives (flushed, so a pipe sees it at once)."""

    def open(self, ts: datetime, uuid: str, sockid: dict | None) -> None:
        print("Open", ts.isoformat(), uuid, orjson.dumps(sockid).decode(), flush=True)

    def close(self, ts: datetime, uuid: str) -> None:
        print("Close", ts.isoformat(), uuid, flush=True)


def main(argv: list[str] | None = None) -> int:
    """Console entry point: 0 when tcp-info closes the socket or on ^C, 1 if it cannot be read."""
    parser = argparse.ArgumentParser(prog="tcpinfo-events", description=__doc__.splitlines()[0])
    parser.add_argument("-tcpinfo.eventsocket", "--tcpinfo.eventsocket", dest="path",
                        default=os.environ.get("TCPINFO_EVENTSOCKET", ""),
                        help="path of tcp-info's event socket (env TCPINFO_EVENTSOCKET)")
    parser.add_argument("-version", "--version", action="version",
                        version=f"%(prog)s {__version__}")
    args = parser.parse_args(argv)
    if not args.path:
        parser.error("-tcpinfo.eventsocket is required")
    try:
        client.run(args.path, Printer())
    except (OSError, ValueError) as err:
        print(f"tcpinfo-events: {err}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        pass
    return 0


if __name__ == "__main__":
    sys.exit(main())
