"""An S3-compatible server for the object-store tests: moto's server mode (PyPI ``moto[server]``)
on a free loopback port, one bucket, and the environment that points pyarrow and boto3 at it."""
from __future__ import annotations

import os
import socket
import subprocess
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from typing import NamedTuple

from helpers.paths import script

BUCKET = "tcpinfo-test"


class S3(NamedTuple):
    endpoint: str
    """host:port"""
    env: dict[str, str]
    """What a child process needs to reach it (AWS CLI variables, AWS_ENDPOINT_URL)."""

    def url(self, key: str) -> str:
        """An s3:// URL naming the endpoint in its options (no environment needed)."""
        return f"s3://{BUCKET}/{key}?endpoint_override={self.endpoint}&scheme=http"

    def filesystem(self):
        from pyarrow.fs import S3FileSystem

        return S3FileSystem(access_key="test", secret_key="test", region="us-east-1",
                            endpoint_override=self.endpoint, scheme="http")


@contextmanager
def moto_server() -> Iterator[S3]:
    """moto_server on 127.0.0.1, stopped at the end, with the bucket BUCKET created."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    proc = subprocess.Popen([script("moto_server"), "-H", "127.0.0.1", "-p", str(port)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    endpoint = f"127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                urllib.request.urlopen(f"http://{endpoint}/moto-api/", timeout=1).close()
                break
            except OSError:
                assert proc.poll() is None, "moto_server exited"
                assert time.monotonic() < deadline, "moto_server never answered"
                time.sleep(0.1)
        request = urllib.request.Request(f"http://{endpoint}/{BUCKET}", method="PUT")
        urllib.request.urlopen(request, timeout=10).close()  # create the bucket
        env = {**os.environ, "AWS_ACCESS_KEY_ID": "test", "AWS_SECRET_ACCESS_KEY": "test",
               "AWS_DEFAULT_REGION": "us-east-1", "AWS_ENDPOINT_URL": f"http://{endpoint}",
               "AWS_EC2_METADATA_DISABLED": "true"}  # never ask an instance-metadata address
        yield S3(endpoint, env)
    finally:
        proc.terminate()
        proc.wait(10)
