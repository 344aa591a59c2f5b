"""`luaq` as a real child process, and the files it reads and prints, for CLI-level tests."""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

import yaml
from luaq.runtime.cli import SUMMARY

_SCRIPT = Path(sys.executable).with_name("luaq")
LUAQ = [str(_SCRIPT)] if _SCRIPT.exists() else [sys.executable, "-m", "luaq.runtime.cli"]
COLUMNS = SUMMARY


@dataclass
class Process:
    """stdout and stderr go to files that tests poll."""

    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    files: tuple[IO[bytes], IO[bytes]]

    @property
    def stdout(self) -> str:
        return self.stdout_path.read_text()

    @property
    def stderr(self) -> str:
        return self.stderr_path.read_text()

    def logs(self) -> list[dict[str, Any]]:
        return json_lines(self.stderr)

    def messages(self) -> list[str]:
        return [str(line.get("msg")) for line in self.logs()]

    def wait(self, timeout: float) -> int:
        code = self.popen.wait(timeout)
        for file in self.files:
            file.close()
        return code


class Spawner:
    """Starts `luaq` processes in a directory; `stop_all` kills what still runs."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self.started: list[Process] = []

    def __call__(self, *args: str | Path, env: dict[str, str] | None = None) -> Process:
        n = len(self.started)
        out, err = self.directory / f"stdout{n}.txt", self.directory / f"stderr{n}.txt"
        files = (out.open("wb"), err.open("wb"))
        popen = subprocess.Popen(
            [*LUAQ, *(str(arg) for arg in args)],
            stdout=files[0],
            stderr=files[1],
            stdin=subprocess.DEVNULL,
            cwd=self.directory,
            env={**os.environ, **(env or {})},
        )
        process = Process(popen, out, err, files)
        self.started.append(process)
        return process

    def stop_all(self) -> None:
        for process in self.started:
            if process.popen.poll() is None:
                process.popen.kill()
            process.wait(10)


def reported(err: str) -> list[str]:
    """What `luaq run` reported (logs.report: why it stopped or would not start), from a stderr
    that is JSON from its first line to its last."""
    return [r["msg"] for r in json_lines(err) if r["logger"] == "luaq" and r["level"] == "error"]


def json_lines(text: str) -> list[dict[str, Any]]:
    """Every complete line of `text` parsed as a JSON object (fails on a line that is not, NaN
    and Infinity included: Python writes them, strict readers refuse them)."""
    complete = text[: text.rfind("\n") + 1] if "\n" in text else ""
    parsed = []
    for line in complete.splitlines():
        try:
            item = json.loads(line, parse_constant=_no_constant)
        except ValueError:
            raise AssertionError(f"a line that is not a JSON log record:\n{line[:2000]}") from None
        assert isinstance(item, dict), line
        parsed.append(item)
    return parsed


def _no_constant(name: str) -> None:
    raise ValueError(f"{name} is not JSON")


def summaries(out: str) -> list[dict[str, dict[str, float]]]:
    """Every per-consumer summary table on stdout (one per worker process), in order."""
    tables: list[dict[str, dict[str, float]]] = []
    for line in out.splitlines():
        fields = line.split()
        if not fields:
            continue
        if fields[0] == "consumer":
            assert fields[1:] == [*COLUMNS, "msg/s"], line
            tables.append({})
            continue
        assert tables, f"a summary row before any header: {line!r}"
        assert len(fields) == len(COLUMNS) + 2, f"malformed summary row: {line!r}"
        tables[-1][fields[0]] = dict(zip((*COLUMNS, "rate"), map(float, fields[1:]), strict=True))
    assert tables, f"no summary table on stdout:\n{out}"
    return tables


def summary(out: str) -> dict[str, dict[str, float]]:
    """The one summary table on stdout, as {consumer: {column: value}}."""
    tables = summaries(out)
    assert len(tables) == 1, out
    return tables[0]


def wait_until(check: Callable[[], bool], timeout: float = 10.0, what: str = "condition") -> None:
    """Poll `check` until it holds or the deadline passes (polling, not sleeping to sync)."""
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not met within {timeout}s")
        time.sleep(0.01)


def write_app(path: Path, app_entries: list[dict[str, Any]]) -> Path:
    document = {"version": "1.0", "namespace": "app", "entries": app_entries}
    path.write_text(yaml.safe_dump(document, sort_keys=False, allow_unicode=True))
    return path


def write_jsonl(path: Path, items: list[dict[str, Any]]) -> Path:
    path.write_text("".join(json.dumps(item, ensure_ascii=False) + "\n" for item in items))
    return path


def free_port() -> int:
    """A TCP port nothing listens on now (on 127.0.0.1)."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def answers_now(url: str) -> bool:
    """Whether `url` answers 200 now (an HTTP probe, as the kubelet's)."""
    try:
        with urllib.request.urlopen(url, timeout=2) as response:
            return bool(response.status == 200)
    except (OSError, http.client.HTTPException):
        return False


async def answers(url: str) -> bool:
    """answers_now in a thread, so that a server on the test's own event loop can answer."""
    return await asyncio.to_thread(answers_now, url)
