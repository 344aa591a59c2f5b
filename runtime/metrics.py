"""Prometheus metrics, liveness and readiness, for one worker process or a pod of them.

The hot path never touches prometheus_client: the consumers and the host bump plain integers
and `Histogram`s (a bisect and two additions), and a scrape turns their state into metric
families. That keeps the cost of metrics at well under a microsecond per message.

With `--processes N`, each worker process writes its families to a snapshot file every second;
the supervisor (supervisor.py) serves the port and merges the snapshots, so one port reports the
whole pod. How a series combines across processes is part of its family: counters and histograms
add up, and a gauge says whether it adds up, takes the minimum, the maximum, or the latest value
set.
"""

from __future__ import annotations

import json
import logging
import math
import os
import re
import sys
import threading
import time
from bisect import bisect_left
from collections.abc import Awaitable, Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager, suppress
from contextvars import ContextVar
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any, Literal, ParamSpec, TypeVar

from prometheus_client.core import (
    CollectorRegistry,
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.exposition import choose_encoder

from .errors import ErrorKind, QueueError

# latencies: a handler that does nothing takes some 3-15 µs (machines differ, and so does a
# handler's path through Lua); one that waits on a remote service, seconds; the first bucket must
# be below the fastest's median to tell anything about it
DURATION_BUCKETS = (
    0.000001, 0.0000025, 0.000005, 0.00001, 0.000025, 0.00005, 0.0001, 0.00025, 0.0005,
    0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
    1, 2.5, 5, 10, 30, 60,
)  # fmt: skip
SIZE_BUCKETS = (64, 256, 1024, 4096, 16384, 65536, 262144, 1048576, 4194304)
USER_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.075, 0.1, 0.25, 0.5, 0.75, 1, 2.5, 5, 7.5, 10)
USER_PREFIX = "luaq_user_"
MAX_USER_SERIES = 100  # per user metric
MAX_USER_METRICS = 100
# and the size of each series: a scrape and the registry stay small whatever handlers pass
MAX_USER_NAME = 100  # characters of a metric's or a label's name
MAX_USER_LABELS = 10  # per metric
MAX_USER_LABEL_VALUE = 256  # characters
# and of them all, per worker process: a scrape of them stays under 1 MB and takes milliseconds
MAX_USER_TOTAL_SERIES = 2000
MAX_USER_BYTES = 256 * 1024  # of exposition, as _exposed counts it
# the label every user series carries: the function that recorded it
USER_SCOPE = "function"
# the label names Prometheus gives a meaning (a histogram's buckets, a summary's quantiles), the
# function's, and the target labels a scrape adds (the chart's monitors honor a series' labels):
# a handler's metric may not pass for another namespace's or pod's
_RESERVED_LABELS = frozenset(
    ("le", "quantile", USER_SCOPE, "job", "instance", "namespace", "pod", "container",
     "service", "endpoint", "queueconsumer")
)  # fmt: skip
# the names of a family's samples, beside its own (prometheus_client's registry reserves these)
_SUFFIXES = {"counter": ("_total", "_created"), "gauge": (),
             "histogram": ("_bucket", "_count", "_sum", "_created")}  # fmt: skip
STALE_AFTER = 15.0  # seconds without a sign of life from an event loop: not live
SNAPSHOT_EVERY = 1.0
_NAME_RE = re.compile(r"\A[a-zA-Z_][a-zA-Z0-9_]*\Z")  # (\Z: `$` lets a final newline in)
_METRIC_RE = re.compile(r"\A[a-zA-Z_:][a-zA-Z0-9_:]*\Z")
_log = logging.getLogger("luaq.metrics")

