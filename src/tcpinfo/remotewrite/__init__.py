"""Pushing metrics where scraping cannot reach: Prometheus remote write (protobuf + snappy)."""
