"""The runtime under real-world faults, on the real RabbitMQ: handlers that hog the CPU, every
header type another client sends, headers over the broker's frame size, a connection lost with
deliveries still buffered, a broker blocking publishers under a memory alarm, connections lost
in the middle of a call, and messages that fail forever. Each AMQP test has a vhost of its own.
"""

from __future__ import annotations

import asyncio
import datetime
import gzip
import itertools
import json
import logging
import math
import signal
import time
from collections.abc import Awaitable, Callable
from decimal import Decimal
from pathlib import Path
from typing import Any

import aio_pika
import msgpack
import pamqp.decode
import pamqp.encode
import pytest
from broker import (
    consumer_entry,
    driver_entry,
    queue_entry,
    queue_totals,
    rabbitmqctl,
    vhost_url,
)
from conftest import AppFactory, eventually
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.drivers import Delivery
from luaq.runtime.drivers.amqp import AmqpDriver
from luaq.runtime.errors import ErrorKind, QueueError
from luaq.runtime.logs import LogBudget
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker
from processes import Process, Spawner, summary, wait_until, write_app, write_jsonl
from rabbit_node import RabbitNode, memory_alarm
from test_faults import depth, drain, fill


def amqp_app(path: Path, url: str, source: str, *queues: dict[str, Any], **consumer: Any) -> Path:
    """An entries file: the broker, queues `jobs`, `out` and `dlq` (plus `queues`, which may
    override them by name), one consumer on `jobs` running `source`'s `handle`; `broker`
    adds fields to the driver, `extra` more entries."""
    broker = {"name": "broker", "kind": "queue.driver.amqp", "url": url,
              "reconnect_delay": "100ms", "connection_timeout": "10s",
              **consumer.pop("broker", {})}  # fmt: skip
    extra = consumer.pop("extra", [])
    declared = {name: {"name": name, "kind": "queue.queue", "driver": "broker"}
                for name in ("jobs", "out", "dlq")}  # fmt: skip
    for queue in queues:
        name = queue["name"]
        declared[name] = declared.get(name, {"kind": "queue.queue", "driver": "broker"}) | queue
    worker = {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
              "source": source, "modules": ["queue", "logger", "json", "time"],
              **consumer}  # fmt: skip
    return write_app(path, [broker, *extra, *declared.values(), worker])


def logged(process: Process, message: str) -> list[dict[str, Any]]:
    return [line for line in process.logs() if line.get("msg") == message]


def seconds_between(lines: list[dict[str, Any]]) -> list[float]:
    stamps = [datetime.datetime.fromisoformat(line["ts"]) for line in lines]
    return [(later - earlier).total_seconds() for earlier, later in itertools.pairwise(stamps)]


# -- 1. handlers that hog the CPU ---------------------------------------------------------------

CPU_BOUND = """
function handle(p)
  logger:info("started", {n = p.n})
  local t = os.clock()
  while os.clock() - t < 2.5 do end
end
"""


def test_cpu_bound_handlers_keep_the_connection_and_ack_promptly(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """Handlers that compute for 2.5 s without waiting, heartbeat 1 s (RabbitMQ gives up on a
    connection silent for two heartbeats): each message runs once, each ack reaches the broker
    before the next handler starts, and the connection is never lost."""
    url = vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 3))
    app = amqp_app(tmp_path / "app.yaml", url, CPU_BOUND, broker={"heartbeat": "1s"},
                   concurrency=1, prefetch=3)  # fmt: skip
    process = spawn("run", app, "--until-idle", "--max-instructions", str(10**11))

    wait_until(lambda: len(logged(process, "started")) >= 3, 30, "the third handler")
    # the third handler computes now; the first two were acked before it began
    assert queue_totals(vhost)["jobs"] == (0, 1), process.stderr
    assert process.wait(60) == 0, process.stderr

    assert sorted(line["fields"]["n"] for line in logged(process, "started")) == [0, 1, 2]
    assert not logged(process, "connection lost, reconnecting"), process.stderr
    assert queue_totals(vhost)["jobs"] == (0, 0)
    worker = summary(process.stdout)["app:worker"]
    assert (worker["processed"], worker["acked"], worker["stale"]) == (3, 3, 0)


# -- 2 and 6. every header type another client sends ------------------------------------------

HEADERS = {
    "amount": Decimal("12.50"),
    "negative": Decimal("-3.1"),
    "when": datetime.datetime(2026, 11, 29, 12, 0, tzinfo=datetime.UTC),
    "nested": {"inner": [1, "two", {"b": True}], "deep": {"x": 1.5}},
    "raw": bytearray(b"\x00\xffbytes"),  # a byte array (pamqp writes bytes only so)
    "void": None,
    "count": 7,
    "big": 2**40,
    "flag": False,
    "ratio": 0.25,
    "text": "hé",
}

