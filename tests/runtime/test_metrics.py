"""Metrics, liveness and readiness (`luaq run --metrics-port`), scraped from real worker
processes on the memory driver and on the real RabbitMQ, one process or a pod of them; the
handlers' own metrics; the two log formats."""

from __future__ import annotations

import asyncio
import io
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
import warnings
from pathlib import Path
from typing import Any
from urllib.parse import quote, urlsplit

import pytest
from broker import AMQP_URL, rabbitmqctl, vhost_url
from conftest import AppFactory, eventually
from luaq.runtime import logs
from luaq.runtime.metrics import STALE_AFTER, Family, Server, Snapshots, Source, merge
from luaq.runtime.supervisor import Pod
from processes import (
    Spawner,
    free_port,
    json_lines,
    reported,
    wait_until,
    write_app,
    write_jsonl,
)
from prometheus import binary
from prometheus_client.openmetrics.parser import (
    text_string_to_metric_families as openmetrics_families,
)
from prometheus_client.parser import text_string_to_metric_families
from tcp_proxy import TcpProxy
from test_faults import fill

HANDLER = """
local seen = {}
function handle(p)
  seen[p.n] = (seen[p.n] or 0) + 1
  metrics.counter("handled", {parity = p.n % 2 == 0 and "even" or "odd"})
  metrics.gauge("last_n", {}, p.n)
  metrics.histogram("work_seconds", {}, 0.02)
  if p.mode == "fail_once" and seen[p.n] == 1 then return nil, "not yet" end
  if p.mode == "fail" then error(errors.new({message = "never", kind = errors.CONFLICT})) end
  if p.mode == "secret" then return queue.publish("app:secret", p) end
  return queue.publish("app:out", p)
end
"""


def app_entries(path: Path, driver: dict[str, Any]) -> Path:
    """Every outcome: acks; retries; dead letters (jobs, max 2 attempts); rejections (`bad`:
    dead_letter without a queue); a publish the policy refuses (to `secret`)."""
    return write_app(path, [
        {"name": "broker", **driver},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker", "retry": {"delay": "10ms"},
         "dead_letter": {"queue": "dlq", "max_attempts": 2}},
        {"name": "bad", "kind": "queue.queue", "driver": "broker",
         "dead_letter": {"max_attempts": 1}},
        *({"name": name, "kind": "queue.queue", "driver": "broker"}
          for name in ("dlq", "out", "secret")),
        {"name": "publish_out", "kind": "security.policy", "groups": ["workers"],
         "policy": {"actions": "queue.publish*", "resources": ["app:out"], "effect": "allow"}},
        {"name": "general", "kind": "security.policy", "groups": ["workers"],
         "policy": {"actions": "queue.publish", "effect": "allow"}},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": HANDLER, "concurrency": 3, "security": {"groups": ["workers"]},
         "modules": ["queue", "metrics"]},
        {"id": "rejecter", "kind": "queue.consumer", "queue": "bad", "method": "handle",
         "source": 'function handle(p) error("no") end'},
    ])  # fmt: skip


INPUTS = [
    *({"queue": "app:jobs", "data": {"n": n}} for n in range(6)),
    {"queue": "app:jobs", "data": {"n": 6, "mode": "fail_once"}},
    {"queue": "app:jobs", "data": {"n": 7, "mode": "fail"}},
    {"queue": "app:jobs", "data": {"n": 8, "mode": "secret"}},
    {"queue": "app:bad", "data": {"n": 9}},
]


def get(port: int, path: str, accept: str | None = None) -> tuple[int, str, str]:
    """(status, content type, body); a refused connection is status 0."""
    request = urllib.request.Request(f"http://127.0.0.1:{port}{path}")
    if accept:
        request.add_header("Accept", accept)
    try:
        with urllib.request.urlopen(request, timeout=5) as response:
            return response.status, response.headers["Content-Type"], response.read().decode()
    except urllib.error.HTTPError as error:
        return error.code, error.headers["Content-Type"], error.read().decode()
    except OSError:
        return 0, "", ""


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


def scrape(port: int) -> Samples:
    status, _, body = get(port, "/metrics")
    assert status == 200, body
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(body)
        for sample in family.samples
    }


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), -1.0)


def series(samples: Samples) -> set[tuple[str, frozenset[str]]]:
    """Sample names with their label names: what a dashboard can rely on."""
    return {(name, frozenset(k for k, _ in labels)) for name, labels in samples}


