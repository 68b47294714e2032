"""TCP health for operators: what the kernel says about the host's connections, as aggregates.

Pure Python, stdlib and prometheus_client only; importing a module here registers no metric.
``config`` parses and checks the operator's choices, ``buckets`` makes log-spaced histogram
boundaries, ``aggregate`` turns changed and closed connections into low-cardinality histograms
and gauges, ``remotewrite`` pushes a registry to a Prometheus remote-write endpoint, and
``selfcheck`` says what the collector can see with its privileges and how good its clock is.
"""
