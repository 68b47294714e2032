"""A Spark standalone cluster on 127.0.0.1 for the fleet tests: a master and one worker, each its
own JVM started with pyspark's ``spark-class``, as on a real cluster's machines.  Jobs submitted to
it run in an executor the worker starts, with its own Python workers: nothing is shared with the
driver's process but the files."""
from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import NamedTuple

from helpers.health import free_port


class Cluster(NamedTuple):
    url: str          # spark://127.0.0.1:PORT
    env: dict         # what a driver on this machine needs (loopback, the executors' Python)
    work_dir: Path    # the worker's: one directory per application it ran


def spark_home() -> Path:
    import pyspark

    return Path(pyspark.__file__).parent


def _alive_workers(ui_port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{ui_port}/json/", timeout=2) as reply:
        return int(json.load(reply).get("aliveworkers", 0))


@contextmanager
def standalone_cluster(tmp: Path, cores: int = 2) -> Iterator[Cluster]:
    """Master and worker up (the worker registered), stopped at the end; their logs in ``tmp``."""
    port, ui_port = free_port(), free_port()
    env = {**os.environ, "SPARK_HOME": str(spark_home()), "SPARK_LOCAL_IP": "127.0.0.1",
           "PYSPARK_PYTHON": sys.executable, "SPARK_NO_DAEMONIZE": "1"}
    spark_class = str(spark_home() / "bin" / "spark-class")
    url = f"spark://127.0.0.1:{port}"
    work_dir = tmp / "worker"
    work_dir.mkdir(parents=True, exist_ok=True)
    procs = []
    try:
        for name, args in (("master", ["org.apache.spark.deploy.master.Master", "--host", "127.0.0.1",
                                       "--port", str(port), "--webui-port", str(ui_port)]),
                           ("worker", ["org.apache.spark.deploy.worker.Worker", "--host", "127.0.0.1",
                                       "--cores", str(cores), "--memory", "2g", "--webui-port",
                                       str(free_port()), "--work-dir", str(work_dir), url])):
            with open(tmp / f"{name}.log", "wb") as log:
                procs.append(subprocess.Popen([spark_class, *args], env=env, stdout=log,
                                              stderr=subprocess.STDOUT))
        deadline = time.monotonic() + 120
        while True:
            try:
                if _alive_workers(ui_port) >= 1:
                    break
            except OSError:
                pass
            for proc, name in zip(procs, ("master", "worker")):
                assert proc.poll() is None, f"the Spark {name} exited: {(tmp / f'{name}.log').read_text()[-2000:]}"
            assert time.monotonic() < deadline, "no worker registered with the Spark master in 120 s"
            time.sleep(0.5)
        yield Cluster(url, env, work_dir)
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            try:
                proc.wait(timeout=30)
            except subprocess.TimeoutExpired:
                proc.kill()
                proc.wait()
