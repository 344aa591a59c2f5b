"""luaq's own AMQP client (runtime/drivers/amqp/client.py).

The hand-packed frames are checked against pamqp, an independent codec: what the client writes
is read back with pamqp, and what pamqp writes (as a broker would) is fed to the client, split
at every possible point. The rest runs against the real RabbitMQ: login and vhost failures,
channels the broker closes, heartbeats, exclusive consumers, returned messages. A silent broker
(one that stops answering, which RabbitMQ cannot be made to do) is a small fake server.
"""

from __future__ import annotations

import asyncio
import logging
import math
import struct
import time
from collections.abc import AsyncIterator, Iterator
from typing import Any
from uuid import uuid4

import pamqp.frame
import pytest
from broker import (
    AMQP_URL,
    consumer_entry,
    delete_queues,
    driver_entry,
    queue_depth,
    queue_entry,
    queue_totals,
    rabbitmqctl,
)
from conftest import eventually
from hypothesis import given, settings
from hypothesis import strategies as st
from luaq.runtime.drivers import Delivery
from luaq.runtime.drivers.amqp import AmqpDriver
from luaq.runtime.drivers.amqp.client import (
    HEARTBEAT_FRAME,
    WRITE_BATCH,
    Channel,
    ChannelClosed,
    Confirm,
    Connection,
    ConnectionClosed,
    Endpoint,
    decode_properties,
    encode_properties,
    encode_table,
)
from luaq.runtime.drivers.amqp.subscription import AmqpSubscription
from luaq.runtime.errors import ErrorKind, QueueError
from pamqp import commands as spec
from pamqp.body import ContentBody
from pamqp.header import ContentHeader
from pamqp.heartbeat import Heartbeat


class Wire:
    """Stands in for the socket under a Connection: keeps what the client writes."""

    def __init__(self) -> None:
        self.data = bytearray()
        self.closed = False

    def write(self, data: bytes) -> None:
        self.data += data

    def is_closing(self) -> bool:
        return self.closed

    def abort(self) -> None:
        self.closed = True

    def close(self) -> None:
        self.closed = True

    def frames(self) -> list[Any]:
        """Everything written so far, read by pamqp; then forget it."""
        data, found = bytes(self.data), []
        while data:
            consumed, _, value = pamqp.frame.unmarshal(data)
            found.append(value)
            data = data[consumed:]
        self.data.clear()
        return found


def server(*frames: Any, channel: int = 1) -> bytes:
    """Frames as the broker would send them, encoded by pamqp."""
    return b"".join(pamqp.frame.marshal(value, channel) for value in frames)


async def on_a_wire() -> tuple[Connection, Channel, Wire]:
    """A connection on a fake socket with channel 1 open."""
    connection = Connection(Endpoint.from_url(AMQP_URL))
    wire = Wire()
    connection.connection_made(wire)  # type: ignore[arg-type]
    opening = asyncio.ensure_future(connection.channel())
    await eventually(lambda: bool(wire.data))
    assert isinstance(wire.frames()[0], spec.Channel.Open)
    connection.data_received(server(spec.Channel.OpenOk()))
    return connection, await opening, wire


# -- frames, against pamqp ------------------------------------------------------------------------

HEADERS = {
    "n": 7,
    "big": 2**40,
    "ratio": 0.1,
    "ok": True,
    "none": None,
    "text": "héllo",
    "nested": {"list": [1, "two", 3.5, False], "inner": {"deep": "yes"}},
}


async def test_a_publish_is_what_pamqp_reads() -> None:
    connection, channel, wire = await on_a_wire()
    body = bytes(range(256)) * 1200  # 307,200 bytes: three body frames
    properties = {
        "content_type": "application/json",
        "delivery_mode": 2,
        "message_id": "m-1",
        "priority": 9,
        "correlation_id": "c-1",
        "type": "greeting",
        "expiration": "60000",
        "headers": HEADERS,
    }

    channel.publish(body, "jobs", properties)
    await eventually(lambda: bool(wire.data))
    method, header, *chunks = wire.frames()

    assert isinstance(method, spec.Basic.Publish)
    assert (method.exchange, method.routing_key, method.mandatory) == ("", "jobs", True)
    assert isinstance(header, ContentHeader)
    assert header.body_size == len(body)
    sent = header.properties
    assert sent.content_type == "application/json"
    assert (sent.delivery_mode, sent.priority, sent.message_id) == (2, 9, "m-1")
    assert (sent.correlation_id, sent.message_type, sent.expiration) == ("c-1", "greeting", "60000")
    assert sent.headers == HEADERS  # 0.1 arrives exact: a double, not a 32-bit float
    assert len(chunks) == math.ceil(len(body) / (connection.frame_max - 8))
    assert b"".join(chunk.value for chunk in chunks) == body


