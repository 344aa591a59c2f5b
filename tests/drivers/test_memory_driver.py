"""The memory driver, through the driver interface and through Lua handlers."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from conftest import App, AppFactory
from luaq.runtime.codecs import CODECS
from luaq.runtime.drivers import Delivery, Driver, QueueInfo
from luaq.runtime.drivers.memory import MemoryDriver
from luaq.runtime.entries import ConsumerEntry, QueueEntry
from luaq.runtime.errors import ErrorKind, QueueError

IDLE_HANDLER = """
function handle(p)
  assert(queue.publish("out", p))
end
"""
PUBLISH_TIMEOUT = 0.2  # the harness's `publish_timeout: 200ms`
JSON = "application/json"


def driver_of(app: App) -> Driver:
    return app.worker.drivers["app:broker"]


def entry_of(app: App, name: str) -> QueueEntry:
    return app.worker.host.queue("app", name)


def consumer(prefetch: int) -> ConsumerEntry:
    return ConsumerEntry.model_construct(prefetch=prefetch)


def body(data: Any) -> bytes:
    encoded: bytes = CODECS["json/plain"].encode(data)
    return encoded


def decode(delivery: Delivery) -> Any:
    return CODECS["json/plain"].decode(delivery.body)


# -- bounded queues ----------------------------------------------------------------------------


async def test_publish_to_full_queue_times_out_internal_retryable(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER, max_length=3)
    driver, other = driver_of(app), entry_of(app, "other")
    for n in range(3):
        await driver.publish(other, body({"n": n}), {}, JSON)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(QueueError) as caught:
        await driver.publish(other, body({"n": 3}), {}, JSON)
    waited = loop.time() - started
    assert caught.value.kind is ErrorKind.INTERNAL
    assert caught.value.retryable is True
    assert "full" in caught.value.message
    assert PUBLISH_TIMEOUT * 0.9 <= waited < PUBLISH_TIMEOUT + 0.5
    # the rejected message was not added
    assert (await driver.info(other)).message_count == 3
    drained = await app.drain("other")
    assert [r.data for r in drained] == [{"n": 0}, {"n": 1}, {"n": 2}]


async def test_publish_to_full_queue_succeeds_when_a_consumer_frees_space(
    apps: AppFactory,
) -> None:
    app = await apps.start(IDLE_HANDLER, max_length=2)
    driver, other = driver_of(app), entry_of(app, "other")
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(1), got.append)
    for n in range(3):  # the first goes to the subscription, the next two fill the queue
        await driver.publish(other, body({"n": n}), {}, JSON)
    assert len(got) == 1
    assert (await driver.info(other)).message_count == 2

    loop = asyncio.get_running_loop()
    started = loop.time()
    # scheduled first: runs until it waits for space
    publishing = asyncio.ensure_future(driver.publish(other, body({"n": 3}), {}, JSON))

    async def free_space() -> None:
        assert not publishing.done(), "the publish should be waiting for space"
        await got[0].ack()  # the next message moves to the subscription: one slot frees

    message_id, _ = await asyncio.gather(publishing, free_space())
    assert isinstance(message_id, str)
    assert message_id
    assert loop.time() - started < PUBLISH_TIMEOUT
    assert [decode(d) for d in got] == [{"n": 0}, {"n": 1}]
    assert (await driver.info(other)).message_count == 2
    await subscription.close()
    drained = await app.drain("other")
    assert [r.data for r in drained] == [{"n": 1}, {"n": 2}, {"n": 3}]
    assert drained[-1].id == message_id


async def test_lua_publish_to_full_queue_fails_internal_retryable(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local results = {}
          for i = 1, 3 do
            local ok, err = queue.publish("other", {i = i})
            results[i] = {
              ok = ok == true,
              kind = err and err:kind(),
              retryable = err and err:retryable(),
              internal = err and errors.is(err, errors.INTERNAL),
            }
          end
          assert(queue.publish("out", results))
        end
        """,
        [{"n": 1}],
        max_length=2,
    )
    assert [r.data for r in out] == [
        [
            {"ok": True},
            {"ok": True},
            {"ok": False, "kind": "INTERNAL", "retryable": True, "internal": True},
        ]
    ]
    assert await app.info("other") == (2, 0)
    assert app.consumer.stats.acked == 1


# -- ids and headers ---------------------------------------------------------------------------


async def test_message_ids_are_unique_over_10000_publishes(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER, max_length=10_000)
    driver, other = driver_of(app), entry_of(app, "other")
    payload = body({"x": 1})
    ids = [await driver.publish(other, payload, {}, JSON) for _ in range(10_000)]
    assert all(isinstance(i, str) and i for i in ids)
    assert len(set(ids)) == 10_000
    assert (await driver.info(other)).message_count == 10_000
    drained = await app.drain("other")
    assert [r.id for r in drained] == ids