DESCRIBE_HEADERS = """
function handle(p)
  local msg = queue.message()
  local h = msg:headers()
  local death = h["x-death"] and h["x-death"][1]
  local raw = h.raw
  h.raw = nil -- bytes, not text: json.encode refuses them
  local text, err = json.encode(h)
  assert(queue.publish("app:out", {
    json = text, err = err and err:message(), raw_length = #raw,
    amount = math.type(h.amount), count = math.type(h.count), when = math.type(h.when),
    inner = h.nested.inner[3].b, void = h.void == nil,
    death = death and {count = math.type(death.count), time = math.type(death.time),
                       reason = death.reason},
  }))
  return nil, "fails every time"
end
"""


def test_every_header_type_round_trips_and_reaches_lua_as_plain_values(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """aio-pika publishes every AMQP table type; the handler fails each time: three attempts
    (retried through a delay queue, which adds RabbitMQ's x-death), then the dead-letter
    queue, where the headers are what was sent."""
    url = vhost_url(vhost)
    app = amqp_app(
        tmp_path / "app.yaml", url, DESCRIBE_HEADERS,
        {"name": "jobs", "dead_letter": {"queue": "dlq", "max_attempts": 3},
         "retry": {"delay": "50ms"}},
    )  # fmt: skip
    message = aio_pika.Message(
        b'{"n": 1}', content_type="application/json", message_id="typed", headers=HEADERS
    )
    process = run_on_what_aio_pika_sent(spawn, app, url, [message])

    seen = asyncio.run(take_json(url, "out"))
    assert len(seen) == 3, "three attempts, then the dead-letter queue"
    first, *later = seen
    assert first.get("err") is None, first
    assert json.loads(first["json"]) == {
        "amount": 12.5, "negative": -3.1, "when": int(HEADERS["when"].timestamp()),  # type: ignore[attr-defined]
        "nested": {"inner": [1, "two", {"b": True}], "deep": {"x": 1.5}},
        "count": 7, "big": 2**40, "flag": False, "ratio": 0.25, "text": "hé",
        "priority": 0,  # aio-pika sets the property, and luaq shows it as a header
    }  # fmt: skip
    assert (first["amount"], first["count"], first["when"]) == ("float", "integer", "integer")
    assert (first["inner"], first["void"], first["raw_length"]) == (True, True, 7)
    for attempt in later:  # back from the delay queue, with RabbitMQ's nested x-death table
        assert attempt.get("err") is None, attempt
        assert attempt["death"] == {"count": "integer", "time": "integer", "reason": "expired"}

    dead = asyncio.run(take_raw(url, "dlq"))
    assert len(dead) == 1
    headers = dead[0].headers
    # exactly what aio-pika makes of its own headers (its decoder reads a decimal's mantissa
    # as unsigned, so -3.1 comes back from it as 429496726.5 either way)
    expected = pamqp.decode.field_table(pamqp.encode.field_table(HEADERS))[1]
    assert {key: headers[key] for key in HEADERS} == expected
    assert headers["x_attempts"] == 3
    assert headers["x_dead_letter_reason"] == "max_attempts"
    assert len(logged(process, "handler failed")) == 2
    assert len(logged(process, "attempts exhausted, dead-lettered")) == 1


def test_bodies_are_read_by_the_content_type_other_clients_give(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """Other clients add parameters to a content type, write it in capitals, use another name
    for msgpack, send none (the queue's codec then), or compress the body: each is read, or
    dead-lettered at once with a reason that says what luaq cannot read."""
    url = vhost_url(vhost)
    bodies = [
        (b'{"n": 1}', None, None),
        (b'{"n": 2}', "application/json; charset=utf-8", "utf-8"),  # kombu, Spring AMQP
        (b'{"n": 3}', "Application/JSON", None),
        (msgpack.packb({"n": 4}), "application/x-msgpack", "binary"),  # kombu's msgpack
        (gzip.compress(b'{"n": 5}'), "application/json", "gzip"),
        (b"<p>6</p>", "text/html", None),
    ]

    app = amqp_app(
        tmp_path / "app.yaml", url, 'function handle(p) assert(queue.publish("app:out", p)) end',
        {"name": "jobs", "dead_letter": {"queue": "dlq", "max_attempts": 3}},
    )  # fmt: skip
    messages = [
        aio_pika.Message(body, content_type=content_type, content_encoding=encoding)
        for body, content_type, encoding in bodies
    ]
    run_on_what_aio_pika_sent(spawn, app, url, messages)
    assert sorted(report["n"] for report in asyncio.run(take_json(url, "out"))) == [1, 2, 3, 4]
    dead = asyncio.run(take_raw(url, "dlq"))
    assert [message.headers["x_dead_letter_reason"] for message in dead] == ["poison"] * 2
    assert [message.headers["x_attempts"] for message in dead] == [1, 1], "at once"
    errors = [str(message.headers["x_last_error"]) for message in dead]
    assert "content encoding 'gzip'" in errors[0], errors
    assert "unknown content type 'text/html'" in errors[1], errors
    assert dead[0].body == bodies[4][0], "dead-lettered as it came"


def test_values_lua_has_no_value_for_neither_crash_nor_fail_the_worker(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """What msgpack and JSON can carry beyond Lua's values, from another client: a NaN map key
    aborted the whole process (Lua cannot index a table with it), a big integer failed every
    attempt with an internal error, data too deep for Lua failed every attempt. Now numbers
    arrive as floats, and what has no Lua value at all is poison."""
    url = vhost_url(vhost)
    bodies = [
        (b'{"n": 1, "big": 18446744073709551616}', "application/json"),
        (msgpack.packb({"n": 2, math.nan: 1}), "application/msgpack"),
        (msgpack.packb({"n": 3, "t": msgpack.Timestamp(1_700_000_000, 0)}), "application/msgpack"),
        (msgpack.packb({"n": 4, "e": msgpack.ExtType(1, b"")}), "application/msgpack"),
        (b'{"n": 5, "deep": ' + b"[" * 500 + b"]" * 500 + b"}", "application/json"),
    ]
    app = amqp_app(
        tmp_path / "app.yaml", url, 'function handle(p) assert(queue.publish("app:out", p)) end',
        {"name": "jobs", "dead_letter": {"queue": "dlq", "max_attempts": 3}},
    )  # fmt: skip
    messages = [aio_pika.Message(body, content_type=content_type) for body, content_type in bodies]
    run_on_what_aio_pika_sent(spawn, app, url, messages)
    assert sorted(asyncio.run(take_json(url, "out")), key=lambda report: report["n"]) == [
        {"n": 1, "big": 2.0**64},
        {"n": 3, "t": 1_700_000_000.0},
    ]
    dead = asyncio.run(take_raw(url, "dlq"))
    assert [message.headers["x_dead_letter_reason"] for message in dead] == ["poison"] * 3
    assert [message.headers["x_attempts"] for message in dead] == [1] * 3, "at once"
    errors = [str(message.headers["x_last_error"]) for message in dead]
    assert "map key nan" in errors[0], errors
    assert "extension type 1" in errors[1], errors
    assert "nested deeper than 100 levels" in errors[2], errors


def run_on_what_aio_pika_sent(
    spawn: Spawner, app: Path, url: str, messages: list[aio_pika.Message]
) -> Process:
    """The app's queues declared by a first run, `messages` sent to `jobs` by another client
    (aio-pika), then a run until idle, which must succeed."""
    declare = spawn("run", app, "--until-idle")
    assert declare.wait(30) == 0, declare.stderr

    async def publish() -> None:
        async with await aio_pika.connect(url) as connection:
            channel = await connection.channel()
            for message in messages:
                await channel.default_exchange.publish(message, routing_key="jobs")

    asyncio.run(publish())
    process = spawn("run", app, "--until-idle")
    assert process.wait(30) == 0, process.stderr
    return process


async def take_raw(url: str, queue: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    connection = await aio_pika.connect(url)
    async with connection:
        source = await (await connection.channel()).get_queue(queue)
        got = []
        while (message := await source.get(no_ack=True, fail=False)) is not None:
            got.append(message)
        return got


async def take_json(url: str, queue: str) -> list[Any]:
    return [json.loads(message.body) for message in await take_raw(url, queue)]


# -- 3. headers over the broker's frame size -------------------------------------------------------

BIG_HEADER = """
function handle(p)
  local ok, err = queue.publish("app:out", {n = p.n}, {big = string.rep("x", 200000)})
  assert(queue.publish("app:out", {n = p.n, kind = err and err:kind(),
                                   message = err and err:message()}))
end
"""


def test_a_header_too_big_for_a_frame_is_invalid_and_the_connection_lives(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    url = vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 3))
    app = amqp_app(tmp_path / "app.yaml", url, BIG_HEADER)

    process = spawn("run", app, "--until-idle")
    assert process.wait(30) == 0, process.stderr

    reports = asyncio.run(take_json(url, "out"))
    assert sorted(report["n"] for report in reports) == [0, 1, 2], "each handled once"
    for report in reports:
        assert report["kind"] == "INVALID"
        assert "over the 131,064 bytes one frame can carry" in report["message"], report
    assert not logged(process, "connection lost, reconnecting"), process.stderr

    # two headers of 100 KB: one argument may not be longer than 128 KB
    half = "y" * 100_000
    cli = spawn("publish", "--entries", app, "app:out", "{}", "-H", f"a={half}", "-H", f"b={half}")
    assert cli.wait(30) == 1
    assert "INVALID" in cli.stderr, cli.stderr
    assert "one frame can carry" in cli.stderr, cli.stderr


def test_a_huge_error_is_shortened_in_the_dead_letter(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    url = vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 1))
    app = amqp_app(
        tmp_path / "app.yaml", url, 'function handle(p) error(string.rep("e", 150000)) end',
        {"name": "jobs", "dead_letter": {"queue": "dlq", "max_attempts": 1}},
    )  # fmt: skip
    process = spawn("run", app, "--until-idle")
    assert process.wait(30) == 0, process.stderr

    dead = asyncio.run(take_raw(url, "dlq"))
    assert len(dead) == 1, "dead-lettered once, not duplicated"
    error = dead[0].headers["x_last_error"]
    assert isinstance(error, str)
    assert len(error) < 2100
    assert error.endswith("more characters)")
    assert not logged(process, "connection lost, reconnecting"), process.stderr
    assert summary(process.stdout)["app:worker"]["dead_lettered"] == 1


def test_the_longest_queue_name_luaq_check_allows_works_with_its_delay_queue(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """255 bytes is AMQP's limit for a queue name; luaq's delay queues add to it, which
    `luaq check` allows for (tests/runtime/test_entries.py): the longest name it accepts retries."""
    url = vhost_url(vhost)
    longest = "q" * entries.AMQP_QUEUE_NAME_BYTES
    app = amqp_app(
        tmp_path / "app.yaml", url, 'function handle(p) error("fails") end',
        {"name": "jobs", "queue_name": longest, "retry": {"delay": "50ms"},
         "dead_letter": {"queue": "dlq", "max_attempts": 2}},
    )  # fmt: skip
    asyncio.run(fill(url, longest, 1))
    process = spawn("run", app, "--until-idle")
    assert process.wait(30) == 0, process.stderr
    [dead] = asyncio.run(take_raw(url, "dlq"))
    assert dead.headers["x_attempts"] == 2
    assert any(name.startswith(f"{longest}.delay.") for name in queue_totals(vhost))


# -- 4. deliveries buffered when their channel dies ----------------------------------------------

# slow enough that the ~49 buffered are still there when rabbitmqctl (an Erlang VM that boots,
# 1.5-3 s on a busy machine) has closed the connections: at 20 ms the handler could nearly finish
FORWARD_SLOWLY = """
function handle(p)
  time.sleep(0.1)
  return queue.publish("app:out", {n = p.n})
end
"""


def test_deliveries_buffered_from_a_lost_channel_are_not_run(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """100 messages, concurrency 1, prefetch 50, the connections closed early on: the ~49
    deliveries waiting in the buffer belong to a dead channel. The broker delivers them again
    on the new one, so running the old copies would only duplicate them, and their acks could
    not reach the broker anyway."""
    url = vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 100))
    app = amqp_app(tmp_path / "app.yaml", url, FORWARD_SLOWLY, concurrency=1, prefetch=50)
    process = spawn("run", app)
    outputs = Outputs(url)

    wait_until(lambda: queue_depth_sync(url, "out") >= 10, 30, "10 outputs")
    rabbitmqctl("close_all_connections", "--vhost", vhost, "test: connection lost")
    wait_until(lambda: queue_depth_sync(url, "jobs") == 0 and len(set(outputs())) == 100,
               60, "every input handled")  # fmt: skip
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.stderr

    worker = summary(process.stdout)["app:worker"]
    assert worker["processed"] <= 103, worker
    assert worker["stale"] >= 25, worker  # the buffered ones (up to 49), skipped
    assert 100 <= worker["acked"] <= 102, worker
    assert logged(process, "connection restored")


class Outputs:
    """Everything that reached `out` so far: taken off the queue, and kept."""

    def __init__(self, url: str) -> None:
        self.url = url
        self.seen: list[int] = []

    def __call__(self) -> list[int]:
        self.seen.extend(asyncio.run(drain(self.url, "out")))
        return self.seen


def queue_depth_sync(url: str, queue: str) -> int:
    """Ready messages; -1 while the queue is not declared yet."""
    return depth(url, queue)[0]


# -- 5. a broker that blocks publishers ---------------------------------------------------------


PUBLISH_ODD = """
function handle(p)
  if p.n % 2 == 1 then
    return queue.publish("app:out", {n = p.n})
  end
end
"""


def test_under_a_memory_alarm_acks_flow_publishes_fail_cleanly_and_nothing_is_lost(
    tmp_path: Path, own_node_vhost: tuple[RabbitNode, str], spawn: Spawner
) -> None:
    """Odd inputs publish, even ones do not. While the broker blocks publishers, the even ones
    are acked (acks travel on the consuming connection, which the alarm does not block), the
    odd ones fail with a retryable error that says why and come back after their backoff, and
    `luaq publish` gives up with the same message. Once the alarm clears, every odd input
    reaches `out`."""
    node, vhost = own_node_vhost
    url = node.vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 40))
    app = amqp_app(
        tmp_path / "app.yaml", url, PUBLISH_ODD,
        {"name": "jobs", "retry": {"delay": "300ms", "max_delay": "300ms"}},
        broker={"publish_timeout": "1s"}, concurrency=20, prefetch=40,
    )  # fmt: skip
    with memory_alarm(node):
        process = spawn("run", app)
        wait_until(lambda: sum(queue_totals(vhost, node.ctl)["jobs"]) == 20, 30,
                   "the even inputs acked")  # fmt: skip
        wait_until(lambda: logged(process, "handler failed"), 30, "odd inputs failing")
        failures = logged(process, "handler failed")
        assert {line["kind"] for line in failures} == {"UNAVAILABLE"}, failures
        assert all("blocking publishers" in line["error"] for line in failures), failures

        started = time.monotonic()
        cli = spawn("publish", "--entries", app, "app:out", '{"n": -1}')
        assert cli.wait(30) == 1, cli.stderr
        assert time.monotonic() - started < 10
        assert "UNAVAILABLE" in cli.stderr, cli.stderr
        assert "blocking publishers" in cli.stderr, cli.stderr

    outputs = Outputs(url)
    wait_until(lambda: set(range(1, 40, 2)) <= set(outputs()), 60, "every odd input in out")
    wait_until(lambda: sum(queue_totals(vhost, node.ctl)["jobs"]) == 0, 30, "jobs empty")
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.stderr