async def test_settlements_are_what_pamqp_reads() -> None:
    _, channel, wire = await on_a_wire()

    channel.ack(5, multiple=True)
    channel.ack(6)
    channel.nack(7, requeue=True)
    channel.nack(8, requeue=False)
    await eventually(lambda: bool(wire.data))
    frames = wire.frames()

    assert [(type(f), f.delivery_tag, f.multiple) for f in frames] == [
        (spec.Basic.Ack, 5, True),
        (spec.Basic.Ack, 6, False),
        (spec.Basic.Nack, 7, False),
        (spec.Basic.Nack, 8, False),
    ]
    assert [f.requeue for f in frames[2:]] == [True, False]


async def test_a_long_loop_iteration_sends_every_write_batch_at_once() -> None:
    """Writes wait for the end of the loop iteration, to go out together; but a run of handlers
    may keep one iteration busy for milliseconds, and the broker should not idle meanwhile."""
    _, channel, wire = await on_a_wire()

    for tag in range(1, 2 * WRITE_BATCH + 2):
        channel.ack(tag)
    sent = len(wire.frames())
    await eventually(lambda: bool(wire.data))

    assert sent == 2 * WRITE_BATCH
    assert [f.delivery_tag for f in wire.frames()] == [2 * WRITE_BATCH + 1]


def deliveries() -> tuple[bytes, list[tuple[int, bool, dict[str, Any], bytes]]]:
    """A broker's byte stream of three deliveries (one in two body frames with a heartbeat
    between them, one empty) and what the consumer should see of it."""
    big = b"x" * 1000 + b"y" * 500
    properties = spec.Basic.Properties(
        content_type="application/json", message_id="m-1", headers={"n": 1, "s": "é"}
    )
    stream = b"".join(
        [
            server(
                spec.Basic.Deliver("c1", 1, False, "", "q"),
                ContentHeader(0, 5, properties),
                ContentBody(b"hello"),
            ),
            server(spec.Basic.Deliver("c1", 2, True, "", "q"), ContentHeader(0, len(big))),
            server(ContentBody(big[:1000])),
            server(Heartbeat(), channel=0),
            server(ContentBody(big[1000:])),
            server(spec.Basic.Deliver("c1", 3, False, "", "q"), ContentHeader(0, 0)),
        ]
    )
    expected_properties = {
        "content_type": "application/json",
        "message_id": "m-1",
        "headers": {"n": 1, "s": "é"},
    }
    return stream, [
        (1, False, expected_properties, b"hello"),
        (2, True, {}, big),
        (3, False, {}, b""),
    ]


@pytest.mark.parametrize("chunk", [1, 2, 3, 7, 100, 10_000])
async def test_deliveries_arrive_whole_however_the_stream_is_cut(chunk: int) -> None:
    connection, channel, _ = await on_a_wire()
    got: list[tuple[int, bool, dict[str, Any], bytes]] = []
    consuming = asyncio.ensure_future(
        channel.consume("q", lambda *delivery: got.append(delivery), "c1")
    )
    await eventually(lambda: bool(channel._waiters))
    connection.data_received(server(spec.Basic.ConsumeOk("c1")))
    await consuming
    stream, expected = deliveries()

    for start in range(0, len(stream), chunk):
        connection.data_received(stream[start : start + chunk])

    assert got == expected
    assert not connection.is_closed