Type = Literal["counter", "gauge", "histogram"]
Merge = Literal["sum", "min", "max", "latest"]
_P = ParamSpec("_P")
_T = TypeVar("_T")


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
    def from_json(cls, data: Any) -> Family:
        """The family `to_json` wrote; ValueError for anything else (another process wrote it:
        whatever it holds must not break a scrape)."""
        try:
            name, type_, help_, merge_ = data["name"], data["type"], data["help"], data["merge"]
            labels, bounds = tuple(data["labels"]), tuple(data["bounds"])
            pairs = list(data["series"])
        except (KeyError, TypeError) as exc:
            raise ValueError(f"not a metric family: {exc!r}") from None
        if not (isinstance(name, str) and _METRIC_RE.match(name) and isinstance(help_, str)):
            raise ValueError(f"bad name or help: {name!r:.100}")
        if type_ not in ("counter", "gauge", "histogram") or merge_ not in MERGES:
            raise ValueError(f"{name}: bad type or merge: {type_!r:.20}, {merge_!r:.20}")
        if not all(isinstance(label, str) and _NAME_RE.match(label) for label in labels):
            raise ValueError(f"{name}: bad label names")
        if not all(_is_number(bound) for bound in bounds):
            raise ValueError(f"{name}: bad bounds")
        series = {}
        for pair in pairs:
            if not isinstance(pair, list | tuple) or len(pair) != 2:
                raise ValueError(f"{name}: bad series")
            key, value = pair
            if not isinstance(key, list | tuple) or len(key) != len(labels):
                raise ValueError(f"{name}: bad label values")
            if not all(isinstance(item, str) for item in key):
                raise ValueError(f"{name}: bad label values")
            if not _valid_value(type_, merge_, len(bounds), value):
                raise ValueError(f"{name}: bad value {value!r:.100}")
            series[tuple(key)] = value
        return cls(name, type_, help_, labels, merge_, bounds, series)

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


MERGES = ("sum", "min", "max", "latest")


def _is_number(value: Any) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool)


def _valid_value(type_: str, merge_: str, bounds: int, value: Any) -> bool:
    if type_ == "histogram":  # bucket counts (the last one +Inf), and their sum
        return (
            isinstance(value, list | tuple) and len(value) == 2
            and isinstance(value[0], list) and len(value[0]) == bounds + 1
            and all(_is_number(count) for count in value[0]) and _is_number(value[1])
        )  # fmt: skip
    if type_ == "gauge" and merge_ == "latest":  # the value and when it was set
        return isinstance(value, list | tuple) and len(value) == 2 and all(map(_is_number, value))
    return _is_number(value)


def _number(bound: float) -> str:
    return repr(float(bound))


