"""One conformance suite for every queue driver.

Every test runs once per name in DRIVERS against a real, started driver: the embedded memory
broker and the AMQP driver on the RabbitMQ at 127.0.0.1:5672. A driver added to DRIVERS (and to
`_start_driver`) gets the whole suite. Queue names are unique per test; the AMQP ones are deleted
from the broker afterwards. Absence of a delivery is proved with a sentinel published after it:
a queue is FIFO, so once the sentinel has arrived, anything queued before it would have too.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
from broker import CONTEXT, consumer_entry, delete_queues, driver_entry, queue_entry
from conftest import eventually
from luaq.runtime.codecs import BY_CONTENT_TYPE, CODECS
from luaq.runtime.drivers import Delivery, Driver, QueueInfo, Subscription
from luaq.runtime.drivers.amqp import AmqpDriver
from luaq.runtime.drivers.memory import MemoryDriver
from luaq.runtime.entries import ConsumerEntry, MemoryDriverEntry, QueueEntry
from luaq.runtime.errors import ErrorKind, QueueError

DRIVERS = ["memory", "amqp"]
JSON = CODECS["json/plain"]
MSGPACK = CODECS["application/msgpack"]
JSON_TYPE = JSON.content_type
# header keys a driver may add on its own (luaq-owned metadata); anything else is the caller's
KNOWN_KEYS = frozenset({"message_id", "content_type", "content_encoding"})


def encode(data: Any) -> bytes:
    body: bytes = JSON.encode(data)
    return body


def decode(delivery: Delivery) -> Any:
    return BY_CONTENT_TYPE[delivery.content_type].decode(delivery.body)


def caller_headers(delivery: Delivery) -> dict[str, Any]:
    """The headers minus the keys a driver may add itself."""
    return {k: v for k, v in delivery.headers.items() if k not in KNOWN_KEYS}


# -- the harness -------------------------------------------------------------------------------


async def _start_driver(name: str) -> Driver:
    driver: Driver
    if name == "memory":
        memory = MemoryDriverEntry.model_validate(
            {"id": "app:broker", "kind": "queue.driver.memory", "file": Path("x.yaml")},
            context=CONTEXT,
        )
        driver = MemoryDriver(memory)
    elif name == "amqp":
        driver = AmqpDriver(driver_entry())
    else:
        raise AssertionError(f"no factory for driver {name!r}")
    await driver.start()
    return driver


@dataclass
class Harness:
    """A started driver, and factories for uniquely named queue and consumer entries."""

    kind: str
    driver: Driver
    names: list[str] = field(default_factory=list)
    _tasks: set[asyncio.Future[Any]] = field(default_factory=set)

    def queue(
        self, amqp: Mapping[str, Any] | None = None, memory: Mapping[str, Any] | None = None
    ) -> QueueEntry:
        name = f"luaq-test-{uuid4().hex[:12]}"
        self.names.append(name)
        return queue_entry(
            name,
            driver_options={
                "amqp": dict(amqp or {}),
                "memory": {"max_length": 100_000, **(memory or {})},
            },
        )

    async def declared(
        self, amqp: Mapping[str, Any] | None = None, memory: Mapping[str, Any] | None = None
    ) -> QueueEntry:
        queue = self.queue(amqp, memory)
        await self.driver.declare(queue)
        return queue

    def consumer(self, queue: QueueEntry, prefetch: int = 100) -> ConsumerEntry:
        return consumer_entry(queue, prefetch=prefetch)

    async def publish(
        self,
        queue: QueueEntry,
        data: Any,
        headers: Mapping[str, Any] | None = None,
    ) -> str:
        message_id: str = await self.driver.publish(
            queue, encode(data), dict(headers or {}), JSON_TYPE
        )
        return message_id

    async def collect(
        self, queue: QueueEntry, prefetch: int = 100, auto_ack: bool = False
    ) -> tuple[Subscription, list[Delivery]]:
        """Consume into a list; with auto_ack every delivery is acked as it arrives."""
        got: list[Delivery] = []

        def on_delivery(delivery: Delivery) -> None:
            got.append(delivery)
            if auto_ack:
                task = asyncio.ensure_future(delivery.ack())
                self._tasks.add(task)
                task.add_done_callback(self._tasks.discard)

        subscription = await self.driver.consume(queue, self.consumer(queue, prefetch), on_delivery)
        return subscription, got

    async def wait_for(self, got: list[Delivery], count: int, timeout: float = 5.0) -> None:
        try:
            await eventually(lambda: len(got) >= count, timeout)
        except AssertionError:
            raise AssertionError(
                f"{len(got)} of {count} deliveries arrived: {[d.body[:40] for d in got]}"
            ) from None
        assert len(got) == count, [d.body[:40] for d in got]

    async def wait_info(self, queue: QueueEntry, expected: QueueInfo) -> None:
        """Broker counts may lag a little: poll until they match exactly."""
        last: list[QueueInfo] = []

        async def matches() -> bool:
            last[:] = [await self.driver.info(queue)]
            same: bool = last[0] == expected
            return same

        try:
            await eventually(matches)
        except AssertionError:
            raise AssertionError(f"info is {last[0]}, expected {expected}") from None

    async def settled(self) -> None:
        """Wait for the auto-ack tasks started so far."""
        if self._tasks:
            await asyncio.gather(*self._tasks)


@pytest.fixture(params=DRIVERS)
async def driver(request: pytest.FixtureRequest) -> AsyncIterator[Harness]:
    kind: str = request.param
    harness = Harness(kind, await _start_driver(kind))
    try:
        yield harness
    finally:
        await harness.settled()
        await harness.driver.close()
        if kind == "amqp":
            await delete_queues(*harness.names)


# -- declare, publish, consume -----------------------------------------------------------------


async def test_declare_is_idempotent(driver: Harness) -> None:
    queue = driver.queue()
    await driver.driver.declare(queue)
    await driver.driver.declare(queue)
    await driver.publish(queue, {"n": 1})
    await driver.driver.declare(queue)  # declaring again keeps what is queued
    await driver.wait_info(queue, QueueInfo(1, 0))
    _, got = await driver.collect(queue)
    await driver.wait_for(got, 1)
    assert decode(got[0]) == {"n": 1}


async def test_publish_consume_ack(driver: Harness) -> None:
    queue = await driver.declared()
    message_id = await driver.publish(queue, {"hello": "world"}, {"k": "v"})
    subscription, got = await driver.collect(queue)
    await driver.wait_for(got, 1)
    delivery = got[0]
    assert delivery.id == message_id
    assert decode(delivery) == {"hello": "world"}
    assert delivery.body == b'{"hello":"world"}'
    assert delivery.content_type == JSON_TYPE
    assert caller_headers(delivery) == {"k": "v"}
    assert delivery.attempts == 1
    await delivery.ack()
    await subscription.close()
    await driver.wait_info(queue, QueueInfo(0, 0))


async def test_several_messages_keep_their_order(driver: Harness) -> None:
    queue = await driver.declared()
    ids = [await driver.publish(queue, {"n": n}) for n in range(25)]
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 25)
    assert [decode(d) for d in got] == [{"n": n} for n in range(25)]
    assert [d.id for d in got] == ids
    await driver.settled()
    await driver.wait_info(queue, QueueInfo(0, 1))


async def test_nack_redelivers_with_the_same_id(driver: Harness) -> None:
    queue = await driver.declared()
    message_id = await driver.publish(queue, {"n": 1}, {"k": "v"})
    _, got = await driver.collect(queue)
    await driver.wait_for(got, 1)
    first = got[0]
    assert first.attempts == 1
    await first.nack(requeue=True)
    await driver.wait_for(got, 2)
    second = got[1]
    assert second.id == first.id == message_id
    assert second.attempts > first.attempts
    assert second.body == first.body
    assert caller_headers(second) == {"k": "v"}
    await second.ack()
    await driver.wait_info(queue, QueueInfo(0, 1))


async def test_nack_without_requeue_drops_the_message(driver: Harness) -> None:
    queue = await driver.declared()
    await driver.publish(queue, "dropped")
    _, got = await driver.collect(queue)
    await driver.wait_for(got, 1)
    await got[0].nack(requeue=False)
    await driver.publish(queue, "sentinel")
    await driver.wait_for(got, 2)
    assert [decode(d) for d in got] == ["dropped", "sentinel"]
    await got[1].ack()
    await driver.wait_info(queue, QueueInfo(0, 1))


async def test_undeclared_queue_is_not_found(driver: Harness) -> None:
    queue = driver.queue()  # never declared through this driver, and absent from any broker
    with pytest.raises(QueueError) as published:
        await driver.publish(queue, {"n": 1})
    assert published.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(QueueError) as consumed:
        await driver.collect(queue)
    assert consumed.value.kind is ErrorKind.NOT_FOUND
    with pytest.raises(QueueError) as inspected:
        await driver.driver.info(queue)
    assert inspected.value.kind is ErrorKind.NOT_FOUND
    # the failures left the driver usable
    other = await driver.declared()
    await driver.publish(other, "still works")
    _, got = await driver.collect(other)
    await driver.wait_for(got, 1)
    assert decode(got[0]) == "still works"


async def test_publish_to_a_queue_declared_only_by_another_driver_is_not_found(
    driver: Harness,
) -> None:
    queue = driver.queue()
    elsewhere = await _start_driver(driver.kind)
    try:
        await elsewhere.declare(queue)
        with pytest.raises(QueueError) as published:
            await driver.publish(queue, {"n": 1})
        assert published.value.kind is ErrorKind.NOT_FOUND
        # once declared here too, the same entry works
        await driver.driver.declare(queue)
        await driver.publish(queue, {"n": 2})
        _, got = await driver.collect(queue, auto_ack=True)
        await driver.wait_for(got, 1)
        assert decode(got[0]) == {"n": 2}
    finally:
        await elsewhere.close()


# -- bodies and headers ------------------------------------------------------------------------


async def test_bodies_are_preserved_byte_exact(driver: Harness) -> None:
    queue = await driver.declared()
    big_text = "é" * 250_000 + "x" * 500_000  # 1 MB of UTF-8 once encoded
    values: list[Any] = [
        'héllo wörld ✓ 漢字 🎉 \u0000 \n\t"quoted"',
        {"a": {"b": {"c": [1, {"d": None, "e": [True, False]}]}}, "empty": {}, "list": []},
        [1, "two", 3.5, [4, [5]], {"six": 6}, None],
        {"int": 1, "float": 1.0, "big": 2**53 + 1, "neg": -7, "exp": 1e-7, "zero": 0.0},
        [],
        {},
        0,
        "",
        big_text,
    ]
    bodies = [(encode(v), JSON_TYPE) for v in values]
    bodies.append((MSGPACK.encode({"bin": b"\x00\xff", "n": 1, "f": 1.5}), MSGPACK.content_type))
    bodies.append((bytes(range(256)) * 4, "application/octet-stream"))
    bodies.append((b"", "application/octet-stream"))
    assert len(encode(big_text)) == 1_000_002
    for body, content_type in bodies:
        await driver.driver.publish(queue, body, {}, content_type)
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, len(bodies), timeout=10.0)
    assert [(d.body, d.content_type) for d in got] == bodies
    decoded = [decode(d) for d in got[: len(values)]]
    assert decoded == values
    numbers = decoded[3]
    assert type(numbers["int"]) is int
    assert type(numbers["float"]) is float
    assert type(numbers["big"]) is int
    assert numbers["big"] == 2**53 + 1
    assert type(numbers["zero"]) is float
    assert decode(got[len(values)]) == {"bin": b"\x00\xff", "n": 1, "f": 1.5}


async def test_batch_publish(driver: Harness) -> None:
    queue = await driver.declared()
    ids = await asyncio.gather(*(driver.publish(queue, {"n": n}) for n in range(300)))
    assert len(set(ids)) == 300
    assert all(ids)
    await driver.wait_info(queue, QueueInfo(300, 0))
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 300)
    assert sorted(decode(d)["n"] for d in got) == list(range(300))
    assert {d.id for d in got} == set(ids)


CUSTOM_HEADERS: dict[str, dict[str, Any]] = {
    "str": {"s": "text ✓ 漢字", "empty": "", "digits": "42", "spaces": " a b "},
    "int": {"i": 42, "zero": 0, "neg": -3, "big": 2**40, "max": 2**63 - 1},
    "float": {"tenth": 0.1, "pi": 3.141592653589793, "integral": 3.0, "tiny": -1.5e-300},
    "bool": {"yes": True, "no": False},
}
PROPERTY_HEADERS: dict[str, Any] = {
    "correlation_id": "corr-123",
    "reply_to": "replies",
    "message_type": "email.send",
    "expiration": "60000",
    "priority": 7,
}


@pytest.mark.parametrize("kind", list(CUSTOM_HEADERS))
async def test_custom_headers_round_trip_with_their_types(driver: Harness, kind: str) -> None:
    queue = await driver.declared()
    sent = {**CUSTOM_HEADERS[kind], "other": "x"}
    await driver.publish(queue, "x", sent)
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 1)
    headers = caller_headers(got[0])
    assert headers == sent
    assert {k: type(v) for k, v in headers.items()} == {k: type(v) for k, v in sent.items()}


@pytest.mark.parametrize("priority", [7, 0, "high", "low"])
async def test_property_headers_round_trip(driver: Harness, priority: int | str) -> None:
    queue = await driver.declared(amqp={"max_priority": 10})
    sent = {**PROPERTY_HEADERS, "priority": priority, "custom": 1}
    await driver.publish(queue, "x", sent)
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 1)
    headers = caller_headers(got[0])
    assert headers == sent
    assert type(headers["priority"]) is type(priority)
    assert type(headers["expiration"]) is str


async def test_declare_options_never_leak_into_headers(driver: Harness) -> None:
    queue = await driver.declared(
        amqp={"max_length": 50, "message_ttl": "60s", "max_priority": 5, "durable": False},
        memory={"max_length": 50},
    )
    await driver.publish(queue, "bare")
    await driver.publish(queue, "with", {"a": 1})
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 2)
    assert caller_headers(got[0]) == {}
    assert caller_headers(got[1]) == {"a": 1}
    for delivery in got:
        assert set(delivery.headers) <= KNOWN_KEYS | {"a"}, delivery.headers


async def test_headers_are_never_none(driver: Harness) -> None:
    queue = await driver.declared()
    await driver.publish(queue, "x", {})
    await driver.driver.publish(queue, b"raw", {}, "application/octet-stream")
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 2)
    for delivery in got:
        assert delivery.headers is not None
        assert isinstance(delivery.headers, Mapping)
        assert set(delivery.headers) <= KNOWN_KEYS, delivery.headers
        assert delivery.id
    assert [d.content_type for d in got] == [JSON_TYPE, "application/octet-stream"]


async def test_ids_generated_when_absent_and_given_ids_used(driver: Harness) -> None:
    queue = await driver.declared()
    generated = [await driver.publish(queue, {"n": n}) for n in range(20)]
    assert all(isinstance(i, str) and i for i in generated)
    assert len(set(generated)) == 20
    given = f"order-{uuid4().hex}"
    assert await driver.publish(queue, {"n": 20}, {"message_id": given}) == given
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 21)
    assert [d.id for d in got] == [*generated, given]
    assert got[-1].headers.get("message_id") == given


# -- queues, info and consumers ----------------------------------------------------------------


async def test_queues_are_isolated(driver: Harness) -> None:
    a, b = await driver.declared(), await driver.declared()
    await driver.publish(a, "for a")
    await driver.publish(b, "for b")
    _, got_b = await driver.collect(b, auto_ack=True)
    await driver.wait_for(got_b, 1)
    await driver.publish(b, "sentinel")
    await driver.wait_for(got_b, 2)
    assert [decode(d) for d in got_b] == ["for b", "sentinel"]
    await driver.wait_info(a, QueueInfo(1, 0))
    _, got_a = await driver.collect(a, auto_ack=True)
    await driver.wait_for(got_a, 1)
    assert decode(got_a[0]) == "for a"


async def test_info_is_accurate(driver: Harness) -> None:
    queue = await driver.declared()
    assert await driver.driver.info(queue) == QueueInfo(0, 0)
    for n in range(3):
        await driver.publish(queue, n)
    await driver.wait_info(queue, QueueInfo(3, 0))
    subscription, got = await driver.collect(queue, prefetch=1)
    await driver.wait_for(got, 1)
    # the unsettled delivery is not ready any more; the consumer is counted
    await driver.wait_info(queue, QueueInfo(2, 1))
    await subscription.close()
    await driver.wait_info(queue, QueueInfo(3, 0))


async def test_cancel_stops_deliveries(driver: Harness) -> None:
    queue = await driver.declared()
    subscription, got = await driver.collect(queue, auto_ack=True)
    await driver.publish(queue, "before")
    await driver.wait_for(got, 1)
    await driver.wait_info(queue, QueueInfo(0, 1))
    await subscription.cancel()
    await driver.wait_info(queue, QueueInfo(0, 0))
    await driver.publish(queue, "after")
    await driver.wait_info(queue, QueueInfo(1, 0))
    _, later = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(later, 1)
    assert decode(later[0]) == "after"
    assert [decode(d) for d in got] == ["before"]


async def test_publish_before_attach(driver: Harness) -> None:
    queue = await driver.declared()
    for n in range(5):
        await driver.publish(queue, n)
    await driver.wait_info(queue, QueueInfo(5, 0))
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 5)
    assert [decode(d) for d in got] == [0, 1, 2, 3, 4]


async def test_reattach_after_cancel_gets_the_rest(driver: Harness) -> None:
    queue = await driver.declared()
    for n in range(6):
        await driver.publish(queue, n)
    subscription, got = await driver.collect(queue, prefetch=2)
    await driver.wait_for(got, 2)
    await subscription.cancel()
    for delivery in got:  # deliveries handed out before the cancel can still be settled
        await delivery.ack()
    await driver.wait_info(queue, QueueInfo(4, 0))
    _, rest = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(rest, 4)
    assert [decode(d) for d in got] == [0, 1]
    assert [decode(d) for d in rest] == [2, 3, 4, 5]
    assert len(got) == 2


async def test_rapid_attach_detach_loses_nothing(driver: Harness) -> None:
    queue = await driver.declared()
    total = 40
    for n in range(total):
        await driver.publish(queue, n)
    acked: list[int] = []
    for _ in range(20):
        subscription, got = await driver.collect(queue, prefetch=3)
        await eventually(partial(bool, got))
        await got[0].ack()
        acked.append(decode(got[0]))
        await subscription.close()  # the other held deliveries go back
    await driver.wait_info(queue, QueueInfo(total - 20, 0))
    _, rest = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(rest, total - 20)
    received = acked + [decode(d) for d in rest]
    assert sorted(received) == list(range(total))


@pytest.mark.parametrize("acked", [0, 1], ids=["in-order", "out-of-order"])
async def test_acked_message_is_delivered_once(driver: Harness, acked: int) -> None:
    """Ack one of three held deliveries (the first, or one behind a held one), close the
    subscription: the other two come back, the acked one never does."""
    queue = await driver.declared()
    for n in range(3):
        await driver.publish(queue, n)
    subscription, got = await driver.collect(queue)
    await driver.wait_for(got, 3)
    await got[acked].ack()
    await subscription.close()
    await driver.wait_info(queue, QueueInfo(2, 0))
    _, again = await driver.collect(queue, auto_ack=True)
    await driver.publish(queue, "sentinel")
    await driver.wait_for(again, 3)
    assert [decode(d) for d in again] == [n for n in range(3) if n != acked] + ["sentinel"]
    assert got[acked].id not in {d.id for d in again}


async def test_ack_frees_a_prefetch_slot_while_an_earlier_delivery_is_held(
    driver: Harness,
) -> None:
    queue = await driver.declared()
    for n in range(3):
        await driver.publish(queue, n)
    _, got = await driver.collect(queue, prefetch=2)
    await driver.wait_for(got, 2)
    await got[1].ack()  # the first stays unsettled (a slow handler)
    await driver.wait_for(got, 3)
    assert [decode(d) for d in got] == [0, 1, 2]
    await driver.wait_info(queue, QueueInfo(0, 1))


async def test_close_requeues_unsettled_deliveries(driver: Harness) -> None:
    queue = await driver.declared()
    ids = [await driver.publish(queue, n) for n in range(3)]
    subscription, got = await driver.collect(queue)
    await driver.wait_for(got, 3)
    await driver.wait_info(queue, QueueInfo(0, 1))
    await subscription.close()
    await driver.wait_info(queue, QueueInfo(3, 0))
    _, again = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(again, 3)
    assert sorted(d.id for d in again) == sorted(ids)
    assert sorted(decode(d) for d in again) == [0, 1, 2]
    assert all(d.attempts > 1 for d in again), [d.attempts for d in again]


async def test_ack_and_nack_are_idempotent(driver: Harness) -> None:
    queue = await driver.declared()
    await driver.publish(queue, "acked")
    await driver.publish(queue, "nacked")
    _, got = await driver.collect(queue)
    await driver.wait_for(got, 2)
    acked, nacked = got
    await acked.ack()
    await acked.ack()
    await acked.nack(requeue=True)  # after an ack: no effect, no redelivery
    await nacked.nack(requeue=True)
    await nacked.nack(requeue=True)  # a second nack must not redeliver twice
    await nacked.ack()  # nor may a later ack settle it again
    await driver.wait_for(got, 3)
    redelivered = got[2]
    assert decode(redelivered) == "nacked"
    assert redelivered.id == nacked.id
    await redelivered.ack()
    await driver.publish(queue, "sentinel")
    await driver.wait_for(got, 4)
    assert [decode(d) for d in got] == ["acked", "nacked", "nacked", "sentinel"]
    await got[3].ack()
    await driver.wait_info(queue, QueueInfo(0, 1))


# -- volume ------------------------------------------------------------------------------------


async def test_concurrent_publish_from_100_tasks(driver: Harness) -> None:
    queue = await driver.declared()
    per_task = 10

    async def publisher(task: int) -> list[str]:
        return [await driver.publish(queue, {"t": task, "n": n}) for n in range(per_task)]

    results = await asyncio.gather(*(publisher(t) for t in range(100)))
    ids = [i for chunk in results for i in chunk]
    assert len(set(ids)) == 100 * per_task
    _, got = await driver.collect(queue, auto_ack=True)
    await driver.wait_for(got, 100 * per_task)
    assert {d.id for d in got} == set(ids)
    by_task: dict[int, list[int]] = {}
    for delivery in got:
        data = decode(delivery)
        by_task.setdefault(data["t"], []).append(data["n"])
    # each task awaited its publishes in turn, so its messages are queued in its order
    assert by_task == {t: list(range(per_task)) for t in range(100)}


async def test_ten_thousand_messages(driver: Harness) -> None:
    queue = await driver.declared()
    total, chunk = 10_000, 1_000
    loop = asyncio.get_running_loop()
    started = loop.time()
    _, got = await driver.collect(queue, prefetch=1_000, auto_ack=True)
    ids: list[str] = []
    for base in range(0, total, chunk):
        ids += await asyncio.gather(
            *(driver.publish(queue, {"n": n}) for n in range(base, base + chunk))
        )
    await driver.wait_for(got, total, timeout=15.0)
    await driver.settled()
    elapsed = loop.time() - started
    assert len(set(ids)) == total
    assert {d.id for d in got} == set(ids)
    assert sorted(json.loads(d.body)["n"] for d in got) == list(range(total))
    await driver.wait_info(queue, QueueInfo(0, 1))
    assert elapsed < 15.0