def run_every_outcome(tmp_path: Path, spawn: Spawner, driver: dict[str, Any]) -> Samples:
    tmp_path.mkdir(exist_ok=True)
    port = free_port()
    app = app_entries(tmp_path / "app.yaml", driver)
    messages = write_jsonl(tmp_path / "in.jsonl", INPUTS)
    process = spawn("run", app, "--input", messages, "--metrics-port", str(port))

    def settled() -> bool:
        samples = scrape(port) if get(port, "/healthz")[0] == 200 else {}
        done = value(samples, "luaq_messages_settled_total", consumer="app:worker",
                     queue="app:jobs", outcome="dead_letter") == 2  # fmt: skip
        return done and value(samples, "luaq_queue_backlog", queue="app:dlq",
                              driver="app:broker") == 2  # fmt: skip

    wait_until(settled, 30, "every message settled and the backlog sampled")
    samples = scrape(port)
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.stderr
    return samples


def test_every_outcome_is_counted_on_the_memory_driver(tmp_path: Path, spawn: Spawner) -> None:
    samples = run_every_outcome(tmp_path, spawn, {"kind": "queue.driver.memory"})
    worker = {"consumer": "app:worker", "queue": "app:jobs"}
    assert value(samples, "luaq_messages_received_total", **worker) == 9 + 3  # 3 retries
    settled = {
        outcome: value(samples, "luaq_messages_settled_total", **worker, outcome=outcome)
        for outcome in ("ack", "retry", "requeue", "dead_letter", "reject", "stale")
    }
    # n=6 fails once; n=7 fails twice, n=8 is refused twice: both then dead-lettered
    assert settled == {"ack": 7, "retry": 3, "requeue": 0, "dead_letter": 2, "reject": 0,
                       "stale": 0}  # fmt: skip
    rejecter = {"consumer": "app:rejecter", "queue": "app:bad"}
    assert value(samples, "luaq_messages_settled_total", **rejecter, outcome="reject") == 1
    assert value(samples, "luaq_handler_duration_seconds_count", **worker) == 12
    assert value(samples, "luaq_handler_duration_seconds_bucket", **worker, le="+Inf") == 12
    assert value(samples, "luaq_handler_errors_total", **worker, kind="CONFLICT") == 2
    assert value(samples, "luaq_handler_errors_total", **worker, kind="UNKNOWN") == 1
    assert value(samples, "luaq_handler_errors_total", **worker, kind="PERMISSION_DENIED") == 2
    assert value(samples, "luaq_handlers_in_flight", **worker) == 0
    assert value(samples, "luaq_consumer_concurrency", **worker) == 3
    assert value(samples, "luaq_message_size_bytes_count", **worker) == 12
    out = {"queue": "app:out", "driver": "app:broker"}
    assert value(samples, "luaq_messages_published_total", **out) == 7
    assert value(samples, "luaq_publish_duration_seconds_count", **out) == 7
    secret = {"queue": "app:secret", "driver": "app:broker", "kind": "PERMISSION_DENIED"}
    assert value(samples, "luaq_publish_failures_total", **secret) == 2
    assert value(samples, "luaq_permission_denials_total", consumer="app:worker",
                 action="queue.publish.queue") == 2  # fmt: skip
    assert value(samples, "luaq_messages_published_total", queue="app:jobs",
                 driver="app:broker") == 9  # --input  # fmt: skip
    assert value(samples, "luaq_driver_connected", driver="app:broker") == 1
    assert value(samples, "luaq_driver_reconnects_total", driver="app:broker") == 0
    assert value(samples, "luaq_queue_backlog", queue="app:jobs", driver="app:broker") == 0
    assert value(samples, "luaq_worker_ready") == 1
    handler = {"function": "app:worker#handler"}
    assert value(samples, "luaq_user_handled_total", **handler, parity="even") == 7
    assert value(samples, "luaq_user_handled_total", **handler, parity="odd") == 5
    assert value(samples, "luaq_user_work_seconds_count", **handler) == 12
    assert 0 <= value(samples, "luaq_user_last_n", **handler) <= 8
    assert any(name == "luaq_build_info" for name, _ in samples)


def test_amqp_exports_the_same_series_as_memory(tmp_path: Path, spawn: Spawner, vhost: str) -> None:
    memory = run_every_outcome(tmp_path / "m", spawn, {"kind": "queue.driver.memory"})
    url = vhost_url(vhost)
    amqp = run_every_outcome(tmp_path / "a", spawn, {"kind": "queue.driver.amqp", "url": url})
    assert series(amqp) == series(memory)
    outcomes = ("ack", "retry", "dead_letter")
    for outcome in outcomes:
        labels = {"consumer": "app:worker", "queue": "app:jobs", "outcome": outcome}
        assert value(amqp, "luaq_messages_settled_total", **labels) == value(
            memory, "luaq_messages_settled_total", **labels
        ), outcome


