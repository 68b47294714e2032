"""Helpers for the health tests: the collector's calls into the aggregator, a real Prometheus,
and scraping a real prometheus_client HTTP exposition."""
from __future__ import annotations

import json
import socket
import subprocess
import time
import urllib.parse
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, start_http_server
from prometheus_client.openmetrics.parser import text_string_to_metric_families as parse_om
from prometheus_client.parser import text_string_to_metric_families as parse_text

from helpers.paths import tool
from tcpinfo.collector.poller import Poller
from tcpinfo.health.aggregate import Aggregator

PREFIX = "health-test_1700000000_unsafe"


def uuid_of(cookie: int) -> str:
    return f"{PREFIX}_{cookie:016X}"


def feed(poller: Poller, agg: Aggregator, batch: bool = False) -> list:
    """One poll handed to the aggregator as the collector does: every changed snapshot (one
    observe_snapshot each, or the whole list to observe_changes), then every connection the
    kernel destroyed or the dump lost.  Returns the changes, for the test's own decoding."""
    result = poller.poll()
    if batch:
        agg.observe_changes(result.changes)
    else:
        for payload, cookie, _family, _kind, ts in result.changes:
            agg.observe_snapshot(cookie, payload, ts)
    for payload, cookie, _family, _kind, ts in result.destroyed:
        agg.observe_close(cookie, payload, ts)
    for payload, cookie, *_ in result.vanished:
        agg.observe_close(cookie, payload, time.time_ns())
    return result.changes


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(registry: CollectorRegistry) -> tuple[str, object]:
    """prometheus_client's own HTTP exposition of ``registry`` on a free loopback port."""
    port = free_port()
    server, _thread = start_http_server(port, addr="127.0.0.1", registry=registry)
    return f"http://127.0.0.1:{port}/metrics", server


def scrape(url: str, openmetrics: bool = False) -> tuple[str, str]:
    """GET /metrics over HTTP: (content type, body)."""
    accept = "application/openmetrics-text; version=1.0.0" if openmetrics else "text/plain"
    with urllib.request.urlopen(urllib.request.Request(url, headers={"Accept": accept}),
                                timeout=10) as response:
        return response.headers["Content-Type"], response.read().decode()


def families(text: str, openmetrics: bool = False) -> dict:
    parse = parse_om if openmetrics else parse_text
    return {f.name: f for f in parse(text)}


def samples(text: str, name: str, openmetrics: bool = False, **labels: str) -> list:
    """The samples called ``name`` whose labels include ``labels``."""
    out = []
    for family in (parse_om if openmetrics else parse_text)(text):
        for s in family.samples:
            if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()):
                out.append(s)
    return out


def promtool_check(text: str) -> subprocess.CompletedProcess:
    return subprocess.run([tool("promtool"), "check", "metrics"], input=text,
                          capture_output=True, text=True, timeout=30)


class Prometheus:
    """A real Prometheus server on a free loopback port with its own storage directory."""

    def __init__(self, workdir: Path, *flags: str, scrape: str | None = None) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        config = workdir / "prometheus.yml"
        text = "global:\n  scrape_interval: 1s\n"
        if scrape:
            target = urllib.parse.urlsplit(scrape)
            text += ("scrape_configs:\n  - job_name: health\n    scrape_interval: 1s\n"
                     f"    metrics_path: {target.path}\n"
                     f"    static_configs:\n      - targets: ['{target.netloc}']\n")
        config.write_text(text)
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log = open(workdir / "prometheus.log", "w")
        self.proc = subprocess.Popen(
            [tool("prometheus"), f"--config.file={config}", f"--storage.tsdb.path={workdir / 'data'}",
             f"--web.listen-address=127.0.0.1:{self.port}", "--web.enable-remote-write-receiver",
             *flags], stdout=self.log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 30
        while True:
            assert self.proc.poll() is None, (workdir / "prometheus.log").read_text()
            try:
                with urllib.request.urlopen(f"{self.url}/-/ready", timeout=1) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            assert time.monotonic() < deadline, "prometheus never became ready"
            time.sleep(0.1)
        self.write_url = f"{self.url}/api/v1/write"

    def api(self, path: str, **params: object) -> object:
        query = urllib.parse.urlencode({k: v for k, v in params.items() if v is not None})
        with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
            answer = json.load(response)
        assert answer["status"] == "success", answer
        return answer["data"]

    def query(self, expr: str, at: float | None = None) -> list:
        """Instant query: [(labels, value)]."""
        data = self.api("/api/v1/query", query=expr, time=at)
        return [(r["metric"], r["value"][1]) for r in data["result"]]

    def raw(self, selector: str, window: str = "1h", at: float | None = None) -> dict:
        """Every stored sample of the selected series in the window: {labels: [(t, v)]}."""
        data = self.api("/api/v1/query", query=f"{selector}[{window}]", time=at)
        return {tuple(sorted(r["metric"].items())): [(float(t), v) for t, v in r["values"]]
                for r in data["result"]}

    def stop(self) -> None:
        self.proc.terminate()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()
        self.log.close()
