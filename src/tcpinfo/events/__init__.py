"""The event socket's protocol: its line format (both ends), the client library and tcpinfo-events."""