def test_a_message_waiting_for_its_retry_is_delayed_not_backlog(
    tmp_path: Path, spawn: Spawner
) -> None:
    """A retry an hour away is no work a consumer could take now: a stalled consumer is one
    with ready messages, so the backlog leaves it out and luaq_queue_delayed counts it."""
    app = write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.memory"},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker", "retry": {"delay": "1h"}},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": 'function handle(p) return nil, "later" end'},
    ])  # fmt: skip
    messages = write_jsonl(tmp_path / "in.jsonl", [{"queue": "app:jobs", "data": {}}] * 2)
    port = free_port()
    spawn("run", app, "--input", messages, "--metrics-port", str(port))
    jobs = {"queue": "app:jobs", "driver": "app:broker"}
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "ready")
    wait_until(lambda: value(scrape(port), "luaq_queue_delayed", **jobs) == 2, 30,
               "both messages sampled waiting for their retry")  # fmt: skip
    assert value(scrape(port), "luaq_queue_backlog", **jobs) == 0


def test_a_no_op_handlers_latency_is_resolved(tmp_path: Path, spawn: Spawner) -> None:
    """Handler latency buckets resolve a handler that does nothing: its median falls in a
    bucket below 1 ms, and not the first one (which would say only "faster than that")."""
    app = write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.memory"},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": "function handle(p) end"},
    ])  # fmt: skip
    messages = write_jsonl(tmp_path / "in.jsonl", [{"queue": "app:jobs", "data": {}}] * 500)
    port = free_port()
    spawn("run", app, "--input", messages, "--metrics-port", str(port))
    worker = {"consumer": "app:worker", "queue": "app:jobs"}
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "ready")
    wait_until(lambda: value(scrape(port), "luaq_handler_duration_seconds_count", **worker)
               == 500, 30, "every message handled")  # fmt: skip
    samples = scrape(port)
    buckets = sorted(
        (float(dict(labels)["le"]), count)
        for (name, labels), count in samples.items()
        if name == "luaq_handler_duration_seconds_bucket"
    )
    median = next(bound for bound, count in buckets if count >= 250)
    assert buckets[0][0] < median < 0.001, buckets


def test_openmetrics_when_asked_for(tmp_path: Path, spawn: Spawner) -> None:
    port = free_port()
    app = app_entries(tmp_path / "app.yaml", {"kind": "queue.driver.memory"})
    spawn("run", app, "--metrics-port", str(port))
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "ready")
    status, content_type, body = get(port, "/metrics", "application/openmetrics-text")
    assert status == 200
    assert content_type.startswith("application/openmetrics-text")
    assert body.endswith("# EOF\n")
    assert "luaq_messages_received_total{" in body
    status, content_type, body = get(port, "/metrics")
    assert content_type.startswith("text/plain")
    assert "# EOF" not in body
    assert get(port, "/nothing")[0] == 404


# -- liveness and readiness ---------------------------------------------------------------------


def test_not_ready_before_start_up_completes(tmp_path: Path, spawn: Spawner) -> None:
    """A broker that accepts the connection and never says a word: the worker is live, not
    ready, and after connection_timeout exits with an error."""
    with socket.socket() as silent:
        silent.bind(("127.0.0.1", 0))
        silent.listen()
        url = f"amqp://guest:guest@127.0.0.1:{silent.getsockname()[1]}/"
        app = app_entries(tmp_path / "app.yaml", {"kind": "queue.driver.amqp", "url": url,
                                                  "connection_timeout": "3s"})  # fmt: skip
        port = free_port()
        process = spawn("run", app, "--metrics-port", str(port))
        wait_until(lambda: get(port, "/readyz")[0] != 0, 20, "the metrics port answering")
        assert get(port, "/readyz")[0::2] == (503, "starting\n")
        assert get(port, "/healthz")[0::2] == (200, "ok\n")
        assert process.wait(30) == 1
        assert "UNAVAILABLE" in process.stderr


