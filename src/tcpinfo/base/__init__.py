"""Helpers that know nothing of TCP: Go flag syntax, the rate-limited log."""