def test_shutdown_keeps_its_timeout_while_the_broker_blocks(
    tmp_path: Path, own_node_vhost: tuple[RabbitNode, str], spawn: Spawner
) -> None:
    node, vhost = own_node_vhost
    url = node.vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 5))
    app = amqp_app(
        tmp_path / "app.yaml", url, 'function handle(p) return queue.publish("app:out", p) end',
        broker={"publish_timeout": "60s"}, concurrency=5,
    )  # fmt: skip
    with memory_alarm(node):
        process = spawn("run", app, "--shutdown-timeout", "2")
        wait_until(lambda: logged(process, "the broker blocks publishes: low on memory"), 30,
                   "the broker blocking the worker's publishes")  # fmt: skip
        process.popen.send_signal(signal.SIGTERM)
        sent = time.monotonic()
        assert process.wait(30) == 0, process.stderr
        elapsed = time.monotonic() - sent
        assert elapsed < 6, f"--shutdown-timeout 2, but exiting took {elapsed:.1f}s"
    # nothing lost: the cut handlers' messages are back (the broker may also have taken the
    # one publish written before it said it blocks: at-least-once)
    wait_until(lambda: queue_totals(vhost, node.ctl)["jobs"] == (5, 0), 30,
               "the inputs back in jobs")  # fmt: skip


