"""Prometheus metrics, liveness and readiness, for one worker process or a pod of them.

The hot path never touches prometheus_client: the consumer and the worker bump plain integers
and `Histogram`s (a bisect and two additions), and a scrape turns their state into metric
families. That keeps the cost of metrics at well under a microsecond per message.

With `--processes N`, each worker process writes its families to a snapshot file every second;
the parent process serves the port and merges the snapshots, so one port reports the whole pod.
How a series combines across processes is part of its family: counters and histograms add up,
and a gauge says whether it adds up, takes the minimum, the maximum, or the latest value set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import threading
import time
from bisect import bisect_left
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from .errors import Kind, QueueError

DURATION_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)
SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
USER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
USER_PREFIX = "luaq_user_"
MAX_USER_SERIES = 100  # per user metric
MAX_USER_METRICS = 100
# and the size of each series: a scrape and the registry stay small whatever handlers pass
MAX_USER_NAME = 100  # characters of a metric's or a label's name
MAX_USER_LABELS = 10  # per metric
MAX_USER_LABEL_VALUE = 256  # characters
STALE_AFTER = 15.0  # seconds without a sign of life from an event loop: not live
SNAPSHOT_EVERY = 1.0
_NAME_RE = re.compile(r"^[a-zA-Z_][a-zA-Z0-9_]*$")
_log = logging.getLogger("luaq.metrics")

Type = Literal["counter", "gauge", "histogram"]
Merge = Literal["sum", "min", "max", "latest"]


class Histogram:
    """Observations counted per bucket (the last one is +Inf), and their sum."""

    __slots__ = ("bounds", "counts", "sum")

    def __init__(self, bounds: Sequence[float]) -> None:
        self.bounds = tuple(bounds)
        self.counts = [0] * (len(self.bounds) + 1)
        self.sum = 0.0

    def observe(self, value: float) -> None:
        self.counts[bisect_left(self.bounds, value)] += 1
        self.sum += value


@dataclass
class Family:
    """One metric and its series. A series' value is a number; for a histogram, its bucket
    counts and sum; for a gauge merged by `latest`, its value and when it was set."""

    name: str  # counters without their `_total`
    type: Type
    help: str
    labels: tuple[str, ...] = ()
    merge: Merge = "sum"
    bounds: tuple[float, ...] = ()
    series: dict[tuple[str, ...], Any] = field(default_factory=dict)

    def add(self, values: Sequence[str], value: Any) -> None:
        self.series[tuple(values)] = value

    def histogram(self, values: Sequence[str], histogram: Histogram) -> None:
        self.bounds = histogram.bounds
        self.series[tuple(values)] = (list(histogram.counts), histogram.sum)

    def to_json(self) -> dict[str, Any]:
        return {
            "name": self.name, "type": self.type, "help": self.help, "labels": self.labels,
            "merge": self.merge, "bounds": self.bounds,
            "series": [[list(key), value] for key, value in self.series.items()],
        }  # fmt: skip

    @classmethod
    def from_json(cls, data: Mapping[str, Any]) -> Family:
        series = {tuple(key): value for key, value in data["series"]}
        return cls(
            data["name"], data["type"], data["help"], tuple(data["labels"]), data["merge"],
            tuple(data["bounds"]), series,
        )  # fmt: skip

    def metric(self) -> Metric:
        labels = list(self.labels)
        if self.type == "counter":
            counter = CounterMetricFamily(self.name, self.help, labels=labels)
            for key, value in self.series.items():
                counter.add_metric(key, value)
            return counter
        if self.type == "gauge":
            gauge = GaugeMetricFamily(self.name, self.help, labels=labels)
            for key, value in self.series.items():
                gauge.add_metric(key, value[0] if self.merge == "latest" else value)
            return gauge
        histogram = HistogramMetricFamily(self.name, self.help, labels=labels)
        for key, (counts, total) in self.series.items():
            cumulative, buckets = 0, []
            for bound, count in zip((*self.bounds, math.inf), counts, strict=True):
                cumulative += count
                buckets.append(("+Inf" if bound == math.inf else _number(bound), cumulative))
            histogram.add_metric(key, buckets, total)
        return histogram


def _number(bound: float) -> str:
    return repr(float(bound))


def merge(snapshots: Sequence[Sequence[Family]]) -> list[Family]:
    """The families of several processes as one pod's."""
    merged: dict[str, Family] = {}
    for families in snapshots:
        for family in families:
            into = merged.get(family.name)
            if into is None:
                merged[family.name] = Family(
                    family.name, family.type, family.help, family.labels, family.merge,
                    family.bounds, dict(family.series),
                )  # fmt: skip
                continue
            for key, value in family.series.items():
                if key in into.series:
                    into.series[key] = _combine(into, into.series[key], value)
                else:
                    into.series[key] = value
    return list(merged.values())


