"""tcp-info, the collector daemon: polls the kernel, writes archives, serves events and metrics."""
