"""What the daemon serves, each on one selector thread: the event socket and /metrics."""