# -- 7. connections lost in the middle of a call --------------------------------------------------


def drop(driver: AmqpDriver) -> None:
    """Both connections of the driver are lost, now: every call in flight fails, and a call
    made before the driver's recovery has had a turn meets a closed connection."""
    for link in (driver.consuming, driver.publishing):
        connection = link.connection
        assert connection is not None
        assert connection._transport is not None
        connection._transport.abort()
        connection.connection_lost(ConnectionResetError("dropped by the test"))


async def test_driver_calls_ride_out_a_lost_connection(vhost: str) -> None:
    """Declarations, queue info, publishes and consumes, started just before or just after
    the connections drop: they finish on the recovered connections, or (a publish, which may
    or may not have reached the broker) fail with a retryable QueueError; nothing else."""
    driver = AmqpDriver(driver_entry(url=vhost_url(vhost), reconnect_delay="100ms"))
    await driver.start()
    try:
        jobs = queue_entry("jobs")
        await driver.declare(jobs)
        got: list[str] = []
        calls: list[tuple[Callable[[], Awaitable[Any]], bool]] = [  # the call, may it fail
            (lambda: driver.declare(queue_entry("other")), False),
            (lambda: driver.info(jobs), False),
            (lambda: driver.publish(jobs, b"{}", {}, "application/json"), True),
            (lambda: driver.consume(jobs, consumer_entry(jobs), lambda d: got.append(d.id)), False),
        ]
        for call, may_fail in calls:
            for in_flight in (True, False):
                if in_flight:
                    pending = asyncio.ensure_future(call())
                    await asyncio.sleep(0)  # now waiting for the broker's reply
                    drop(driver)
                else:
                    drop(driver)
                    pending = asyncio.ensure_future(call())
                try:
                    await asyncio.wait_for(pending, 15)
                except QueueError as exc:
                    failed = exc
                else:
                    continue
                assert may_fail, failed
                assert failed.kind is ErrorKind.UNAVAILABLE, failed
                assert failed.retryable, failed
        await driver.publish(jobs, b"{}", {"message_id": "after"}, "application/json")
        await eventually(lambda: "after" in got, 10)
    finally:
        await driver.close()