async def test_lua_sees_the_id_the_driver_assigned(apps: AppFactory) -> None:
    app = await apps.start(
        """
        function handle(p)
          assert(queue.publish("out", {id = queue.message():id()}))
        end
        """
    )
    driver, inbox = driver_of(app), entry_of(app, "in")
    ids = [await driver.publish(inbox, body({"n": n}), {}, JSON) for n in range(5)]
    await app.idle()
    out = await app.drain("out")
    assert sorted(r.data["id"] for r in out) == sorted(ids)
    # messages published from Lua get ids too, all different
    assert len({r.id for r in out}) == 5
    assert not {r.id for r in out} & set(ids)


HEADERS: dict[str, Any] = {
    "priority": "high",
    "correlation_id": "c-1",
    "count": 3,
    "ratio": 0.5,
    "urgent": True,
    "unicode": "héllo ✓",
}


async def test_headers_preserved_through_the_driver(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")
    headers = dict(HEADERS)
    await driver.publish(other, body({"n": 1}), headers, JSON)
    headers["priority"] = "changed after publish"
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(10), got.append)
    assert len(got) == 1
    assert dict(got[0].headers) == HEADERS
    assert got[0].content_type == JSON
    await got[0].ack()
    await subscription.close()


async def test_headers_preserved_through_lua(apps: AppFactory) -> None:
    _, out = await apps.run(
        """
        function handle(p)
          local msg = queue.message()
          assert(queue.publish("out", {
            all = msg:headers(), priority = msg:header("priority"), missing = msg:header("nope"),
          }, msg:headers()))
        end
        """,
        [({"n": 1}, HEADERS)],
    )
    assert len(out) == 1
    assert out[0].data["all"] == HEADERS
    assert out[0].data["priority"] == "high"
    assert "missing" not in out[0].data
    # headers the handler published survive a second trip through the driver
    assert out[0].headers == HEADERS


# -- nack, requeue, close -----------------------------------------------------------------


async def test_nack_requeues_at_the_tail_with_the_same_id(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")
    ids = {name: await driver.publish(other, body(name), {}, JSON) for name in ("A", "B", "C")}
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(1), got.append)
    assert [decode(d) for d in got] == ["A"]
    await got[0].nack()
    await got[1].ack()  # each settle hands out the next message
    await got[2].ack()
    assert [decode(d) for d in got] == ["A", "B", "C", "A"]
    assert [d.id for d in got] == [ids["A"], ids["B"], ids["C"], ids["A"]]
    assert [d.attempts for d in got] == [1, 1, 1, 2]
    await got[3].ack()
    assert (await driver.info(other)).message_count == 0
    await subscription.close()


