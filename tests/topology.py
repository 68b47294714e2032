"""Test topology: re-exported from tcpinfo.netns, which the benchmark shares."""
from tcpinfo.netns import Topology, cookie_of, run  # noqa: F401
