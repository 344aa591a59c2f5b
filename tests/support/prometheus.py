"""A real Prometheus (Debian's `prometheus` package) on a free port with a throwaway config and
data directory, for the tests of the dashboard and the alert rules."""

from __future__ import annotations

import json
import shutil
import subprocess
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import yaml
from processes import answers_now, free_port, wait_until


def binary(name: str) -> str:
    path = shutil.which(name)
    assert path, f"`{name}` not found: install Debian's prometheus package (.ci/run does)"
    return path


class QueryError(Exception):
    """Prometheus refused a query (it does not parse, or cannot be evaluated)."""


@dataclass
class Prometheus:
    url: str
    log: Path

    def get(self, path: str, **params: str | list[str]) -> Any:
        """The `data` of an HTTP API answer; QueryError with Prometheus's reason otherwise."""
        query = urllib.parse.urlencode(params, doseq=True)
        try:
            with urllib.request.urlopen(f"{self.url}{path}?{query}", timeout=10) as response:
                answer = json.load(response)
        except urllib.error.HTTPError as error:
            answer = json.load(error)
        if answer["status"] != "success":
            raise QueryError(f"{answer['errorType']}: {answer['error']}")
        return answer["data"]

    def query(self, expr: str) -> list[dict[str, Any]]:
        """An instant query's series at the current time, as [{"metric": ..., "value": ...}]."""
        data = self.get("/api/v1/query", query=expr)
        assert data["resultType"] == "vector", data
        return list(data["result"])

    def holds(self, expr: str) -> bool:
        return bool(self.query(expr))


@contextmanager
def running_prometheus(
    directory: Path, scrape_configs: list[dict[str, Any]], rule_files: list[Path]
) -> Iterator[Prometheus]:
    """Scraping and evaluating rules every second, stopped (and its port freed) afterwards."""
    directory.mkdir(parents=True, exist_ok=True)
    config = directory / "prometheus.yml"
    config.write_text(
        yaml.safe_dump(
            {
                "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
                "rule_files": [str(path) for path in rule_files],
                "scrape_configs": scrape_configs,
            }
        )
    )
    address = f"127.0.0.1:{free_port()}"
    log = directory / "prometheus.log"
    with log.open("wb") as output:
        process = subprocess.Popen(
            [
                binary("prometheus"),
                f"--config.file={config}",
                f"--storage.tsdb.path={directory / 'data'}",
                f"--web.listen-address={address}",
            ],
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
        )
    prometheus = Prometheus(f"http://{address}", log)

    def ready() -> bool:
        assert process.poll() is None, f"prometheus exited:\n{log.read_text()}"
        return answers_now(f"{prometheus.url}/-/ready")

    try:
        wait_until(ready, 30, "prometheus ready")
        yield prometheus
    finally:
        process.terminate()
        try:
            process.wait(10)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait(10)