async def test_the_acks_of_the_last_run_go_out_before_the_next_deliveries() -> None:
    """Acks wait to be coalesced until the loop's next turn, but the loop reads its sockets
    before it runs that callback: the broker should not wait for the next batch to be taken in
    before it hears of the last one's acks."""
    connection, _, wire = await on_a_wire()
    queue = queue_entry("q")
    got: list[Delivery] = []
    subscription = AmqpSubscription(
        AmqpDriver(driver_entry()), queue, consumer_entry(queue), 10, got.append
    )
    attaching = asyncio.ensure_future(subscription.attach(connection))
    for reply in (
        spec.Channel.OpenOk(),
        spec.Basic.QosOk(),
        spec.Basic.ConsumeOk(subscription.tag),
    ):
        await eventually(lambda: bool(wire.data))
        wire.frames()
        connection.data_received(server(reply, channel=2))
    await attaching

    def delivery(tag: int) -> bytes:
        deliver = spec.Basic.Deliver(subscription.tag, tag, False, "", "q")
        return server(deliver, ContentHeader(0, 0), channel=2)

    connection.data_received(delivery(1) + delivery(2))
    for each in got:
        await each.ack()  # (no loop turn: the acks wait)
    assert not wire.data
    connection.data_received(delivery(3))

    assert [(type(f), f.delivery_tag, f.multiple) for f in wire.frames()] == [
        (spec.Basic.Ack, 2, True)
    ]
    assert len(got) == 3


async def test_a_reply_goes_to_its_caller_even_when_an_earlier_one_gave_up() -> None:
    connection, channel, _ = await on_a_wire()
    abandoned = asyncio.ensure_future(channel.queue_declare("first"))
    await eventually(lambda: bool(channel._waiters))
    abandoned.cancel()
    second = asyncio.ensure_future(channel.queue_declare("second"))
    await eventually(lambda: len(channel._waiters) == 2)

    connection.data_received(
        server(spec.Queue.DeclareOk("first", 1, 0), spec.Queue.DeclareOk("second", 2, 0))
    )

    assert (await second).queue == "second"
    assert abandoned.cancelled()


async def test_confirms_multiple_acks_nacks_and_returns() -> None:
    connection, channel, _ = await on_a_wire()
    ids = ["a", "b", "c", "dup", "dup", "f"]
    futures = [channel.publish(b"{}", "q", {"message_id": i}) for i in ids]

    # returns precede the confirm of their publish and name it only by message id
    connection.data_received(
        server(
            spec.Basic.Return(312, "NO_ROUTE", "", "q"),
            ContentHeader(0, 0, spec.Basic.Properties(message_id="b")),
            spec.Basic.Return(312, "NO_ROUTE", "", "q"),
            ContentHeader(0, 0, spec.Basic.Properties(message_id="dup")),
            spec.Basic.Ack(3, multiple=True),
            spec.Basic.Nack(5),
            spec.Basic.Ack(4),
        )
    )
    assert [f.result() for f in futures[:5]] == [
        Confirm.ACK,
        Confirm.RETURNED,
        Confirm.ACK,
        Confirm.RETURNED,  # the first "dup": returns come in publish order
        Confirm.NACK,
    ]
    assert not futures[5].done()

    connection.connection_lost(None)
    with pytest.raises(ConnectionClosed, match="connection lost"):
        futures[5].result()
    assert connection.is_closed
    with pytest.raises(ConnectionClosed):
        channel.publish(b"{}", "q", {})


@pytest.mark.parametrize("again", ["jobs.retry.50ms", "jobs"], ids=["delay-queue", "same-queue"])
async def test_a_return_goes_to_the_publish_its_ack_confirms(again: str) -> None:
    """Two publishes of one message id, the second returned and acked at once, the first acked
    once on disk. A retry republishes a message to a delay queue while its first publish waits
    for its confirm: a return of the republish (its delay queue deleted) is not the first
    publish's. And one id published twice to one queue deleted in between: the return went to
    the oldest publish alike, the first was told returned (and sent again), the second
    confirmed, and its message lost (a review's find)."""
    connection, channel, _ = await on_a_wire()
    first = channel.publish(b"A", "jobs", {"message_id": "m"})
    second = channel.publish(b"B", again, {"message_id": "m"})

    connection.data_received(
        server(
            spec.Basic.Return(312, "NO_ROUTE", "", again),
            ContentHeader(0, 0, spec.Basic.Properties(message_id="m")),
            spec.Basic.Ack(2),
            spec.Basic.Ack(1),
        )
    )

    assert (await first, await second) == (Confirm.ACK, Confirm.RETURNED)