def worker_app(tmp_path: Path, url: str, source: str, **jobs: Any) -> Worker:
    path = amqp_app(
        tmp_path / "app.yaml", url, source, {"name": "jobs", **jobs},
        {"name": "trigger", "driver": "local"},
        extra=[{"name": "local", "kind": "queue.driver.memory"}],
    )  # fmt: skip
    return build(load(entries.load([path]), Settings(shutdown_timeout=2.0)))


async def test_idleness_is_not_mistaken_while_the_connection_drops(
    tmp_path: Path, vhost: str
) -> None:
    """`--until-idle` asks the broker whether the queues are empty: a drop as it asks is
    neither an empty queue nor a crash."""
    worker = worker_app(tmp_path, vhost_url(vhost), "function handle(p) end")
    await worker.connect()
    try:
        await worker.host.publish("app", "jobs", {"n": 1}, {})
        drop(worker.drivers["app:broker"])  # type: ignore[arg-type]
        assert await asyncio.wait_for(worker.idle(), 15) is False
    finally:
        await worker.stop(1.0)


async def test_a_drop_during_start_up_is_ridden_out(tmp_path: Path, vhost: str) -> None:
    worker = worker_app(tmp_path, vhost_url(vhost), "function handle(p) end")
    await worker.connect()
    try:
        drop(worker.drivers["app:broker"])  # type: ignore[arg-type]
        for consumer in worker.consumers:  # what Worker.start does once connected
            await asyncio.wait_for(consumer.start(), 15)
        await worker.host.publish("app", "jobs", {"n": 1}, {})
        await eventually(lambda: worker.consumers[0].stats.acked == 1, 10)
    finally:
        await worker.stop(1.0)


