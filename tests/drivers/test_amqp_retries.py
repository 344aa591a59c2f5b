"""The way a retried or dead-lettered message goes on RabbitMQ: at-least-once, a message leaves
the broker's hands only once its next home confirmed it (docs/design.md, "Delivery guarantees").

A dead letter never expires; a retry waits in a quorum delay queue whose dead-lettering back
is at-least-once, so a full queue delays it rather than drops it; a backoff never overflows and
attempt counts from other publishers are clamped; info() and --until-idle count the delay
queues an earlier process left; and both copies keep the original's properties and header
wire types, as an independent client (aio-pika) published and reads them.

On the shared broker each test has a vhost of its own; the ones that need a user, a policy or
a setting of the broker's run on the suite's own node (own_node). Waiting is polling, never a
sleep.
"""

from __future__ import annotations

import datetime
import decimal
import logging
from collections.abc import AsyncIterator, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any
from urllib.parse import quote

import aio_pika
import aiormq
import pamqp.decode
import pytest
from broker import AMQP_URL
from conftest import eventually
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.entries import Retry
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker
from processes import write_app
from rabbit_node import RabbitNode


def app(
    tmp_path: Path, url: str, source: str, jobs: dict[str, Any], **consumer: Any
) -> entries.Config:
    broker = {"name": "broker", "kind": "queue.driver.amqp", "url": url,
              "connection_timeout": "10s"}  # fmt: skip
    (tmp_path / "handler.lua").write_text(source)
    path = write_app(tmp_path / "app.yaml", [
        broker,
        {"name": "jobs", "kind": "queue.queue", "driver": "broker", **jobs},
        {"name": "dlq", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": "file://handler.lua", "modules": ["logger"], **consumer},
    ])  # fmt: skip
    return entries.load([path])


@pytest.fixture
async def workers() -> AsyncIterator[list[Worker]]:
    running: list[Worker] = []
    yield running
    for worker in running:
        await worker.stop(1.0)


async def started(running: list[Worker], config: entries.Config) -> Worker:
    worker = build(load(config, Settings(shutdown_timeout=2.0)))
    await worker.start()
    running.append(worker)
    return worker


def field(caplog: pytest.LogCaptureFixture, name: str) -> list[Any]:
    """A field of every "ran" line the handler logged."""
    return [r.fields[name] for r in caplog.records if r.getMessage() == "ran"]  # type: ignore[attr-defined]


async def count(url: str, *names: str) -> int:
    """Ready messages in the queues that exist among `names`."""
    total = 0
    connection = await aiormq.connect(url)
    try:
        for name in names:
            channel = await connection.channel()
            try:
                total += (await channel.queue_declare(name, passive=True)).message_count or 0
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            await channel.close()
    finally:
        await connection.close()
    return total


# -- 4. backoff and attempt counts ---------------------------------------------------------------


def test_backoff_is_capped_before_it_is_computed() -> None:
    """`delay * multiplier ** (attempts - 1)` overflowed a float past ~1,024 attempts."""
    retry = Retry()
    assert retry.delay_after(1100) == 60.0
    assert retry.delay_after(10**12) == 60.0
    assert Retry(delay=0.001, max_delay=1e300, multiplier=100.0).delay_after(10**6) == 1e300
    assert [retry.delay_after(n) for n in (0, 1, 2, 3, 7, 8)] == [1, 1, 2, 4, 60, 60]
    assert retry.delays() == [1, 2, 4, 8, 16, 32, 60]
    assert Retry(delay=2.0, multiplier=1.0).delays() == [2.0]


ALWAYS_FAILS = 'function handle(p) logger:info("ran", {n = p.n}) error("no") end'


async def publish_raw(url: str, queue: str, body: bytes, **properties: Any) -> None:
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        message = aio_pika.Message(body, content_type="application/json", **properties)
        await channel.default_exchange.publish(message, routing_key=queue)


async def get_raw(url: str, *queues: str) -> list[aio_pika.abc.AbstractIncomingMessage]:
    """Every message in the first of `queues` that exists."""
    connection = await aio_pika.connect(url)
    async with connection:
        for queue in queues:
            try:
                source = await (await connection.channel()).get_queue(queue)
            except aiormq.exceptions.ChannelNotFoundEntity:
                continue
            got = []
            while (message := await source.get(no_ack=True, fail=False)) is not None:
                got.append(message)
            return got
    raise AssertionError(f"none of {queues} exists")


async def test_attempt_counts_from_other_publishers_are_clamped(
    tmp_path: Path, vhost: str, workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    """x-luaq-attempts 1100 wedged the consumer (OverflowError twice, never settled); -50 gave
    a message 52 attempts where max_attempts allows 3. Now: 1100 is taken as 3 (dead-lettered
    at its first failure), -50 as 1; "9", no integer, is not counted, and said so."""
    caplog.set_level(logging.INFO)
    url = f"{AMQP_URL}{quote(vhost, safe='')}"
    dead_letter = {"queue": "dlq", "max_attempts": 3}
    config = app(
        tmp_path, url, ALWAYS_FAILS, {"retry": {"delay": "10ms"}, "dead_letter": dead_letter}
    )
    worker = await started(workers, config)
    name = config.queues["app:jobs"].external_name
    await publish_raw(url, name, b'{"n": 1}', headers={"x-luaq-attempts": 1100})
    await publish_raw(url, name, b'{"n": 2}', headers={"x-luaq-attempts": -50})
    await publish_raw(url, name, b'{"n": 3}', headers={"x-luaq-attempts": "9"})

    stats = worker.consumers[0].stats
    await eventually(lambda: stats.dead_lettered == 3, timeout=10)
    dead = {m.headers["x_attempts"] for m in await get_raw(url, "dlq")}
    assert dead == {3}
    assert sorted(field(caplog, "n")) == [1, 2, 2, 2, 3, 3, 3]
    assert stats.unsettled == 0
    said = [r.getMessage() for r in caplog.records]
    assert "attempt count out of range" in said
    assert "x-luaq-attempts is no integer: not counted" in said


async def test_a_huge_attempt_count_without_dead_letter_is_retried_at_max_delay(
    tmp_path: Path, vhost: str, workers: list[Worker]
) -> None:
    """Without dead_letter nothing caps the attempts: the backoff must still be computable."""
    url = f"{AMQP_URL}{quote(vhost, safe='')}"
    source = """
local seen = {}
function handle(p)
  seen[p.n] = (seen[p.n] or 0) + 1
  return seen[p.n] > 1
end
"""
    config = app(tmp_path, url, source, {"retry": {"delay": "10ms", "max_delay": "50ms"}})
    worker = await started(workers, config)
    name = config.queues["app:jobs"].external_name
    await publish_raw(url, name, b'{"n": 1}', headers={"x-luaq-attempts": 1100})

    stats = worker.consumers[0].stats
    await eventually(lambda: stats.acked == 1, timeout=10)
    assert (stats.retried, stats.unsettled) == (1, 0)


# -- 2 and 9. what a retry and a dead letter carry -----------------------------------------------


@pytest.fixture
def wire_types(monkeypatch: pytest.MonkeyPatch) -> list[dict[str, str]]:
    """The field types of every table pamqp (so aio-pika) decodes, by key, in order: aio-pika
    gives only the values, and an int8 reads as the same int as an int64."""
    tables: list[dict[str, str]] = []
    decode = pamqp.decode.METHODS["table"]

    def recording(value: bytes) -> tuple[int, Any]:
        consumed, data = decode(value)
        types, offset = {}, 4
        while offset < consumed:
            key_end = offset + 1 + value[offset]
            key = value[offset + 1 : key_end].decode()
            types[key] = chr(value[key_end])
            offset = key_end + pamqp.decode.embedded_value(value[key_end:])[0]
        tables.append(types)
        return consumed, data

    monkeypatch.setitem(pamqp.decode.METHODS, "table", recording)
    return tables


HEADERS = {
    "int8": 5,  # pamqp picks the smallest type: b
    "int16": 1000,  # s
    "int32": 100_000,  # I
    "int64": 2**40,  # l
    "float32": 0.5,  # f
    "decimal": decimal.Decimal("1.25"),  # D
    "flag": True,  # t
    "text": "héllo",  # S
    "bytes": bytearray(b"\x00\xff"),  # x
    "list": [1, "two"],  # A
    "table": {"k": 7},  # F
    "stamp": datetime.datetime(2024, 5, 6, 7, 8, 9, tzinfo=datetime.UTC),  # T
    "priority": "high",  # luaq's own header names too, as another client set them
}
TYPES = {"int8": "b", "int16": "s", "int32": "I", "int64": "l", "float32": "f", "decimal": "D",
         "flag": "t", "text": "S", "bytes": "x", "list": "A", "table": "F", "stamp": "T",
         "priority": "S"}  # fmt: skip
PROPERTIES = {
    "content_encoding": "utf-8",
    "delivery_mode": aio_pika.DeliveryMode.PERSISTENT,
    "priority": 3,
    "correlation_id": "corr-1",
    "reply_to": "replies",
    "expiration": 60,  # seconds in aio-pika; "60000" on the wire
    "message_id": "m-1",
    "timestamp": datetime.datetime(2024, 1, 2, 3, 4, 5, tzinfo=datetime.UTC),
    "type": "job.created",
    "app_id": "billing",
}
SAME = ("content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
        "reply_to", "message_id", "timestamp", "type", "app_id")  # fmt: skip


@contextmanager
def user(node: RabbitNode, name: str) -> Iterator[None]:
    """A user of the node's, its password its name, for as long as the test needs it."""
    node.ctl("add_user", name, name)
    try:
        yield
    finally:
        node.ctl("delete_user", name)


async def test_retries_and_dead_letters_keep_properties_and_header_types(
    tmp_path: Path, wire_types: list[dict[str, str]], own_node_vhost: tuple[RabbitNode, str]
) -> None:
    """aio-pika publishes with every property and typed headers: the retried copy (read from
    its delay queue) and the dead letter (read from the DLQ) have them all, of the same wire
    types, but never an expiration (x_original_expiration), nor a user_id RabbitMQ would
    refuse from luaq's user (x_original_user_id); a user_id that is luaq's own stays. On the
    suite's own node: a user is added."""
    node, vhost = own_node_vhost
    guest_url = node.vhost_url(vhost)
    with user(node, "luaq"):
        node.ctl("set_permissions", "-p", vhost, "luaq", ".*", ".*", ".*")
        luaq_url = node.vhost_url(vhost, "luaq:luaq")
        config = app(tmp_path, luaq_url,
                     'function handle(p) error("no") end',
                     {"queue_name": "jobs", "retry": {"delay": "20s"},
                      "dead_letter": {"queue": "dlq", "max_attempts": 5}})  # fmt: skip
        worker = build(load(config, Settings(shutdown_timeout=2.0)))
        await worker.start()
        try:
            # a readable message fails, and waits 20 s in its delay queue: read it there
            await publish_raw(guest_url, "jobs", b"{}", headers=HEADERS, user_id="guest",
                              **PROPERTIES)  # fmt: skip
            # a gzip body cannot be read: dead-lettered at once
            gzip = {**PROPERTIES, "content_encoding": "gzip", "message_id": "m-2"}
            await publish_raw(
                luaq_url, "jobs", b"\x1f\x8b", headers=HEADERS, user_id="luaq", **gzip
            )
            stats = worker.consumers[0].stats
            await eventually(lambda: (stats.retried, stats.dead_lettered) == (1, 1), timeout=10)
        finally:
            await worker.stop(1.0)
        wire_types.clear()
        [retried] = await get_raw(guest_url, "jobs.delay.20000ms", "jobs.retry.20000ms")
        retried_types = wire_types[-1]
        wire_types.clear()
        [dead] = await get_raw(guest_url, "dlq")
        dead_types = wire_types[-1]

    for copy in (retried, dead):
        assert copy.expiration is None, "a copy never expires: not from a delay queue early"
        assert copy.headers["x_original_expiration"] == "60000"
        for name in HEADERS:
            assert copy.headers[name] == (
                HEADERS[name] if name != "bytes" else bytes(HEADERS["bytes"])
            ), name
    json = {"content_type": "application/json"}
    gzip = {**json, "content_encoding": "gzip", "message_id": "m-2"}
    for name in SAME:
        assert getattr(retried, name) == (PROPERTIES | json)[name], name
        assert getattr(dead, name) == (PROPERTIES | gzip)[name], name
    assert {k: retried_types[k] for k in TYPES} == TYPES
    assert {k: dead_types[k] for k in TYPES} == TYPES
    assert retried.user_id is None, "guest published it; RabbitMQ takes from luaq only luaq"
    assert retried.headers["x_original_user_id"] == "guest"
    assert retried.headers["x-luaq-attempts"] == 1
    assert dead.user_id == "luaq"
    assert "x_original_user_id" not in dead.headers
    assert dead.headers["x_dead_letter_reason"] == "poison"
    assert "x-luaq-attempts" not in dead.headers


async def test_a_dead_letter_never_expires(
    tmp_path: Path, vhost: str, workers: list[Worker]
) -> None:
    """The message's own expiration went into its dead letter: 6 s later the DLQ was empty."""
    url = f"{AMQP_URL}{quote(vhost, safe='')}"
    config = app(tmp_path, url, ALWAYS_FAILS,
                 {"dead_letter": {"queue": "dlq", "max_attempts": 1}})  # fmt: skip
    worker = await started(workers, config)
    await worker.host.publish("app", "jobs", {"n": 1}, {"expiration": "6000"})

    await eventually(lambda: worker.consumers[0].stats.dead_lettered == 1, timeout=10)
    [dead] = await get_raw(url, "dlq")
    assert dead.expiration is None
    assert dead.headers["x_original_expiration"] == "6000"


# -- 3. a retry whose queue is full when its delay ends ------------------------------------------

SUCCEEDS_SECOND_TIME = """
local seen = {}
function handle(p)
  seen[p.n] = (seen[p.n] or 0) + 1
  logger:info("ran", {n = p.n, attempt = seen[p.n]})
  return p.n ~= 1 or seen[p.n] > 1
end
"""


async def test_a_message_that_once_expired_from_its_queue_comes_back_from_its_retry(
    tmp_path: Path, vhost: str, workers: list[Worker], caplog: pytest.LogCaptureFixture
) -> None:
    """Its x-death named its own queue (it expired from it once and was moved back): the retry
    went on with it, and when the delay queue dead-lettered it back, RabbitMQ saw a cycle and
    dropped it, after luaq had acked the original (a review's find)."""
    caplog.set_level(logging.INFO)
    url = f"{AMQP_URL}{quote(vhost, safe='')}"
    config = app(tmp_path, url, SUCCEEDS_SECOND_TIME, {"retry": {"delay": "100ms"}})
    worker = await started(workers, config)
    death = {"queue": "jobs", "reason": "expired", "count": 1, "exchange": "",
             "routing-keys": ["jobs"], "time": datetime.datetime(2026, 1, 1)}  # fmt: skip
    headers = {"x-death": [death], "x-first-death-queue": "jobs"}
    await publish_raw(url, "jobs", b'{"n": 1}', headers=headers)

    await eventually(lambda: field(caplog, "attempt") == [1, 2], timeout=10)
    await eventually(lambda: worker.consumers[0].stats.acked == 1, timeout=10)
    assert await count(url, "jobs", "jobs.delay.100ms") == 0


async def test_a_retry_waits_for_room_in_a_full_queue(
    tmp_path: Path,
    workers: list[Worker],
    caplog: pytest.LogCaptureFixture,
    own_node_vhost: tuple[RabbitNode, str],
) -> None:
    """max-length 1 with overflow reject-publish on `jobs` (a policy): message 1 fails and
    waits out its delay while `jobs` fills up. The broker's classic dead-lettering back into
    `jobs` dropped it then; the quorum delay queue keeps it until there is room (the suite's
    own node sends a refused dead letter again after 1 s, rabbit_node.RESEND)."""
    caplog.set_level(logging.INFO)
    node, vhost = own_node_vhost
    url = node.vhost_url(vhost)
    full = '{"max-length": 1, "overflow": "reject-publish"}'
    node.ctl("set_policy", "-p", vhost, "full", "^jobs$", full, "--apply-to", "queues")
    config = app(tmp_path, url, SUCCEEDS_SECOND_TIME,
                 {"queue_name": "jobs", "retry": {"delay": "300ms"}})  # fmt: skip
    first = await started(workers, config)
    await first.host.publish("app", "jobs", {"n": 1}, {})
    await eventually(lambda: first.consumers[0].stats.retried == 1, timeout=10)
    await first.stop(1.0)
    workers.remove(first)
    await publish_raw(url, "jobs", b'{"n": 2}')  # jobs is full now
    delays = ("jobs.delay.300ms", "jobs.retry.300ms")
    # message 1's delay ends while jobs is full
    await eventually(lambda: _none_ready(url, *delays), timeout=10)

    second = await started(workers, config)
    stats = second.consumers[0].stats
    await eventually(lambda: stats.acked == 2, timeout=20)
    assert (await count(url, "jobs", *delays)) == 0
    # message 1 fails once in each worker (each counts its own attempts): it is there
    assert sorted(field(caplog, "n")) == [1, 1, 1, 2]


async def _none_ready(url: str, *names: str) -> bool:
    return await count(url, *names) == 0


# -- 8. delay queues an earlier process left ------------------------------------------------------


async def test_info_and_idle_count_delay_queues_an_earlier_process_left(
    tmp_path: Path, vhost: str, workers: list[Worker]
) -> None:
    """A retry waiting in jobs.delay.8000ms from a stopped worker, and one in a classic
    jobs.retry.16000ms from before quorum delay queues: a new worker counts both, and is not
    idle (`--until-idle` exited after 1.1 s, the messages landing in jobs with no one there)."""
    url = f"{AMQP_URL}{quote(vhost, safe='')}"
    config = app(tmp_path, url, SUCCEEDS_SECOND_TIME, {"retry": {"delay": "8s"}})
    earlier = await started(workers, config)
    await earlier.host.publish("app", "jobs", {"n": 1}, {})
    await eventually(lambda: earlier.consumers[0].stats.retried == 1, timeout=10)
    await earlier.stop(1.0)
    workers.remove(earlier)
    name = config.queues["app:jobs"].external_name
    connection = await aio_pika.connect(url)
    async with connection:
        channel = await connection.channel()
        await channel.declare_queue(f"{name}.retry.16000ms", durable=True, arguments={
            "x-message-ttl": 16000, "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": name})  # fmt: skip
        message = aio_pika.Message(b'{"n": 3}', content_type="application/json")
        await channel.default_exchange.publish(message, routing_key=f"{name}.retry.16000ms")

    later = await started(workers, config)
    assert await later.host.info("app", "jobs") == (2, 1)
    info = await later.drivers["app:broker"].info(config.queues["app:jobs"])
    assert info.delayed_count == 2, "both wait out a delay: neither is ready"
    assert not await later.idle()