def test_readiness_follows_the_connection_and_shutdown(
    tmp_path: Path, spawn: Spawner, vhost: str
) -> None:
    url = vhost_url(vhost)
    app = write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.amqp", "url": url, "reconnect_delay": "1s"},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "modules": ["time"], "source": "function handle(p) time.sleep(3) end"},
    ])  # fmt: skip
    port = free_port()
    process = spawn("run", app, "--metrics-port", str(port), "--shutdown-timeout", "10")
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "ready")

    rabbitmqctl("close_all_connections", "--vhost", vhost, "test: readiness")
    wait_until(lambda: get(port, "/readyz")[0::2] == (503, "reconnecting app:broker\n"), 10,
               "not ready while reconnecting")  # fmt: skip
    assert value(scrape(port), "luaq_driver_connected", driver="app:broker") == 0
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "ready again")
    assert value(scrape(port), "luaq_driver_reconnects_total", driver="app:broker") >= 1

    asyncio.run(fill(url, "jobs", 1))
    wait_until(lambda: value(scrape(port), "luaq_handlers_in_flight", consumer="app:worker",
                             queue="app:jobs") == 1, 10, "a handler running")  # fmt: skip
    process.popen.send_signal(signal.SIGTERM)
    wait_until(lambda: get(port, "/readyz")[0::2] == (503, "stopping\n"), 5, "stopping")
    assert get(port, "/healthz")[0] == 200, "draining is alive"
    assert process.wait(30) == 0, process.stderr


async def test_a_broker_outage_is_not_a_liveness_failure(
    tmp_path: Path, spawn: Spawner, vhost: str
) -> None:
    """The broker cut off for 60 s, four times what liveness tolerates of silence (the outage
    in which a review saw 26 of 60 probes fail): sampling the queues' depth waits on the broker
    meanwhile, the event loop's beat must not. Every probe of /healthz (each 0.5 s, as a
    kubelet's) says live; /readyz says not ready, then ready."""
    async with TcpProxy("127.0.0.1", urlsplit(AMQP_URL).port or 5672) as proxy:
        url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/{quote(vhost, safe='')}"
        app = app_entries(tmp_path / "app.yaml", {"kind": "queue.driver.amqp", "url": url,
                                                  "reconnect_delay": "200ms",
                                                  "reconnect_max_delay": "1s"})  # fmt: skip
        port = free_port()
        spawn("run", app, "--metrics-port", str(port))

        async def probe(path: str) -> int:
            return (await asyncio.to_thread(get, port, path))[0]

        async def ready() -> bool:
            return await probe("/readyz") == 200

        await eventually(ready, 30)
        proxy.refuse()
        proxy.cut()
        cut_at = asyncio.get_running_loop().time()
        live, readiness = [], []
        while asyncio.get_running_loop().time() - cut_at < max(60, STALE_AFTER + 5):
            live.append(await probe("/healthz"))
            readiness.append(await probe("/readyz"))
            await asyncio.sleep(0.5)  # the probes' period, not a synchronisation
        proxy.accept()
        await eventually(ready, 30)
        live.append(await probe("/healthz"))
    assert set(live) == {200}, f"{live.count(503)} of {len(live)} probes said not live"
    assert readiness[-1] == 503, "not ready while the broker is away"


def test_liveness_reads_the_event_loops_last_sign_of_life() -> None:
    """The server answers from its own thread, so a worker whose loop is stuck still answers
    the probe: with 503, once the loop has been silent for too long."""
    reason: list[str | None] = [None]
    server = Server("127.0.0.1", 0)
    server.start(Source(list, lambda: reason[0], lambda: None))
    port = int(server.address.rsplit(":", 1)[1])
    try:
        assert get(port, "/healthz")[0::2] == (200, "ok\n")
        reason[0] = "the event loop gave no sign of life for 20s"
        assert get(port, "/healthz")[0::2] == (503, f"{reason[0]}\n")
    finally:
        server.stop()


def test_a_pod_is_not_live_when_one_of_its_processes_went_silent(tmp_path: Path) -> None:
    snapshots = Snapshots(tmp_path)
    snapshots.write([], None)
    pod = Pod(1, snapshots)
    pod.started(0, os.getpid())  # the snapshot above is this process's
    source = pod.source()
    assert source.unhealthy() is None
    assert source.unready() is None
    (path,) = tmp_path.glob("*.json")
    snapshot = json.loads(path.read_text())
    snapshot["beat"] -= 60
    path.write_text(json.dumps(snapshot))
    assert "gave no sign of life for 60s" in str(source.unhealthy())