async def test_a_drop_while_dead_lettering_is_retried_not_a_crash(
    tmp_path: Path, vhost: str, caplog: pytest.LogCaptureFixture
) -> None:
    """The handler's publish to `trigger` (an in-process queue) drops the broker connections,
    then the handler fails: the dead-letter publish meets the lost connection at once."""
    caplog.set_level(logging.WARNING)
    worker = worker_app(
        tmp_path, vhost_url(vhost),
        'function handle(p) queue.publish("app:trigger", 1) error("no") end',
        dead_letter={"queue": "dlq", "max_attempts": 1},
    )  # fmt: skip
    drops: list[Delivery] = []

    def drop_once(delivery: Delivery) -> None:
        if not drops:
            drop(worker.drivers["app:broker"])  # type: ignore[arg-type]
        drops.append(delivery)

    await fill(vhost_url(vhost), "jobs", 1)
    await worker.connect()
    trigger = worker.host.queue("app", "trigger")
    await worker.drivers["app:local"].consume(trigger, consumer_entry(trigger), drop_once)
    try:
        for consumer in worker.consumers:
            await consumer.start()
        await eventually(lambda: worker.consumers[0].stats.dead_lettered >= 1, 15)
        assert (await worker.host.info("app", "dlq"))[0] >= 1
        assert "handling failed" not in caplog.text  # luaq's own-bug path: never taken
    finally:
        await worker.stop(1.0)


# -- 8. luaq publish ------------------------------------------------------------------------------


def test_luaq_publish_says_nothing_about_handlers(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    app = amqp_app(tmp_path / "app.yaml", vhost_url(vhost), "function handle(p) end")
    process = spawn("publish", "--entries", app, "app:jobs", '{"n": 1}')
    assert process.wait(30) == 0, process.stderr
    assert "shutdown timeout" not in process.stderr
    assert process.stdout.strip()


# -- a failing message never spins -----------------------------------------------------------------

ALWAYS_FAILS = 'function handle(p) error("broken for good") end'


def jobs_app(
    tmp_path: Path, driver: str, source: str, request: pytest.FixtureRequest
) -> tuple[Path, str]:
    """One consumer on `jobs` running `source`, on the memory driver or on RabbitMQ (in a
    vhost of the test's own, returned; "" on memory)."""
    if driver == "amqp":
        vhost = request.getfixturevalue("vhost")
        return amqp_app(tmp_path / "app.yaml", vhost_url(vhost), source), vhost
    return write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.memory"},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": source},
    ]), ""  # fmt: skip