async def test_a_publish_past_its_deadline_fails_and_a_late_confirm_is_harmless() -> None:
    connection, channel, _ = await on_a_wire()
    loop = asyncio.get_running_loop()
    now = loop.time()
    soon, later, never = (
        channel.publish(b"{}", "q", {"message_id": "soon"}, deadline=now + 0.05),
        channel.publish(b"{}", "q", {"message_id": "later"}, deadline=now + 0.3),
        channel.publish(b"{}", "q", {"message_id": "never"}),
    )
    async with asyncio.timeout(5):  # the test's own bound, in case the deadline is ignored
        with pytest.raises(TimeoutError):
            await soon
    assert now + 0.05 <= loop.time() < now + 0.3
    assert not later.done()

    # the broker confirms the first after its publisher gave up, then returns the second
    connection.data_received(
        server(
            spec.Basic.Ack(1),
            spec.Basic.Return(312, "NO_ROUTE", "", "q"),
            ContentHeader(0, 0, spec.Basic.Properties(message_id="later")),
            spec.Basic.Ack(2),
        )
    )
    assert await later == Confirm.RETURNED
    await asyncio.sleep(0.3)  # past every deadline given: the publish without one still waits
    assert not never.done()
    connection.data_received(server(spec.Basic.Ack(3)))
    assert await never == Confirm.ACK


async def test_a_malformed_frame_closes_the_connection() -> None:
    connection, _, wire = await on_a_wire()
    frame = bytearray(server(spec.Basic.Ack(1)))
    frame[-1] = 0x00  # not the frame-end octet

    connection.data_received(bytes(frame))

    assert wire.closed
    assert isinstance(connection.closed_by, ConnectionClosed)
    assert "malformed frame" in str(connection.closed_by)
    [close] = wire.frames()  # the broker is told why (AMQP 0-9-1 4.2.3)
    assert isinstance(close, spec.Connection.Close)
    assert close.reply_code == 501
    assert close.reply_text.startswith("FRAME_ERROR")


@pytest.mark.parametrize("payload", [131_072 - 7, 2**31])
async def test_a_frame_over_frame_max_is_a_frame_error_at_its_header(payload: int) -> None:
    """Known from the header alone: waiting for the rest would wait for ever (2 GiB), with
    the frames behind it, heartbeats too, buffered unseen."""
    connection, _, wire = await on_a_wire()
    assert connection.frame_max == 131_072
    connection.data_received(server(spec.Basic.Ack(1)))  # whole frames first
    largest = 131_072 - 8  # with its header and end octet, a frame of exactly frame_max
    connection.data_received(struct.pack(">BHI", 3, 9, largest) + bytes(largest) + b"\xce")
    assert not wire.closed

    connection.data_received(struct.pack(">BHI", 3, 1, payload) + b"body")

    assert wire.closed
    assert isinstance(connection.closed_by, ConnectionClosed)
    assert connection.closed_by.code == 501
    [close] = wire.frames()
    assert isinstance(close, spec.Connection.Close)
    assert (close.reply_code, close.class_id, close.method_id) == (501, 0, 0)
    assert f"a frame of {payload + 8:,} bytes" in close.reply_text


async def test_only_whole_frames_are_signs_of_life() -> None:
    connection, _, _ = await on_a_wire()
    connection._heard = False
    connection.data_received(HEARTBEAT_FRAME[:5])
    assert not connection._heard
    connection.data_received(HEARTBEAT_FRAME[5:])
    assert connection._heard


values = st.recursive(
    st.none()
    | st.booleans()
    | st.integers(-(2**63), 2**63 - 1)
    | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda children: (
        st.lists(children, max_size=4) | st.dictionaries(st.text(max_size=10), children, max_size=4)
    ),
    max_leaves=12,
)


@settings(max_examples=300, deadline=None)
@given(st.dictionaries(st.text(max_size=10), values, max_size=6))
def test_tables_round_trip_through_pamqp(table: dict[str, Any]) -> None:
    encoded = encode_table(table)
    assert pamqp.decode.field_table(encoded) == (len(encoded), table)
    properties = {"headers": table, "message_id": "m", "delivery_mode": 1, "timestamp": 17}
    assert decode_properties(encode_properties(properties), 0) == properties


def test_values_a_table_cannot_carry_are_named() -> None:
    with pytest.raises(TypeError, match="set"):
        encode_table({"k": {1, 2}})
    with pytest.raises(TypeError, match="64 bits"):
        encode_table({"k": 2**64})


# -- against RabbitMQ ---------------------------------------------------------------------------


@pytest.fixture
async def connection() -> AsyncIterator[Connection]:
    connection = await Connection.open(Endpoint.from_url(AMQP_URL))
    yield connection
    await connection.close()


@pytest.fixture
def queue_name() -> Iterator[str]:
    name = f"luaq-test-client-{uuid4().hex[:12]}"
    yield name
    asyncio.run(delete_queues(name))


