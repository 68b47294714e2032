"""What the kernel sends: inet_diag messages and struct tcp_info, decoded in pure Python."""