@pytest.mark.parametrize("driver", ["memory", "amqp"])
def test_without_retry_settings_a_failing_message_backs_off(
    tmp_path: Path, spawn: Spawner, driver: str, request: pytest.FixtureRequest
) -> None:
    """No `retry`, no `dead_letter`: the default backoff (1 s, doubling) spaces the attempts,
    and the message stays in the queue, never dropped."""
    app, vhost = jobs_app(tmp_path, driver, ALWAYS_FAILS, request)
    messages = write_jsonl(tmp_path / "in.jsonl", [{"queue": "app:jobs", "data": {"n": 1}}])
    process = spawn("run", app, "--input", messages)

    wait_until(lambda: len(logged(process, "handler failed")) >= 3, 30, "a third attempt")
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.stderr

    failures = logged(process, "handler failed")
    assert [line["attempt"] for line in failures[:3]] == [1, 2, 3]
    assert [line["then"] for line in failures[:3]] == ["retried in 1s", "retried in 2s",
                                                       "retried in 4s"]  # fmt: skip
    gaps = seconds_between(failures[:3])
    assert gaps[0] >= 0.9, gaps
    assert gaps[1] >= 1.9, gaps
    worker = summary(process.stdout)["app:worker"]
    assert worker["rejected"] == 0
    if driver == "amqp":  # still on the broker: in its queue or waiting in a delay queue
        # (counted by passive declares: rabbitmqctl's counts of a quorum queue lag by seconds)
        url = vhost_url(vhost)
        assert sum(queue_depth_sync(url, name) for name in queue_totals(vhost)) == 1


@pytest.mark.parametrize("driver", ["memory", "amqp"])
def test_until_idle_waits_for_messages_in_retry_delay(
    tmp_path: Path, spawn: Spawner, driver: str, request: pytest.FixtureRequest
) -> None:
    source = """
    local seen = {}
    function handle(p)
      if not seen[p.n] then seen[p.n] = true; return nil, "not yet" end
    end
    """
    app, vhost = jobs_app(tmp_path, driver, source, request)
    messages = write_jsonl(tmp_path / "in.jsonl", [{"queue": "app:jobs", "data": {"n": 1}}])
    started = time.monotonic()
    process = spawn("run", app, "--input", messages, "--until-idle")
    assert process.wait(30) == 0, process.stderr
    assert time.monotonic() - started >= 1.0, "the default backoff is 1 s"
    worker = summary(process.stdout)["app:worker"]
    assert (worker["processed"], worker["acked"], worker["retried"], worker["failed"]) == (
        2, 1, 1, 1,
    )  # fmt: skip
    if driver == "amqp":
        assert sum(sum(counts) for counts in queue_totals(vhost).values()) == 0