async def test_nack_order_through_lua(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        local nacked = false
        function handle(p)
          assert(queue.publish("out", {name = p, id = queue.message():id()}))
          if p == "A" and not nacked then
            nacked = true
            return false
          end
        end
        """,
        ["A", "B", "C"],
        concurrency=1,
        prefetch=1,
    )
    assert [r.data["name"] for r in out] == ["A", "B", "C", "A"]
    assert out[0].data["id"] == out[3].data["id"]
    assert len({r.data["id"] for r in out}) == 3
    assert app.consumer.stats.retried == 1


async def test_nack_without_requeue_drops_the_message(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")
    await driver.publish(other, body("A"), {}, JSON)
    await driver.publish(other, body("B"), {}, JSON)
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(1), got.append)
    await got[0].nack(requeue=False)
    await got[1].ack()
    assert [decode(d) for d in got] == ["A", "B"]
    assert (await driver.info(other)).message_count == 0
    await subscription.close()


async def test_settling_twice_is_a_noop(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")
    await driver.publish(other, body("A"), {}, JSON)
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(1), got.append)
    await got[0].ack()
    await got[0].nack()  # later settles change nothing: no requeue
    await got[0].ack()
    assert len(got) == 1
    assert (await driver.info(other)).message_count == 0
    await subscription.close()


async def test_close_requeues_unsettled_deliveries(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")
    ids = [await driver.publish(other, body(n), {}, JSON) for n in range(5)]
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(3), got.append)
    assert [decode(d) for d in got] == [0, 1, 2]
    await got[1].ack()  # settled: gone for good; 3 moves to the subscription
    assert [decode(d) for d in got] == [0, 1, 2, 3]
    assert await driver.info(other) == QueueInfo(1, 1)
    await subscription.close()
    info = await driver.info(other)
    assert (info.message_count, info.consumer_count) == (4, 0)
    # settling after close changes nothing
    await got[0].ack()
    assert (await driver.info(other)).message_count == 4
    drained = await app.drain("other")
    # requeued at the head, in their original order, ids kept, attempts counted
    assert [r.data for r in drained] == [0, 2, 3, 4]
    assert [r.id for r in drained] == [ids[0], ids[2], ids[3], ids[4]]
    assert [r.attempts for r in drained] == [2, 2, 2, 1]


async def test_cancel_stops_deliveries_but_keeps_settlement(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")
    for n in range(3):
        await driver.publish(other, body(n), {}, JSON)
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(1), got.append)
    await subscription.cancel()
    assert (await driver.info(other)).consumer_count == 0
    await got[0].ack()  # still settles, but nothing new is delivered
    assert [decode(d) for d in got] == [0]
    assert (await driver.info(other)).message_count == 2
    await subscription.close()


async def test_round_robin_between_subscriptions(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")
    first: list[Delivery] = []
    second: list[Delivery] = []
    sub1 = await driver.consume(other, consumer(10), first.append)
    sub2 = await driver.consume(other, consumer(10), second.append)
    assert (await driver.info(other)).consumer_count == 2
    for n in range(6):
        await driver.publish(other, body(n), {}, JSON)
    assert len(first) == 3
    assert len(second) == 3
    assert sorted(decode(d) for d in first + second) == list(range(6))
    await sub1.close()
    await sub2.close()
    assert await driver.info(other) == QueueInfo(6, 0)


# -- info ----------------------------------------------------------------------------------


async def test_info_through_the_driver(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    driver, other = driver_of(app), entry_of(app, "other")

    async def info() -> tuple[int, int]:
        found = await driver.info(other)
        return found.message_count, found.consumer_count

    assert await info() == (0, 0)
    for n in range(3):
        await driver.publish(other, body(n), {}, JSON)
    assert await info() == (3, 0)
    got: list[Delivery] = []
    subscription = await driver.consume(other, consumer(1), got.append)
    assert await info() == (2, 1)  # one handed out: not ready any more
    await got[0].ack()
    assert await info() == (1, 1)
    await got[1].nack()
    assert await info() == (1, 1)  # requeued, and the next one handed out
    await subscription.cancel()
    assert await info() == (1, 0)
    await subscription.close()
    assert await info() == (2, 0)


async def test_info_through_lua(apps: AppFactory) -> None:
    app = await apps.start(
        """
        function handle(p)
          local results = {}
          for _, name in ipairs({"in", "other", "out", "app:other"}) do
            local info, err = queue.info(name)
            assert(info, err)
            results[name] = info
          end
          assert(queue.publish("out", results))
        end
        """,
        concurrency=1,
        prefetch=1,
    )
    for n in range(4):
        await app.publish("other", {"n": n})
    assert await app.info("other") == (4, 0)
    assert await app.info("in") == (0, 1)
    for n in range(3):
        await app.publish("in", {"n": n})
    await app.idle()
    out = await app.drain("out")
    assert [r.data["other"] for r in out] == [{"message_count": 4, "consumer_count": 0}] * 3
    assert [r.data["app:other"] for r in out] == [{"message_count": 4, "consumer_count": 0}] * 3
    # prefetch 1: the running message is out of the queue, the others wait
    assert [r.data["in"]["message_count"] for r in out] == [2, 1, 0]
    assert {r.data["in"]["consumer_count"] for r in out} == {1}
    # each handler's own earlier publishes to out are counted
    assert [r.data["out"]["message_count"] for r in out] == [0, 1, 2]
    assert await app.info("in") == (0, 1)


# -- declare and undeclared queues -----------------------------------------------------------


async def test_declare_is_idempotent(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER, max_length=2)
    driver, other = driver_of(app), entry_of(app, "other")
    await driver.publish(other, body("kept"), {}, JSON)
    await driver.declare(other)
    await driver.declare(other)
    # a second declaration with other options changes nothing either
    await driver.declare(
        other.model_copy(update={"driver_options": other.driver_options.model_copy()})
    )
    assert (await driver.info(other)).message_count == 1
    await driver.publish(other, body("second"), {}, JSON)
    with pytest.raises(QueueError) as caught:  # still bounded at 2
        await driver.publish(other, body("third"), {}, JSON)
    assert caught.value.kind is ErrorKind.INTERNAL
    drained = await app.drain("other")
    assert [r.data for r in drained] == ["kept", "second"]


async def test_undeclared_queue_is_not_found(apps: AppFactory) -> None:
    app = await apps.start(IDLE_HANDLER)
    # a fresh driver for the same broker entry: nothing declared on it yet
    fresh = MemoryDriver(app.worker.config.drivers["app:broker"])
    await fresh.start()
    other = entry_of(app, "other")
    with pytest.raises(QueueError) as publish_error:
        await fresh.publish(other, body(1), {}, JSON)
    with pytest.raises(QueueError) as info_error:
        await fresh.info(other)
    with pytest.raises(QueueError) as consume_error:
        await fresh.consume(other, consumer(1), lambda delivery: None)
    for caught in (publish_error, info_error, consume_error):
        assert caught.value.kind is ErrorKind.NOT_FOUND
        assert caught.value.retryable is False
        assert "other" in caught.value.message
    await fresh.declare(other)
    assert (await fresh.info(other)).message_count == 0
    await fresh.close()


async def test_undeclared_queue_through_lua_is_not_found(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local ok, perr = queue.publish("nowhere", {x = 1})
          local info, ierr = queue.info("app:nowhere")
          assert(queue.publish("out", {
            ok = ok == true, info = info ~= nil,
            publish = perr:kind(), info_kind = ierr:kind(), retryable = perr:retryable(),
          }))
        end
        """,
        [{"n": 1}],
    )
    assert [r.data for r in out] == [
        {
            "ok": False,
            "info": False,
            "publish": "NOT_FOUND",
            "info_kind": "NOT_FOUND",
            "retryable": False,
        }
    ]
    assert app.consumer.stats.acked == 1