async def test_a_wrong_password_is_refused_by_name() -> None:
    with pytest.raises(ConnectionClosed, match="ACCESS_REFUSED") as refused:
        await Connection.open(Endpoint.from_url("amqp://guest:wrong@127.0.0.1:5672/"))
    assert refused.value.code == 403


async def test_an_unknown_vhost_is_refused_by_name() -> None:
    with pytest.raises(ConnectionClosed, match="NOT_ALLOWED") as refused:
        await Connection.open(Endpoint.from_url(f"{AMQP_URL}luaq-no-such-vhost"))
    assert refused.value.code == 530


async def test_the_driver_reports_a_refused_login_without_the_password() -> None:
    driver = AmqpDriver(driver_entry(url="amqp://guest:s3cr3t-pw@127.0.0.1:5672/"))
    with pytest.raises(QueueError) as failed:
        await driver.start()
    assert failed.value.kind is ErrorKind.UNAVAILABLE
    assert "ACCESS_REFUSED" in failed.value.message
    assert "amqp://guest:***@127.0.0.1:5672/" in failed.value.message
    assert "s3cr3t-pw" not in failed.value.message


async def test_a_channel_the_broker_closes_fails_its_waiters_only(
    connection: Connection, queue_name: str
) -> None:
    channel = await connection.channel()
    await channel.confirm_select()
    await channel.queue_declare(queue_name)

    # RabbitMQ refuses a user_id that is not the connection's user, and closes the channel
    refused = channel.publish(b"{}", queue_name, {"user_id": "somebody-else"})
    with pytest.raises(ChannelClosed, match="PRECONDITION_FAILED") as closed:
        await refused
    assert closed.value.code == 406
    assert channel.is_closed
    with pytest.raises(ChannelClosed):
        channel.publish(b"{}", queue_name, {})

    other = await connection.channel()
    await other.confirm_select()
    assert await other.publish(b"{}", queue_name, {"message_id": "m"}) == Confirm.ACK
    assert (await other.queue_declare(queue_name, passive=True)).message_count == 1


async def test_a_confirmation_that_never_comes_times_out_on_the_broker(
    connection: Connection, queue_name: str
) -> None:
    silent = await connection.channel()  # confirms never selected: RabbitMQ confirms nothing
    await silent.queue_declare(queue_name)
    loop = asyncio.get_running_loop()
    started = loop.time()
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(silent.publish(b"{}", queue_name, {}, deadline=started + 0.2), 5)
    assert 0.2 <= loop.time() - started < 5
    assert (await silent.queue_declare(queue_name, passive=True)).message_count == 1


async def test_heartbeats_keep_an_idle_connection_open() -> None:
    connection = await Connection.open(Endpoint.from_url(AMQP_URL, heartbeat=1))
    try:
        assert connection.heartbeat == 1
        # RabbitMQ drops a client it has not heard from for two intervals
        with pytest.raises(TimeoutError):
            await asyncio.wait_for(asyncio.shield(connection.closed), 3.5)
        channel = await connection.channel()
        await channel.qos(1)
    finally:
        await connection.close()