def _combine(family: Family, a: Any, b: Any) -> Any:
    if family.type == "histogram":
        return [x + y for x, y in zip(a[0], b[0], strict=True)], a[1] + b[1]
    if family.merge == "latest":
        return a if a[1] >= b[1] else b
    if family.merge == "min":
        return min(a, b)
    if family.merge == "max":
        return max(a, b)
    return a + b


class UserMetrics:
    """Handlers' own metrics (the Lua `metrics` module), bounded: at most MAX_USER_METRICS
    names and MAX_USER_SERIES label sets per name; past that, the call fails (INVALID) and the
    worker says so once per metric."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._warned: set[str] = set()

    def record(self, kind: str, name: Any, labels: Any, value: Any) -> None:
        if kind not in ("counter", "gauge", "histogram"):
            raise QueueError(Kind.INVALID, f"unknown metric type {kind!r}")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise QueueError(
                Kind.INVALID, f"metric name {name!r} must be letters, digits and underscores"
            )
        if len(name) > MAX_USER_NAME:
            raise QueueError(
                Kind.INVALID, f"metric name {name[:20]}... is over {MAX_USER_NAME} characters"
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise QueueError(Kind.INVALID, f"metric {name}: value must be a finite number")
        if kind == "counter" and value < 0:
            raise QueueError(Kind.INVALID, f"metric {name}: a counter only goes up")
        names, values = _labels(name, labels)
        full = USER_PREFIX + name
        family = self._families.get(full)
        if family is None:
            if len(self._families) >= MAX_USER_METRICS:
                raise self._refuse(full, f"there are {MAX_USER_METRICS} user metrics already")
            merge_as: Merge = "latest" if kind == "gauge" else "sum"
            family = Family(full, kind, f"{kind} of handlers, metrics.{kind}()", names, merge_as)  # type: ignore[arg-type]
            if kind == "histogram":
                family.bounds = USER_BUCKETS
            self._families[full] = family
        elif family.type != kind:
            raise QueueError(Kind.INVALID, f"metric {name} is a {family.type}, not a {kind}")
        elif family.labels != names:
            raise QueueError(
                Kind.INVALID,
                f"metric {name} has labels {list(family.labels)}, not {list(names)}",
            )
        series = family.series
        if values not in series and len(series) >= MAX_USER_SERIES:
            raise self._refuse(full, f"it has {MAX_USER_SERIES} label sets already")
        if kind == "counter":
            series[values] = series.get(values, 0) + value
        elif kind == "gauge":
            series[values] = (value, time.monotonic())
        else:
            counts, total = series.get(values) or ([0] * (len(USER_BUCKETS) + 1), 0.0)
            counts[bisect_left(USER_BUCKETS, value)] += 1
            series[values] = (counts, total + value)

    def _refuse(self, name: str, why: str) -> QueueError:
        if name not in self._warned:
            self._warned.add(name)
            _log.warning("user metric refused", extra={"metric": name, "reason": why})
        return QueueError(Kind.INVALID, f"metric {name} not recorded: {why}")

    def families(self) -> list[Family]:
        return [
            Family(f.name, f.type, f.help, f.labels, f.merge, f.bounds, dict(f.series))
            for f in list(self._families.values())
        ]


def _labels(name: str, labels: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if labels is None:
        return (), ()
    if not isinstance(labels, Mapping):
        raise QueueError(Kind.INVALID, f"metric {name}: labels must be a table")
    if len(labels) > MAX_USER_LABELS:
        raise QueueError(
            Kind.INVALID, f"metric {name}: {len(labels)} labels, over {MAX_USER_LABELS}"
        )
    pairs = []
    for key, value in labels.items():
        if (
            not isinstance(key, str)
            or not _NAME_RE.match(key)
            or key.startswith("__")
            or len(key) > MAX_USER_NAME
        ):
            raise QueueError(Kind.INVALID, f"metric {name}: {key!r:.40} is not a label name")
        if not isinstance(value, str | int | float):
            raise QueueError(Kind.INVALID, f"metric {name}: label {key} must be a string")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if len(text) > MAX_USER_LABEL_VALUE:
            raise QueueError(
                Kind.INVALID,
                f"metric {name}: label {key} is {len(text)} characters, over "
                f"{MAX_USER_LABEL_VALUE}",
            )
        pairs.append((key, text))
    pairs.sort()
    return tuple(k for k, _ in pairs), tuple(v for _, v in pairs)


# -- serving ----------------------------------------------------------------------------------


@dataclass
class Source:
    """What the server reports: the families, and why the worker is not live or not ready
    (None when it is)."""

    families: Callable[[], list[Family]]
    unhealthy: Callable[[], str | None]
    unready: Callable[[], str | None]


class _Collector:
    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.families():
            yield family.metric()


class Server:
    """/metrics, /healthz and /readyz on a thread of their own: a handler that keeps the event
    loop busy must not make probes time out (liveness reads the loop's last sign of life)."""

    def __init__(self, address: str, port: int, source: Source) -> None:
        self.source = source
        registry = CollectorRegistry(auto_describe=False)
        registry.register(_Collector(source))
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                path = self.path.split("?", 1)[0]
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    self._reply(200, encoder(registry), content_type)
                elif path == "/healthz":
                    self._status(server.source.unhealthy(), "ok")
                elif path == "/readyz":
                    self._status(server.source.unready(), "ready")
                else:
                    self._reply(404, b"not found: try /metrics, /healthz or /readyz\n")

            def _status(self, problem: str | None, good: str) -> None:
                if problem is None:
                    self._reply(200, f"{good}\n".encode())
                else:
                    self._reply(503, f"{problem}\n".encode())

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # scrapes every few seconds would drown the worker's own logs

        self._http = ThreadingHTTPServer((address, port), Handler)  # binds now: errors early
        self._http.daemon_threads = True
        self.address = f"{address}:{self._http.server_address[1]}"
        self._thread = threading.Thread(target=self._http.serve_forever, daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self) -> None:
        if self._thread.is_alive():
            self._http.shutdown()
        self.close()

    def close(self) -> None:
        """Let go of the port without having served (a forked worker process)."""
        self._http.server_close()


# -- a pod of worker processes ----------------------------------------------------------------


class Snapshots:
    """The metrics of a pod's worker processes, as files in one directory: each process writes
    its own (`write`), the parent reads them all (`source`)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, families: list[Family], unready: str | None) -> None:
        data = {
            "pid": os.getpid(),
            "beat": time.monotonic(),
            "unready": unready,
            "families": [family.to_json() for family in families],
        }
        path = self.directory / f"{os.getpid()}.json"
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(path)

    def _read(self) -> list[dict[str, Any]]:
        found = []
        for path in sorted(self.directory.glob("*.json")):
            try:
                found.append(json.loads(path.read_text()))
            except (OSError, ValueError):  # replaced as we read it: the next scrape has it
                continue
        return found

    def source(self, processes: Callable[[], int], stopping: Callable[[], bool]) -> Source:
        """`processes`: how many worker processes should be running now."""

        def families() -> list[Family]:
            snapshots = self._read()
            return merge([[Family.from_json(f) for f in s["families"]] for s in snapshots])

        def unhealthy() -> str | None:
            now = time.monotonic()
            for snapshot in self._read():
                if now - snapshot["beat"] > STALE_AFTER:
                    return f"worker process {snapshot['pid']} gave no sign of life for " \
                        f"{now - snapshot['beat']:.0f}s"  # fmt: skip
            return None

        def unready() -> str | None:
            if stopping():
                return "stopping"
            snapshots = self._read()
            if len(snapshots) < processes():
                return f"starting ({len(snapshots)} of {processes()} processes up)"
            for snapshot in snapshots:
                if snapshot["unready"] is not None:
                    return f"process {snapshot['pid']}: {snapshot['unready']}"
            return None

        return Source(families, unhealthy, unready)
