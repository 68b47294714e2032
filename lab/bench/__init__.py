"""Benchmarks of tcpinfo, run from a checkout: `python3 -m lab.bench -h`."""
