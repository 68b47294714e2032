"""The analysis commands' own errors, in a module that imports nothing: ``tcpinfo export``
reports them without loading DuckDB (18 MiB of its peak memory)."""


class Usage(Exception):
    """A bad combination of inputs: exit 2 with the message."""


class EngineError(Exception):
    """The engine could not run (Spark without Java, an unreachable master): exit 1."""