def test_a_busy_metrics_port_is_said_clearly(tmp_path: Path, spawn: Spawner) -> None:
    app = app_entries(tmp_path / "app.yaml", {"kind": "queue.driver.memory"})
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        process = spawn("run", app, "--metrics-port", str(port), "--metrics-address",
                        "127.0.0.1")  # fmt: skip
        assert process.wait(30) == 1
    assert f"--metrics-port {port}: Address already in use" in process.stderr


# -- a pod of processes -------------------------------------------------------------------------


def test_one_port_sums_every_process(tmp_path: Path, spawn: Spawner, vhost: str) -> None:
    url = vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 300))
    app = write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.amqp", "url": url},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": "function handle(p) end", "concurrency": 4, "prefetch": 10},
    ])  # fmt: skip
    port = free_port()
    process = spawn("run", app, "--processes", "2", "--metrics-port", str(port))
    key = {"consumer": "app:worker", "queue": "app:jobs"}
    wait_until(lambda: get(port, "/readyz")[0] == 200, 30, "both processes ready")
    wait_until(lambda: value(scrape(port), "luaq_messages_settled_total", **key, outcome="ack")
               == 300, 30, "300 acks over both processes")  # fmt: skip
    samples = scrape(port)
    assert value(samples, "luaq_messages_received_total", **key) == 300
    assert value(samples, "luaq_handler_duration_seconds_count", **key) == 300
    assert value(samples, "luaq_consumer_concurrency", **key) == 8, "4 per process"
    assert value(samples, "luaq_driver_connected", driver="app:broker") == 1
    assert value(samples, "luaq_worker_ready") == 1
    received = [line for line in process.logs() if line.get("msg") == "worker started"]
    assert len(received) == 2, "two processes"
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.stderr


# -- handlers' own metrics ------------------------------------------------------------------------


