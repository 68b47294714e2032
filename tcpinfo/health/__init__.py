"""What a connection's tcp_info says: derived values and the "why slow" class (stdlib only).

Lean on purpose: the collector imports it for its live query answer and per-close counters, and
``tcpinfo summary`` for offline archives, so both give the same answer from the same code.
"""
