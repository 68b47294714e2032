"""tcpinfo: a drop-in Python successor to M-Lab's tcp-info collector."""

__version__ = "0.1.0"