async def test_user_metrics_are_validated_and_bounded(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local results = {}
          for i = 1, 101 do
            local ok, err = metrics.counter("by_user", {user = "u" .. i})
            results[i] = ok or err:kind() .. ": " .. err:message()
          end
          local _, bad_name = metrics.counter("no spaces", {})
          local _, bad_type = metrics.gauge("by_user", {user = "u1"}, 1)
          local _, bad_labels = metrics.counter("by_user", {other = "x"})
          local _, bad_value = metrics.counter("by_user", {user = "u1"}, -1)
          local _, bad_label = metrics.counter("x", {["1bad"] = "y"})
          local _, long_name = metrics.counter(string.rep("n", 101), {})
          local _, long_value = metrics.counter("x", {big = string.rep("v", 257)})
          local many = {}
          for i = 1, 11 do many["l" .. i] = "v" end
          local _, many_labels = metrics.counter("x", many)
          assert(queue.publish("out", {
            first = results[1], last = results[101],
            errors = {bad_name:message(), bad_type:message(), bad_labels:message(),
                      bad_value:message(), bad_label:message(), long_name:message(),
                      long_value:message(), many_labels:message()}}))
        end
        """,
        [1],
        modules=["queue", "metrics"],
    )
    report = out[0].data
    assert report["first"] is True
    assert report["last"] == "INVALID: metric luaq_user_by_user not recorded: it has 100 label " \
        "sets already"  # fmt: skip
    assert report["errors"] == [
        "metric name 'no spaces' must be letters, digits and underscores",
        "metric by_user is a counter of function app:handler, not a gauge",
        "metric by_user has labels ['user'], not ['other']",
        "metric by_user: a counter only goes up",
        "metric x: '1bad' is not a label name",
        "metric name nnnnnnnnnnnnnnnnnnnn... is over 100 characters",
        "metric x: label big is 257 characters, over 256",
        "metric x: 11 labels, over 10",
    ]
    assert "luaq_user_x" not in {f.name for f in app.worker.telemetry.families()}
    refused = [r for r in caplog.records if r.getMessage() == "user metric refused"]
    assert len(refused) == 1, "said once"
    families = {f.name: f for f in app.worker.telemetry.families()}
    assert len(families["luaq_user_by_user"].series) == 100


TRY = """
local results = {}
local function try(ok, err) results[#results + 1] = ok and "ok" or err:message() end
"""


def run_user_metrics(
    tmp_path: Path, spawn: Spawner, sources: dict[str, str]
) -> tuple[int, list[list[str]]]:
    """Runs a consumer per source, each on its own queue (the first's has one message), each
    logging "tried" with what its calls returned: the metrics port once every one has, and
    what their calls returned."""
    app = write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.memory"},
        *({"name": f"q_{name}", "kind": "queue.queue", "driver": "broker"} for name in sources),
        *({"id": name, "kind": "queue.consumer", "queue": f"q_{name}", "method": "handle",
           "source": TRY + source, "modules": ["queue", "metrics", "logger"]}
          for name, source in sources.items()),
    ])  # fmt: skip
    first = next(iter(sources))
    messages = write_jsonl(tmp_path / "in.jsonl", [{"queue": f"app:q_{first}", "data": {}}])
    port = free_port()
    process = spawn("run", app, "--input", messages, "--metrics-port", str(port))

    def tried() -> list[list[str]]:
        return [line["fields"]["results"] for line in process.logs() if line["msg"] == "tried"]

    wait_until(lambda: len(tried()) == len(sources), 60, "every consumer tried")
    return port, tried()


def test_user_metrics_are_scoped_by_function_and_never_clash(
    tmp_path: Path, spawn: Spawner
) -> None:
    """Two functions may share a metric; neither can take the other's name with another type,
    and no name or label can make two families' samples meet or break the exposition."""
    first = """
    function handle(p)
      try(metrics.counter("x", {}))
      try(metrics.gauge("shared", {}, 1))
      try(metrics.histogram("h", {}, 0.5))
      try(metrics.gauge("z_count", {}, 1))
      try(metrics.gauge("t_total", {}, 1))
      logger.info("tried", {results = results})
      assert(queue.publish("q_second", {}))
    end
    """
    second = """
    function handle(p)
      try(metrics.gauge("shared", {}, 2))
      try(metrics.gauge("x", {}, 1))
      try(metrics.gauge("x_total", {}, 1))
      try(metrics.gauge("h_count", {}, 1))
      try(metrics.histogram("z", {}, 1))
      try(metrics.counter("t", {}))
      try(metrics.counter("c_total", {}))
      try(metrics.gauge("bad\\n", {}, 1))
      try(metrics.gauge("l", {le = "1"}, 1))
      try(metrics.gauge("l", {quantile = "1"}, 1))
      try(metrics.gauge("l", {["function"] = "f"}, 1))
      try(metrics.gauge("l", {["a\\n"] = "v"}, 1))
      try(metrics.gauge("l", {namespace = "team-b"}, 1))
      try(metrics.gauge("l", {queueconsumer = "payments"}, 1))
      try(metrics.gauge("escaped", {v = "a\\nb\\"c\\\\"}, 1))
      logger.info("tried", {results = results})
    end
    """
    port, tried = run_user_metrics(tmp_path, spawn, {"first": first, "second": second})
    assert tried == [
        ["ok"] * 5,
        [
            "ok",
            "metric x is a counter of function app:first#handler, not a gauge",
            "metric x_total: luaq_user_x_total is a sample of counter x",
            "metric h_count: luaq_user_h_count is a sample of histogram h",
            "metric z: luaq_user_z_count is a sample of gauge z_count",
            "metric t: luaq_user_t_total is a sample of gauge t_total",
            "metric c_total: a counter's name gets _total added: call it c",
            "metric name 'bad\\n' must be letters, digits and underscores",
            "metric l: 'le' is not a label name",
            "metric l: 'quantile' is not a label name",
            "metric l: 'function' is not a label name",
            "metric l: 'a\\n' is not a label name",
            "metric l: 'namespace' is not a label name",
            "metric l: 'queueconsumer' is not a label name",
            "ok",
        ],
    ]
    samples = scrape(port)
    for function, n in (("app:first#handler", 1), ("app:second#handler", 2)):
        assert value(samples, "luaq_user_shared", function=function) == n
    assert value(samples, "luaq_user_escaped", function="app:second#handler",
                 v='a\nb"c\\') == 1  # fmt: skip
    check = subprocess.run(
        [binary("promtool"), "check", "metrics"], input=get(port, "/metrics")[2],
        capture_output=True, text=True, timeout=30, check=False,
    )  # fmt: skip
    assert "error while linting" not in check.stderr, check.stderr  # (its lint is not ours)
    openmetrics = get(port, "/metrics", "application/openmetrics-text")[2]
    assert any(f.name == "luaq_user_x" for f in openmetrics_families(openmetrics))


@pytest.mark.parametrize(
    ("shape", "refused"),
    [
        # histograms with ten labels of 256 characters: over 60 kB of exposition a series
        ("wide", "handlers' metrics would be over 262144 bytes in a scrape"),
        ("many", "handlers' metrics have 2000 series already"),
    ],
)
def test_user_metrics_keep_a_scrape_small(
    tmp_path: Path, spawn: Spawner, shape: str, refused: str
) -> None:
    """Within every per-metric cap, one invocation could make each scrape 600 MiB."""
    labels, length, kind = (10, 256, "histogram") if shape == "wide" else (1, 3, "counter")
    source = f"""
    function handle(p)
      local labels = {{}}
      for i = 1, {labels} do labels["l" .. i] = string.rep("v", {length}) end
      for m = 1, 100 do
        for s = 1, 100 do
          labels.l1 = string.format("%03d", s) .. string.sub(labels.l1, 4)
          local ok, err = metrics.{kind}("m" .. m, labels, 1)
          if not ok then try(ok, err) break end
        end
        if #results > 0 then break end
      end
      logger.info("tried", {{results = results}})
    end
    """
    port, tried = run_user_metrics(tmp_path, spawn, {"w": source})
    ((message,),) = tried
    assert message.endswith(f" not recorded: {refused}"), message
    started = time.monotonic()
    status, _, body = get(port, "/metrics")
    took = time.monotonic() - started
    assert status == 200
    assert len(body.encode()) < 1_000_000
    assert took < 1, took


def test_user_gauges_take_the_latest_value_across_processes() -> None:
    older = Family("luaq_user_g", "gauge", "", (), "latest", series={(): (1.0, 10.0)})
    newer = Family("luaq_user_g", "gauge", "", (), "latest", series={(): (2.0, 20.0)})
    counter = Family("luaq_user_c", "counter", "", series={(): 3})
    merged = {f.name: f for f in merge([[newer, counter], [older, counter]])}
    assert merged["luaq_user_g"].series[()] == (2.0, 20.0)
    assert merged["luaq_user_c"].series[()] == 6


# -- logs -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["text", "json"])
def test_log_formats_carry_the_same_fields(tmp_path: Path, spawn: Spawner, form: str) -> None:
    app = app_entries(tmp_path / "app.yaml", {"kind": "queue.driver.memory"})
    messages = write_jsonl(tmp_path / "in.jsonl", INPUTS[6:7])
    process = spawn("--log-format", form, "run", app, "--input", messages, "--until-idle")
    assert process.wait(30) == 0, process.stderr
    started = next(line for line in process.stderr.splitlines() if "worker started" in line)
    failed = next(line for line in process.stderr.splitlines() if "handler failed" in line)
    if form == "json":
        assert started.startswith("{")
        assert '"consumers": {"app:worker": "app:jobs, concurrency 3, prefetch 10"' in started
        assert '"attempt": 1' in failed
    else:
        assert " INFO    luaq.worker: worker started  consumers=" in started
        assert '"app:worker": "app:jobs, concurrency 3, prefetch 10"' in started
        assert "metrics=null" in started
        assert " attempt=1 " in failed
        assert 'error="not yet"' in failed


@pytest.mark.parametrize("form", ["text", "json"])
def test_a_handler_cannot_forge_log_lines_or_drive_the_terminal(
    tmp_path: Path, spawn: Spawner, form: str
) -> None:
    """One event is one line, and what a handler logs reaches a terminal as text to read:
    line breaks and terminal controls (ESC, the 8-bit CSI, DEL, Unicode line separators and
    bidirectional overrides) are escaped."""
    app = write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.memory"},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": """
         function handle(p)
           logger.info("a\\nb\\r12:00:00.000 ERROR forged\\27[2J", {
             k = "\\27[31m", sp = "x \\n y", c1 = "\\194\\155", sep = "\\226\\128\\168\\127",
             bidi = "\\226\\128\\174"})
         end
         """},
    ])  # fmt: skip
    messages = write_jsonl(tmp_path / "in.jsonl", [{"queue": "app:jobs", "data": {}}])
    process = spawn("--log-format", form, "run", app, "--input", messages, "--until-idle")
    assert process.wait(30) == 0, process.stderr
    assert not any(char in process.stderr for char in "\r\x1b\x7f\x9b\u2028\u202e")
    lines = process.stderr.split("\n")  # (what a collector splits on; Python splits on more)
    (line,) = [line for line in lines if "forged" in line]
    if form == "json":
        logged = json.loads(line)
        assert logged["msg"] == "a\nb\r12:00:00.000 ERROR forged\x1b[2J"
        assert logged["fields"]["sep"] == "\u2028\x7f"
        return
    assert " luaq.lua: a\\nb\\r12:00:00.000 ERROR forged\\x1b[2J  " in line
    escaped = {"k": "\\u001b[31m", "sp": "x \\n y", "c1": "\\u009b", "sep": "\\u2028\\u007f",
               "bidi": "\\u202e"}  # fmt: skip
    assert all(f'"{key}": "{value}"' in line for key, value in escaped.items()), line