async def test_a_silent_broker_is_given_up_on() -> None:
    """Handshake, then silence: the client must notice within a few heartbeat intervals, and
    keep sending its own heartbeats meanwhile."""
    heard = bytearray()

    async def broker(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await reader.readexactly(8)  # protocol header
        writer.write(pamqp.frame.marshal(spec.Connection.Start(), 0))
        await reader.read(4096)  # StartOk
        writer.write(pamqp.frame.marshal(spec.Connection.Tune(2047, 131072, 1), 0))
        await reader.read(4096)  # TuneOk, Open
        writer.write(pamqp.frame.marshal(spec.Connection.OpenOk(), 0))
        while chunk := await reader.read(4096):
            heard.extend(chunk)

    listener = await asyncio.start_server(broker, "127.0.0.1", 0)
    port = listener.sockets[0].getsockname()[1]
    try:
        endpoint = Endpoint.from_url(f"amqp://guest:guest@127.0.0.1:{port}/")
        connection = await asyncio.wait_for(Connection.open(endpoint), 5)
        await asyncio.wait_for(asyncio.shield(connection.closed), 6)
        assert "missed heartbeats" in str(connection.closed_by)
        assert HEARTBEAT_FRAME in heard
    finally:
        listener.close()


# -- the driver on the client ---------------------------------------------------------------------


@pytest.fixture
async def driver() -> AsyncIterator[AmqpDriver]:
    driver = AmqpDriver(driver_entry())
    await driver.start()
    yield driver
    await driver.close()


async def test_a_name_amqp_cannot_carry_is_invalid_and_the_driver_goes_on(
    driver: AmqpDriver, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    """`luaq check` refuses such names (tests/runtime/test_entries.py); a driver used directly says
    what is wrong in its own terms, and its declarations after that still work (a method that
    failed to encode used to leave a waiter behind that took the next call's reply)."""
    with pytest.raises(QueueError, match="255 bytes") as refused:
        # past the entries' own bound too: built without validation, as a caller might
        await driver.declare(queue_entry("q").model_copy(update={"queue_name": "q" * 256}))
    assert refused.value.kind is ErrorKind.INVALID

    # a name that fits, but not with a delay queue's suffix: the retry fails, and says why
    queue = queue_entry(queue_name.ljust(250, "q"))
    await driver.declare(queue)
    try:
        got: list[Delivery] = []
        subscription = await driver.consume(queue, consumer_entry(queue, prefetch=30), got.append)
        for _ in range(30):
            await driver.publish(queue, b"{}", {}, "application/json")
        await eventually(lambda: len(got) == 30)
        caplog.set_level(logging.WARNING, "luaq.amqp")
        for delivery in got:  # held: the consumer nacks them after their backoff
            assert await delivery.retry(1.0) is False
        # one line per message would be the failure rate: 10 of them, the rest counted later
        failed, *_ = said = [r for r in caplog.records if r.msg == "retry by republish failed"]
        assert len(said) == subscription.log_budget.burst  # type: ignore[attr-defined]
        assert "cannot declare delay queue" in failed.error  # type: ignore[attr-defined]
        assert "Max length exceeded" in failed.error  # type: ignore[attr-defined]
        await subscription.close()
        last = caplog.records[-1]
        assert (last.msg, last.suppressed) == ("lines held back by the log budget", 20)  # type: ignore[attr-defined]
    finally:
        await delete_queues(queue.external_name)


async def test_a_long_run_of_handlers_publishes_as_it_goes(
    driver: AmqpDriver, queue_name: str
) -> None:
    """The broker routes the publishes of a run of handlers while the run goes on, every
    WRITE_BATCH of them. rabbitmqctl is asked here without letting the loop turn (it blocks),
    as such a run blocks it."""
    queue = queue_entry(queue_name)
    await driver.declare(queue)
    publisher = await driver._publisher_channel()
    batches = 100 // WRITE_BATCH * WRITE_BATCH

    confirms = [publisher.publish(b"{}", queue_name, {"message_id": str(n)}) for n in range(100)]
    deadline = time.monotonic() + 10
    while (ready := queue_totals("/")[queue_name][0]) < batches and time.monotonic() < deadline:
        pass

    assert ready == batches  # the rest goes once the loop turns
    assert await asyncio.gather(*confirms) == [Confirm.ACK] * 100
    assert queue_totals("/")[queue_name] == (100, 0)


async def test_messages_sent_without_an_id_get_one_each(
    driver: AmqpDriver, queue_name: str
) -> None:
    """Not every client sets message_id (luaq's logs, dead letters and retry counts need one);
    luaq's own publishes take theirs from the same sequence, so none can be the same."""
    queue = queue_entry(queue_name)
    await driver.declare(queue)
    publisher = await driver._publisher_channel()
    sent = [publisher.publish(b"{}", queue_name, {}) for _ in range(3)]
    assert await asyncio.gather(*sent) == [Confirm.ACK] * 3
    ours = await driver.publish(queue, b"{}", {}, "application/json")
    got: list[Delivery] = []

    subscription = await driver.consume(queue, consumer_entry(queue), got.append)
    await eventually(lambda: len(got) == 4)

    assert got[3].id == ours
    assert all(delivery.id for delivery in got)
    assert len({delivery.id for delivery in got}) == 4
    await subscription.close()


async def test_a_message_no_queue_takes_declares_the_queue_again(
    driver: AmqpDriver, queue_name: str
) -> None:
    """A queue deleted behind the driver's back: the broker returns the message (nothing was
    enqueued), the driver declares the queue again and publishes once more."""
    queue = queue_entry(queue_name)
    await driver.declare(queue)
    await delete_queues(queue_name)

    assert await driver.publish(queue, b"{}", {"message_id": "back"}, "application/json")
    assert (await driver.info(queue)).message_count == 1


async def test_a_message_returned_again_is_not_found(
    driver: AmqpDriver, queue_name: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Returned once more after the queue was declared again: the publish fails, once."""
    queue = queue_entry(queue_name)
    await driver.declare(queue)
    await delete_queues(queue_name)

    async def declare_nothing(_queue: object) -> None:
        pass

    monkeypatch.setattr(driver, "declare", declare_nothing)
    with pytest.raises(QueueError, match="also after declaring the queue again") as returned:
        await driver.publish(queue, b"{}", {}, "application/json")
    assert returned.value.kind is ErrorKind.NOT_FOUND


async def test_an_exclusive_consumer_holds_its_queue(driver: AmqpDriver, queue_name: str) -> None:
    queue = queue_entry(queue_name)
    await driver.declare(queue)
    exclusive = consumer_entry(queue, driver_options={"amqp": {"exclusive": True}})
    first = await driver.consume(queue, exclusive, lambda delivery: None)
    other = AmqpDriver(driver_entry())
    await other.start()
    try:
        with pytest.raises(QueueError, match="in exclusive use") as refused:
            await other.consume(queue, consumer_entry(queue), lambda delivery: None)
        assert refused.value.kind is ErrorKind.PERMISSION_DENIED  # the broker's 403 ACCESS_REFUSED
        assert f"cannot consume from queue {queue_name}" in refused.value.message
    finally:
        await other.close()
        await first.close()


async def test_the_publisher_channel_is_reopened_after_the_broker_closes_it(
    driver: AmqpDriver, queue_name: str
) -> None:
    queue = queue_entry(queue_name)
    await driver.declare(queue)
    publisher = await driver._publisher_channel()
    with pytest.raises(ChannelClosed):
        await publisher.publish(b"{}", queue_name, {"user_id": "somebody-else"})

    assert await driver.publish(queue, b"{}", {"message_id": "after"}, "application/json")
    assert (await driver.info(queue)).message_count == 1


async def test_a_consumer_whose_queue_is_deleted_comes_back(
    driver: AmqpDriver, queue_name: str, caplog: pytest.LogCaptureFixture
) -> None:
    queue = queue_entry(queue_name)
    await driver.declare(queue)
    got: list[str] = []
    subscription = await driver.consume(queue, consumer_entry(queue), lambda d: got.append(d.id))
    caplog.set_level(logging.WARNING, "luaq.amqp")

    await delete_queues(queue_name)  # RabbitMQ cancels the consumer

    await eventually(lambda: "consumer restored" in caplog.text)
    assert "the broker cancelled consumer" in caplog.text
    assert await queue_depth(queue_name) == (0, 1)
    await driver.publish(queue, b"{}", {"message_id": "after"}, "application/json")
    await eventually(lambda: got == ["after"])
    await subscription.close()


async def test_the_broker_sees_the_connection_names_and_heartbeat() -> None:
    """Two connections per driver, one publishing and one consuming, named for what they do."""
    name = f"luaq-test-{uuid4().hex[:8]}"
    driver = AmqpDriver(driver_entry(connection_name=name, heartbeat="7s"))
    await driver.start()
    try:
        rows = rabbitmqctl("list_connections", "timeout", "client_properties").splitlines()
        ours = sorted(row for row in rows if name in row)
        assert len(ours) == 2, rows
        for row, role in zip(ours, ("consume", "publish"), strict=True):
            timeout, properties = row.split("\t")
            assert timeout == "7"
            assert f'{{"connection_name","{name} ({role})"}}' in properties
            assert '{"product","luaq"}' in properties
    finally:
        await driver.close()


async def test_a_declaration_queued_behind_a_failing_one_still_happens(
    driver: AmqpDriver, queue_name: str
) -> None:
    """A passive declaration of a missing queue closes the shared declarations channel; the
    declaration waiting behind it is made on a new one instead of failing with it."""
    missing, queue = queue_entry(f"{queue_name}-missing"), queue_entry(queue_name)
    asked, declared = await asyncio.gather(
        driver.info(missing), driver.declare(queue), return_exceptions=True
    )
    assert isinstance(asked, QueueError), asked
    assert asked.kind is ErrorKind.NOT_FOUND
    assert declared is None, declared
    assert await queue_depth(queue_name) == (0, 0)