def merge(snapshots: Sequence[Sequence[Family]], conflicts: set[str] | None = None) -> list[Family]:
    """The families of several processes as one pod's. A family that does not match the first
    of its name (type, labels, merge, buckets) is left out, and its name added to `conflicts`:
    which process is right cannot be told."""
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
            if (into.type, into.labels, into.merge) != (family.type, family.labels, family.merge):
                if conflicts is not None:
                    conflicts.add(family.name)
                continue
            if into.bounds != family.bounds:  # a histogram without series has no bounds yet
                if into.series and family.series:
                    if conflicts is not None:
                        conflicts.add(family.name)
                    continue
                into.bounds = into.bounds or family.bounds
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
    """Handlers' own metrics (the Lua `metrics` module), each series labelled with the function
    that recorded it (see `acting_for`). A name keeps the type and label names it was first
    recorded with, by whichever function, and no name may be one of another family's samples
    (`x_total` beside counter `x`): the exposition always parses. Bounded: MAX_USER_METRICS
    names, MAX_USER_SERIES label sets each, MAX_USER_TOTAL_SERIES and MAX_USER_BYTES in all;
    past that, the call fails (INVALID) and the worker says so once per metric."""

    def __init__(self) -> None:
        self._families: dict[str, Family] = {}
        self._owners: dict[str, str] = {}  # the function that recorded each family first
        self._samples: dict[str, Family] = {}  # every sample name taken, to its family
        self._series = self._bytes = 0
        self._warned: set[str] = set()

    @contextmanager
    def acting_for(self, function: str) -> Iterator[None]:
        """Whatever is recorded within is `function`'s: its module's top level as it loads, or
        its invocations (`scoped`). A context variable, so that each consumer's task has its
        own, and the Lua bridge, which calls `record`, needs to know nothing of it."""
        token = _function.set(function)
        try:
            yield
        finally:
            _function.reset(token)

    def scoped(
        self, function: str, invoke: Callable[_P, Awaitable[_T]]
    ) -> Callable[_P, Awaitable[_T]]:
        """`invoke`, an invocation of `function`, acting for it."""

        async def scoped_invoke(*args: _P.args, **kwargs: _P.kwargs) -> _T:
            with self.acting_for(function):
                return await invoke(*args, **kwargs)

        return scoped_invoke

    def record(self, kind: str, name: Any, labels: Any, value: Any) -> None:
        if kind not in ("counter", "gauge", "histogram"):
            raise QueueError(ErrorKind.INVALID, f"unknown metric type {kind!r}")
        if not isinstance(name, str) or not _NAME_RE.match(name):
            raise QueueError(
                ErrorKind.INVALID,
                f"metric name {name!r:.120} must be letters, digits and underscores",
            )
        if len(name) > MAX_USER_NAME:
            raise QueueError(
                ErrorKind.INVALID, f"metric name {name[:20]}... is over {MAX_USER_NAME} characters"
            )
        if kind == "counter" and name.endswith("_total"):
            raise QueueError(
                ErrorKind.INVALID,
                f"metric {name}: a counter's name gets _total added: call it {name[:-6]}",
            )
        if (
            isinstance(value, bool)
            or not isinstance(value, int | float)
            or not math.isfinite(value)
        ):
            raise QueueError(ErrorKind.INVALID, f"metric {name}: value must be a finite number")
        if kind == "counter" and value < 0:
            raise QueueError(ErrorKind.INVALID, f"metric {name}: a counter only goes up")
        names, values = _labels(name, labels)
        function = _function.get()
        full = USER_PREFIX + name
        family = self._families.get(full)
        if family is None:
            family = self._new(kind, name, names)  # kept once its first series is
        elif family.type != kind:
            raise QueueError(
                ErrorKind.INVALID,
                f"metric {name} is a {family.type} of function {self._owners[full]}, not a {kind}",
            )
        elif family.labels[1:] != names:
            raise QueueError(
                ErrorKind.INVALID,
                f"metric {name} has labels {list(family.labels[1:])}, not {list(names)}",
            )
        key = (function, *values)
        series = family.series
        if key not in series:
            self._admit(family, key, new=full not in self._families)
            if full not in self._families:
                self._families[full] = family
                self._owners[full] = function
                self._samples.update((sample, family) for sample in _samples(kind, full))
        if kind == "counter":
            series[key] = series.get(key, 0) + value
        elif kind == "gauge":
            series[key] = (value, time.monotonic())
        else:
            counts, total = series.get(key) or ([0] * (len(USER_BUCKETS) + 1), 0.0)
            counts[bisect_left(USER_BUCKETS, value)] += 1
            series[key] = (counts, total + value)

    def _new(self, kind: str, name: str, names: tuple[str, ...]) -> Family:
        full = USER_PREFIX + name
        if len(self._families) >= MAX_USER_METRICS:
            raise self._refuse(full, f"there are {MAX_USER_METRICS} user metrics already")
        for sample in _samples(kind, full):
            other = self._samples.get(sample)
            if other is not None:
                raise QueueError(
                    ErrorKind.INVALID,
                    f"metric {name}: {sample} is a sample of {other.type} "
                    f"{other.name.removeprefix(USER_PREFIX)}",
                )
        merge_as: Merge = "latest" if kind == "gauge" else "sum"
        help_ = f"{kind} of handlers, metrics.{kind}()"
        family = Family(full, kind, help_, (USER_SCOPE, *names), merge_as)  # type: ignore[arg-type]
        if kind == "histogram":
            family.bounds = USER_BUCKETS
        return family

    def _admit(self, family: Family, key: tuple[str, ...], new: bool) -> None:
        """Counts a new series of `family` (and the family's own lines when `new`) against the
        caps, or refuses it."""
        if len(family.series) >= MAX_USER_SERIES:
            raise self._refuse(family.name, f"it has {MAX_USER_SERIES} label sets already")
        if self._series >= MAX_USER_TOTAL_SERIES:
            raise self._refuse(
                family.name, f"handlers' metrics have {MAX_USER_TOTAL_SERIES} series already"
            )
        size = _exposed(family, key) + (2 * len(family.name) + len(family.help) + 64) * new
        if self._bytes + size > MAX_USER_BYTES:
            raise self._refuse(
                family.name, f"handlers' metrics would be over {MAX_USER_BYTES} bytes in a scrape"
            )
        self._series += 1
        self._bytes += size

    def _refuse(self, name: str, why: str) -> QueueError:
        if name not in self._warned:
            self._warned.add(name)
            _log.warning("user metric refused", extra={"metric": name, "reason": why})
        return QueueError(ErrorKind.INVALID, f"metric {name} not recorded: {why}")

    def families(self) -> list[Family]:
        return [
            Family(f.name, f.type, f.help, f.labels, f.merge, f.bounds, dict(f.series))
            for f in list(self._families.values())
        ]