def test_log_lines_go_where_stderr_points_now(monkeypatch: pytest.MonkeyPatch) -> None:
    """Something may swap sys.stderr after luaq set up its logs (a test's capture, as the
    operator's tests do around `luaq manifests`, or an application embedding luaq), and close
    the old one: lines logged then (by kopf's thread, say) still go out."""
    before, after = io.StringIO(), io.StringIO()
    monkeypatch.setattr(sys, "stderr", before)
    logs.configure("info", "json")
    before.close()
    monkeypatch.setattr(sys, "stderr", after)

    logging.getLogger("luaq.test").info("still heard")

    assert json.loads(after.getvalue())["msg"] == "still heard"


def test_a_line_that_cannot_be_written_is_said_in_the_same_format(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    logs.configure("info", "json", service=True)

    logging.getLogger("luaq.test").error("%d messages", "not a number")

    (line,) = json_lines(capsys.readouterr().err)  # not logging's "--- Logging error ---"
    assert (line["level"], line["logger"]) == ("error", "luaq")
    assert line["msg"].startswith("a line of luaq.test could not be written: TypeError("), line


def stopping_runs(tmp_path: Path, busy: socket.socket) -> dict[str, tuple[list[Any], str]]:
    """`luaq run`s that stop, or never start, and the last thing each says."""
    memory = app_entries(tmp_path / "memory.yaml", {"kind": "queue.driver.memory"})
    closed_port = free_port()
    unreachable = write_app(tmp_path / "amqp.yaml", [
        {"name": "broker", "kind": "queue.driver.amqp", "connection_timeout": "2s",
         "url": f"amqp://guest:guest@127.0.0.1:{closed_port}/"},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker", "queue_name": "never"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": "function handle() end"},
    ])  # fmt: skip
    broken = write_app(tmp_path / "broken.yaml", [{"name": "broker", "kind": "queue.driver.x"}])
    return {
        "unreachable broker": (
            [unreachable],
            f"UNAVAILABLE: cannot connect to amqp://guest:***@127.0.0.1:{closed_port}/",
        ),
        "entries problem": ([broken], "1 problem(s), nothing was started"),
        "busy metrics port": ([memory, "--metrics-port", busy.getsockname()[1]], "--metrics-port"),
        "memory across processes": ([memory, "--processes", 2], "--processes: driver app:broker"),
    }