async def test_until_idle_believes_empty_queues_only_once_they_stay_empty(
    tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """On a broker, a message can be in no count for a moment: expired from a delay queue and
    on its way back, or on the wire to the consumer. An idleness seen once, then gone, is not
    the end: `wait_idle` returns once the queues have stayed empty for the driver's
    `idle_after` (a fake `idle` plays the broker's counts; the AMQP driver's value)."""
    app, _ = jobs_app(tmp_path, "memory", "function handle(p) end", request)
    worker = build(load(entries.load([app]), Settings()))
    worker.consumers[0].driver.idle_after = AmqpDriver.idle_after
    loop = asyncio.get_running_loop()
    counts = iter([0, 1, 1])  # empty, then the message in transit shows up again
    busy_until: list[float] = []

    async def idle() -> bool:
        count = next(counts, 0)
        if count:
            busy_until[:] = [loop.time()]
        return count == 0

    worker.idle = idle  # type: ignore[method-assign]
    async with asyncio.timeout(5):
        await worker.wait_idle(poll=0.01)
    assert busy_until, "it returned at the first empty count"
    assert loop.time() - busy_until[0] >= AmqpDriver.idle_after


def test_poison_without_dead_letter_is_kept(tmp_path: Path, vhost: str, spawn: Spawner) -> None:
    """A body that cannot be decoded, on a queue without `dead_letter`: never dropped."""
    url = vhost_url(vhost)
    app = amqp_app(tmp_path / "app.yaml", url, "function handle(p) end")
    declare = spawn("run", app, "--until-idle")
    assert declare.wait(30) == 0, declare.stderr
    asyncio.run(publish_raw(url, "jobs", b"{not json"))

    process = spawn("run", app)
    wait_until(lambda: logged_prefix(process, "message cannot be handled, retried"), 30,
               "the poison message seen")  # fmt: skip
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(30) == 0, process.stderr
    assert summary(process.stdout)["app:worker"]["rejected"] == 0
    # in jobs or waiting in a delay queue (a quorum queue: rabbitmqctl's count lags a few s)
    wait_until(lambda: sum(sum(counts) for counts in queue_totals(vhost).values()) == 1, 30,
               "the poison message kept")  # fmt: skip


async def test_poison_without_dead_letter_is_kept_in_memory(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    app = await apps.start("function handle(p) end", in_queue={"retry": None})
    queue = app.worker.host.queue("app", "in")
    await app.worker.drivers["app:broker"].publish(queue, b"{not json", {}, "application/json")
    await eventually(lambda: "message cannot be handled, retried in 1s" in caplog.text)
    assert await app.info("in") == (1, 1), "waiting for its next attempt, still counted"
    assert app.consumer.stats.rejected == 0


def logged_prefix(process: Process, prefix: str) -> bool:
    return any(str(line.get("msg")).startswith(prefix) for line in process.logs())


async def publish_raw(url: str, queue: str, body: bytes) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(body, content_type="application/json", message_id="poison")
        await channel.default_exchange.publish(message, routing_key=queue)


def test_a_failing_republish_never_turns_into_a_requeue_loop(
    tmp_path: Path, vhost: str, spawn: Spawner
) -> None:
    """The delay queue exists with other arguments, so every retry by republish fails: the
    message is held for its delay, then requeued, its attempts still counted, and after
    max_attempts dead-lettered."""
    url = vhost_url(vhost)
    asyncio.run(fill(url, "jobs", 1))
    asyncio.run(declare_conflicting(url, "jobs.delay.100ms"))
    app = amqp_app(
        tmp_path / "app.yaml", url, 'function handle(p) logger:info("ran") error("no") end',
        {"name": "jobs", "dead_letter": {"queue": "dlq", "max_attempts": 3},
         "retry": {"delay": "100ms", "max_delay": "100ms"}},
    )  # fmt: skip
    process = spawn("run", app, "--until-idle")
    assert process.wait(30) == 0, process.stderr

    runs = logged(process, "ran")
    assert len(runs) == 3, f"{len(runs)} runs"
    assert min(seconds_between(runs)) >= 0.09
    assert logged(process, "retry by republish failed")
    assert len(asyncio.run(take_raw(url, "dlq"))) == 1


async def declare_conflicting(url: str, name: str) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(name, durable=True, arguments={"x-message-ttl": 999})


async def test_per_message_lines_share_one_budget_per_consumer(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """4,000 messages failing twice each, with a refused publish at every attempt and a dead
    letter at the end: 16,000 lines to say, a few said, and the rest counted as suppressed."""
    caplog.set_level(logging.WARNING, logger="luaq")
    may_publish = {"actions": "queue.publish", "effect": "allow", "resources": "*"}
    may_out = {"actions": "queue.publish.queue", "effect": "allow", "resources": "app:out"}
    app = await apps.start(
        'function handle(p) pcall(queue.publish, "other", p) error("no") end',
        in_queue={"dead_letter": {"queue": "out", "max_attempts": 2}},
        max_length=5000,
        security={"policies": ["may_publish", "may_out"]},
        extra_entries=[
            {"name": "may_publish", "kind": "security.policy", "policy": may_publish},
            {"name": "may_out", "kind": "security.policy", "policy": may_out},
        ],
    )
    started = time.monotonic()
    for n in range(4000):
        await app.publish("in", n)
    await app.idle(60)
    await app.worker.stop(5)
    elapsed = time.monotonic() - started

    said = [r for r in caplog.records if getattr(r, "consumer", None) == "app:worker"]
    assert app.consumer.stats.failed == 8000
    assert app.consumer.stats.denied == 8000
    windows = elapsed // app.consumer.log_budget.interval + 1
    assert len(said) <= app.consumer.log_budget.burst * windows + 1, len(said)
    counted = len(said) - 1 + sum(getattr(r, "suppressed", 0) for r in said)
    assert counted == 16_000, "every line held back is counted"
    assert said[-1].getMessage() == "lines held back by the log budget"
    assert {r.getMessage() for r in said[:-1]} <= {
        "handler failed", "publish denied", "attempts exhausted, dead-lettered"
    }  # fmt: skip


async def test_a_message_the_dead_letter_queue_refused_comes_back_without_a_warning(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    """Given back with one attempt more than max_attempts allows, by luaq itself: that is no
    attempt count 'out of range' from another publisher, and it must not use up the budget
    the 'dead-lettering failed' lines need."""
    caplog.set_level(logging.WARNING, logger="luaq.consumer")
    app = await apps.start(
        'function handle(p) error("no") end',
        in_queue={"dead_letter": {"queue": "other", "max_attempts": 1}},
        max_length=1,
    )
    await app.publish("other", "fills the dead-letter queue")
    await app.publish("in", "fails")

    def refused() -> int:
        return sum("dead-lettering failed" in r.getMessage() for r in caplog.records)

    await eventually(lambda: refused() >= 3, timeout=10)
    assert not [r for r in caplog.records if r.getMessage() == "attempt count out of range"]


def test_a_log_budget_counts_what_it_holds_back() -> None:
    budget = LogBudget(burst=2, interval=0.2)
    assert [budget.take() for _ in range(5)] == [0, 0, None, None, None]
    deadline = time.monotonic() + 5
    while (taken := budget.take()) is None:
        assert time.monotonic() < deadline
    assert taken >= 3
    assert budget.take() == 0