_function: ContextVar[str] = ContextVar("luaq_user_metrics_function", default="")


def _samples(kind: str, name: str) -> tuple[str, ...]:
    """The names a family of `kind` called `name` takes: its own and its samples'."""
    return (name, *(name + suffix for suffix in _SUFFIXES[kind]))


def _exposed(family: Family, key: tuple[str, ...]) -> int:
    """An upper bound on the bytes one series of `family` takes in a scrape, in either format:
    a line per sample, each with the name, its suffix, every label, escaped, and a number."""
    labels = sum(
        len(name) + len(value.encode()) + value.count("\\") + value.count("\n")
        + value.count('"') + 4  # name="value",
        for name, value in zip(family.labels, key, strict=True)
    )  # fmt: skip
    line = len(family.name) + 10 + labels + 32  # the suffix, braces; a space, a float, "\n"
    if family.type == "histogram":
        return (len(family.bounds) + 1) * (line + 16) + 2 * line  # buckets (le="..."), count, sum
    return line


def _labels(name: str, labels: Any) -> tuple[tuple[str, ...], tuple[str, ...]]:
    if labels is None:
        return (), ()
    if not isinstance(labels, Mapping):
        raise QueueError(ErrorKind.INVALID, f"metric {name}: labels must be a table")
    if len(labels) > MAX_USER_LABELS:
        raise QueueError(
            ErrorKind.INVALID, f"metric {name}: {len(labels)} labels, over {MAX_USER_LABELS}"
        )
    pairs = []
    for key, value in labels.items():
        if (
            not isinstance(key, str)
            or not _NAME_RE.match(key)
            or key.startswith("__")
            or key in _RESERVED_LABELS
            or len(key) > MAX_USER_NAME
        ):
            raise QueueError(ErrorKind.INVALID, f"metric {name}: {key!r:.40} is not a label name")
        if not isinstance(value, str | int | float):
            raise QueueError(ErrorKind.INVALID, f"metric {name}: label {key} must be a string")
        text = str(value).lower() if isinstance(value, bool) else str(value)
        if len(text) > MAX_USER_LABEL_VALUE:
            raise QueueError(
                ErrorKind.INVALID,
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
    (None when it is). The server asks, and writes to stderr, only while it holds `lock`: a
    supervisor forking a worker process holds it too, so that no lock of the server's threads
    (stderr's above all) is held in the new process."""

    families: Callable[[], list[Family]]
    unhealthy: Callable[[], str | None]
    unready: Callable[[], str | None]
    lock: threading.Lock = field(default_factory=threading.Lock)


class _Collector:
    def __init__(self, source: Source) -> None:
        self.source = source

    def collect(self) -> Iterator[Metric]:
        for family in self.source.families():
            yield family.metric()


class _HTTPServer(ThreadingHTTPServer):
    daemon_threads = True
    lock: threading.Lock

    def handle_error(self, request: Any, client_address: Any) -> None:
        if isinstance(sys.exc_info()[1], OSError):
            return  # the client hung up: nothing to tell
        with self.lock:  # not on stderr from here without it: see Source
            _log.exception("metrics request failed")


class Server:
    """/metrics, /healthz and /readyz on a thread of their own: a handler that keeps the event
    loop busy must not make probes time out (liveness reads the loop's last sign of life).

    The port is bound first, so that a busy one stops everything before it starts and what is
    served can say where (`address`); `start` then serves a Source."""

    def __init__(self, address: str, port: int) -> None:
        self.source: Source  # from `start` on
        self._registry = CollectorRegistry(auto_describe=False)
        server = self

        class Handler(BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # the name http.server calls
                with server.source.lock:
                    try:
                        reply = self._answer(self.path.split("?", 1)[0])
                    except Exception:
                        _log.exception("metrics request failed", extra={"path": self.path})
                        reply = 500, b"internal error (logged)\n", "text/plain"
                self._reply(*reply)

            def _answer(self, path: str) -> tuple[int, bytes, str]:
                if path == "/metrics":
                    encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                    return 200, encoder(server._registry), content_type
                if path in ("/healthz", "/readyz"):
                    healthz = path == "/healthz"
                    source = server.source
                    problem = source.unhealthy() if healthz else source.unready()
                    if problem is None:
                        return 200, b"ok\n" if healthz else b"ready\n", "text/plain"
                    return 503, f"{problem}\n".encode(), "text/plain"
                return 404, b"not found: try /metrics, /healthz or /readyz\n", "text/plain"

            def _reply(self, code: int, body: bytes, content_type: str = "text/plain") -> None:
                self.send_response(code)
                self.send_header("Content-Type", content_type)
                self.send_header("Content-Length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

            def log_message(self, format: str, *args: Any) -> None:
                return None  # scrapes every few seconds would drown the worker's own logs

        self._http = _HTTPServer((address, port), Handler)  # binds now: errors early
        self.address = f"{address}:{self._http.server_address[1]}"
        self._thread: threading.Thread | None = None

    def start(self, source: Source, poll_interval: float = 0.5) -> None:
        """Serve `source` from a thread; `stop` may take up to `poll_interval` seconds."""
        self.source = source
        self._registry.register(_Collector(source))
        self._http.lock = source.lock
        self._thread = threading.Thread(
            target=self._http.serve_forever, args=(poll_interval,), daemon=True
        )
        self._thread.start()

    def stop(self) -> None:
        if self._thread is not None and self._thread.is_alive():
            self._http.shutdown()
        self.close()

    def close(self) -> None:
        """Let go of the port without having served (a forked worker process)."""
        self._http.server_close()


# -- a pod of worker processes ----------------------------------------------------------------


class Snapshots:
    """The metrics of a pod's worker processes, as files in one directory: each process writes
    its own (`write`), its supervisor reads them (`read`, see supervisor.Pod)."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory

    def write(self, families: list[Family], unready: str | None) -> None:
        data = {
            "pid": os.getpid(),
            "beat": time.monotonic(),
            "unready": unready,
            "families": [family.to_json() for family in families],
        }
        path = self._path(os.getpid())
        temporary = path.with_suffix(".tmp")
        temporary.write_text(json.dumps(data))
        temporary.replace(path)

    def read(self, pid: int) -> Any:
        """The last snapshot process `pid` wrote, as parsed JSON; None when there is none."""
        try:
            return json.loads(self._path(pid).read_text())
        except (OSError, ValueError):  # none yet (a snapshot is replaced whole, never in part)
            return None

    def remove(self, pid: int) -> None:
        for path in (self._path(pid), self._path(pid).with_suffix(".tmp")):
            with suppress(FileNotFoundError):
                path.unlink()

    def _path(self, pid: int) -> Path:
        return self.directory / f"{pid}.json"