@pytest.mark.parametrize(
    "case",
    ["unreachable broker", "entries problem", "busy metrics port", "memory across processes"],
)
def test_json_logs_are_json_to_the_last_line(tmp_path: Path, spawn: Spawner, case: str) -> None:
    """A log pipeline reading JSON keeps the line that says why a pod is crash-looping."""
    with socket.create_server(("127.0.0.1", 0)) as busy:
        args, last_words = stopping_runs(tmp_path, busy)[case]
        process = spawn("--log-format", "json", "run", *args, "--until-idle")
        assert process.wait(30) != 0, process.stderr
    said = reported(process.stderr)  # (fails on a line that is not JSON)
    assert said, process.stderr
    assert said[-1].startswith(last_words), process.stderr


def test_uncaught_exceptions_of_a_service_are_log_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    monkeypatch.setattr(sys, "stderr", sys.stderr)
    logs.configure("info", "json", service=True)

    def fail() -> None:
        raise RuntimeError("in a thread")

    thread = threading.Thread(target=fail, name="helper")
    thread.start()
    thread.join()
    try:
        raise ValueError("in the main thread")
    except ValueError:
        sys.excepthook(*sys.exc_info())  # what the interpreter calls as it dies of it
    warnings.warn("deprecated", DeprecationWarning, stacklevel=1)

    lines = json_lines(capsys.readouterr().err)
    assert [(line["level"], line["logger"], line["msg"]) for line in lines[:2]] == [
        ("critical", "luaq", "uncaught exception in thread helper"),
        ("critical", "luaq", "uncaught exception"),
    ]
    assert "RuntimeError: in a thread" in lines[0]["exception"]
    assert "ValueError: in the main thread" in lines[1]["exception"]
    assert (lines[2]["logger"], lines[2]["level"]) == ("py.warnings", "warning")
    assert "deprecated" in lines[2]["msg"]
