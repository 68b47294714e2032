"""The C core's binding: `tcpinfo.core.binding` is the only module that loads the compiled core."""
