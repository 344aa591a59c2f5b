"""RabbitMQ and any AMQP 0-9-1 broker, on aiormq (aio-pika's protocol layer).

The hot path stays at aiormq's level: no per-message wrapper objects beyond our Delivery,
acks written without waiting for the socket drain, and consecutive acks coalesced into one
`multiple` ack per loop iteration. Recovery is owned here, as aio-pika's robust connection
does it: when the connection drops, reconnect with exponential backoff, declare the queues
again and re-attach every consumer; publishes wait for the link (bounded) meanwhile.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import logging
import os
import ssl
import tempfile
import uuid
from collections import deque
from collections.abc import Mapping
from typing import Any, cast
from urllib.parse import quote, urlsplit, urlunsplit

import aiormq
import aiormq.abc
import pamqp.encode
from aiormq.exceptions import (
    AMQPError,
    ChannelInvalidStateError,
    ChannelNotFoundEntity,
    ChannelPreconditionFailed,
    PublishError,
)
from pamqp.commands import Basic

from ..entries import AmqpDriverEntry, ConsumerEntry, QueueEntry
from ..errors import Kind, QueueError
from . import Delivery, Driver, OnDelivery, QueueInfo, Subscription

_log = logging.getLogger("luaq.amqp")

# Header names that travel as AMQP properties (other clients read them there). The headers
# table carries everything else, and the originals of values a property cannot hold exactly.
PROPERTIES = ("correlation_id", "reply_to", "message_type", "expiration", "priority")
PRIORITY_NAMES = {"low": 1, "normal": 5, "high": 9}
ATTEMPTS = "x-luaq-attempts"  # attempts a retried message has had, carried in its headers
# aiormq holds a channel's lock until each published frame is written; publishes from many
# concurrent handlers spread over a few confirm channels instead of queueing on one.
PUBLISHERS = 4
_OWNED = ("content_type", "content_encoding", "message_id")  # set by luaq, kept as headers


def _encode_table_value(value: Any, _encode: Any = pamqp.encode.encode_table_value) -> bytes:
    """pamqp writes every float in a headers table as a 32-bit single, so 0.1 would arrive as
    0.10000000149011612; AMQP's field type `d` (and every decoder) carries the full double."""
    if isinstance(value, float):
        return b"d" + pamqp.encode.double(value)
    return bytes(_encode(value))


pamqp.encode.encode_table_value = _encode_table_value


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def _milliseconds(seconds: float) -> int:
    return round(seconds * 1000)


def queue_arguments(queue: QueueEntry, driver: AmqpDriverEntry) -> dict[str, Any]:
    options = queue.driver_options.amqp
    ttl = options.message_ttl if options.message_ttl is not None else driver.default_message_ttl
    expiry = (
        options.queue_expiry if options.queue_expiry is not None else (driver.default_queue_expiry)
    )
    arguments: dict[str, Any] = {}
    if ttl is not None:
        arguments["x-message-ttl"] = _milliseconds(ttl)
    if expiry is not None:
        arguments["x-expires"] = _milliseconds(expiry)
    if options.max_length is not None:
        arguments["x-max-length"] = options.max_length
    if options.max_priority is not None:
        arguments["x-max-priority"] = options.max_priority
    if options.type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


def priority(value: Any) -> int:
    if isinstance(value, str) and value.lower() in PRIORITY_NAMES:
        return PRIORITY_NAMES[value.lower()]
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or not 0 <= number <= 255:
        raise QueueError(
            Kind.INVALID, f"priority must be high, normal, low or 0-255, not {value!r}"
        )
    return number


def properties_for(
    headers: Mapping[str, Any], content_type: str, message_id: str, persistent: bool
) -> Basic.Properties:
    table: dict[str, Any] = {}
    fields: dict[str, Any] = {}
    for key, value in headers.items():
        if key in PROPERTIES:
            if key == "priority":
                fields["priority"] = priority(value)
                if not isinstance(value, int):
                    table[key] = value
            elif key == "expiration":
                fields["expiration"] = str(value)
                if not isinstance(value, str):
                    table[key] = value
            elif isinstance(value, str):
                fields["message_type" if key == "message_type" else key] = value
            else:
                table[key] = value
        else:
            table[key] = value
    return Basic.Properties(
        content_type=content_type,
        delivery_mode=2 if persistent else 1,
        message_id=message_id,
        headers=table or None,
        correlation_id=fields.get("correlation_id"),
        reply_to=fields.get("reply_to"),
        message_type=fields.get("message_type"),
        expiration=fields.get("expiration"),
        priority=fields.get("priority"),
    )


def headers_from(properties: Basic.Properties) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for key in PROPERTIES:
        value = getattr(properties, key)
        if value is not None:
            headers[key] = value
    if properties.headers:
        for key, value in properties.headers.items():
            headers[key] = value.decode("utf-8", "replace") if isinstance(value, bytes) else value
    return headers


def ssl_context(entry: AmqpDriverEntry) -> ssl.SSLContext | None:
    tls = entry.tls
    if not tls.enabled and not entry.url.startswith("amqps://"):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca:
        ca = _pem(tls.ca)
        if ca.lstrip().startswith("-----BEGIN"):
            context.load_verify_locations(cadata=ca)
        else:
            context.load_verify_locations(cafile=ca)
    if tls.cert and tls.key:
        with _pem_file(tls.cert) as cert, _pem_file(tls.key) as key:
            context.load_cert_chain(cert, key)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    if tls.server_name:
        context = _with_server_name(context, tls.server_name)
    return context


def _pem(value: str) -> str:
    """Inline PEM as it is; `file://path` as the path (environment is already expanded)."""
    return value.removeprefix("file://")


@contextlib.contextmanager
def _pem_file(value: str) -> Any:
    value = _pem(value)
    if not value.lstrip().startswith("-----BEGIN"):
        yield value
        return
    # ssl loads certificate chains only from files: inline PEM goes through a private temp file
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as handle:
        os.chmod(handle.name, 0o600)
        handle.write(value)
        handle.flush()
        yield handle.name


def _with_server_name(context: ssl.SSLContext, server_name: str) -> ssl.SSLContext:
    """Verify (and send SNI for) `server_name` instead of the host in the URL."""

    class Context(ssl.SSLContext):
        def wrap_bio(self, *args: Any, **kwargs: Any) -> ssl.SSLObject:
            kwargs["server_hostname"] = server_name
            return super().wrap_bio(*args, **kwargs)

    named = Context(context.protocol)
    named.check_hostname = context.check_hostname
    named.verify_mode = context.verify_mode
    named.load_default_certs()
    return named


class MessageIds:
    """Unique message ids without a uuid per message: a random 64-bit prefix per driver
    instance (so per process) and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


class AmqpDelivery(Delivery):
    __slots__ = ("_channel", "_subscription", "_tag")

    def __init__(
        self,
        subscription: AmqpSubscription,
        channel: object,
        tag: int,
        message_id: str,
        body: bytes,
        headers: Mapping[str, Any],
        content_type: str,
        attempts: int,
    ) -> None:
        super().__init__(message_id, body, headers, content_type, attempts)
        self._subscription = subscription
        self._channel = channel
        self._tag = tag

    async def _settle(self, ack: bool, requeue: bool) -> None:
        # Tags restart on every channel: after a reconnect, this tag may name another message.
        if self._channel is self._subscription.channel:
            self._subscription.settle(self._tag, ack, requeue)

    async def retry(self, delay: float = 0.0) -> None:
        """A broker requeue only says "redelivered", so the count would stop at 2: publish the
        message again carrying its attempts (through a delay queue when it should wait), then
        ack this copy (at-least-once either way)."""
        if self.settled is not None:
            return
        subscription = self._subscription
        try:
            await subscription.driver.republish(subscription.queue, self, delay)
        except QueueError as exc:
            _log.warning("retry by republish failed, requeued instead", extra={"error": str(exc)})
            await self.nack()
            return
        await self.ack()


class AmqpSubscription(Subscription):
    """A consumer on its own channel. Acks are coalesced: the lowest tag still open bounds a
    `multiple` ack, sent once per loop iteration; nacks go out at once."""

    def __init__(
        self,
        driver: AmqpDriver,
        queue: QueueEntry,
        consumer: ConsumerEntry,
        prefetch: int,
        on_delivery: OnDelivery,
    ) -> None:
        self.driver = driver
        self.queue = queue
        self.consumer = consumer
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self.channel: aiormq.abc.AbstractChannel | None = None
        self.tag = consumer.driver_options.amqp.consumer_tag or f"{consumer.id}.{uuid.uuid4().hex}"
        self.active = True
        self._open: dict[int, bool] = {}  # delivery tag -> acked, in delivery order
        self._flush_scheduled = False
        self._outbox: deque[tuple[int, bool, bool, bool]] = deque()  # tag, ack, multiple, requeue
        self._writer: asyncio.Future[None] | None = None

    async def attach(self, connection: aiormq.abc.AbstractConnection) -> None:
        channel = await connection.channel(publisher_confirms=False)
        await channel.basic_qos(prefetch_count=self.prefetch)
        self._open.clear()  # tags of an old channel mean nothing on the new one
        self._outbox.clear()
        if self._writer is not None:
            self._writer.cancel()  # it may hang on the dead connection's write queue
            self._writer = None
        self.channel = channel
        try:
            await channel.basic_consume(
                self.queue.external_name,
                self._on_message,
                consumer_tag=self.tag,
                exclusive=self.consumer.driver_options.amqp.exclusive,
            )
        except ChannelNotFoundEntity as exc:
            raise QueueError(
                Kind.NOT_FOUND, f"queue {self.queue.external_name} does not exist on the broker"
            ) from exc

    async def _on_message(self, message: aiormq.abc.DeliveredMessage) -> None:
        properties = message.header.properties
        headers = headers_from(properties)
        delivery_count = headers.pop("x-delivery-count", None)
        if isinstance(delivery_count, int):
            attempts = delivery_count + 1
        else:
            attempts = 2 if message.delivery.redelivered else 1  # type: ignore[union-attr]
        earlier = headers.pop(ATTEMPTS, 0)  # attempts before it was republished for a retry
        attempts += earlier if isinstance(earlier, int) else 0
        tag = int(message.delivery.delivery_tag)  # type: ignore[union-attr,arg-type]
        self._open[tag] = False
        self.on_delivery(
            AmqpDelivery(
                self,
                message.channel,
                tag,
                # another client may publish without an id; such a message gets a fresh one
                properties.message_id or uuid.uuid4().hex,
                message.body,
                headers,
                properties.content_type or "",
                attempts,
            )
        )

    def settle(self, tag: int, ack: bool, requeue: bool) -> None:
        channel = self.channel
        if tag not in self._open or channel is None or channel.is_closed:
            return  # from a channel that is gone: the broker has requeued it already
        if ack:
            self._open[tag] = True
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            return
        del self._open[tag]
        self._send((tag, False, False, requeue))

    def _flush(self) -> None:
        """Ack every leading acked tag with one frame."""
        self._flush_scheduled = False
        channel = self.channel
        if channel is None or channel.is_closed:
            return
        last = None
        for tag, acked in self._open.items():
            if not acked:
                break
            last = tag
        if last is not None:
            for tag in list(self._open):
                if tag > last:
                    break
                del self._open[tag]
            self._send((last, True, True, False))
        # acked tags behind an open one are sent on their own: none waits for a slow handler,
        # and each frees its prefetch slot at once
        stragglers = [tag for tag, acked in self._open.items() if acked]
        for tag in stragglers:
            del self._open[tag]
            self._send((tag, True, False, False))

    def _send(self, frame: tuple[int, bool, bool, bool]) -> None:
        """Queue a settlement frame. One writer per subscription keeps them in order: a single
        ack overtaken by a `multiple` ack covering it is an unknown tag to the broker, which
        then closes the channel."""
        self._outbox.append(frame)
        if self._writer is None or self._writer.done():
            self._writer = asyncio.ensure_future(self._write())

    async def _write(self) -> None:
        outbox = self._outbox
        writing = self.channel
        while outbox:
            tag, ack, multiple, requeue = outbox.popleft()
            channel = self.channel
            if channel is None or channel is not writing or channel.is_closed:
                outbox.clear()  # the broker requeues whatever that channel held
                return
            try:
                if ack:
                    await channel.basic_ack(tag, multiple=multiple, wait=False)
                else:
                    await channel.basic_nack(tag, requeue=requeue, wait=False)
            except (AMQPError, ChannelInvalidStateError, ConnectionError) as exc:
                _log.debug("settlement not sent: %s", exc)
                outbox.clear()
                return

    async def cancel(self) -> None:
        self.active = False
        channel = self.channel
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, ConnectionError):
                await channel.basic_cancel(self.tag)

    async def close(self) -> None:
        await self.cancel()
        channel, self.channel = self.channel, None
        self.driver.subscriptions.discard(self)
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(AMQPError, ChannelInvalidStateError, ConnectionError):
                await channel.close()


class AmqpDriver(Driver):
    def __init__(self, entry: AmqpDriverEntry) -> None:
        self.entry = entry
        self.subscriptions: set[AmqpSubscription] = set()
        self._declared: dict[str, QueueEntry] = {}
        self._connection: aiormq.abc.AbstractConnection | None = None
        self._publishers: list[aiormq.Channel] = []
        self._next_publisher = 0
        self._admin: aiormq.abc.AbstractChannel | None = None
        self._linked = asyncio.Event()
        self._recovery: asyncio.Task[None] | None = None
        self._closing = False
        self._ids = MessageIds()
        self._delay_queues: set[str] = set()

    @property
    def url(self) -> str:
        url = self.entry.url
        if self.entry.vhost is not None:
            parts = urlsplit(url)
            url = urlunsplit(parts._replace(path="/" + quote(self.entry.vhost, safe="")))
        query = []
        if self.entry.heartbeat is not None:
            query.append(f"heartbeat={round(self.entry.heartbeat)}")
        if self.entry.connection_name:
            query.append(f"name={quote(self.entry.connection_name)}")
        if query:
            url += ("&" if "?" in url else "?") + "&".join(query)
        return url

    async def _connect(self) -> None:
        connection = aiormq.Connection(self.url, context=ssl_context(self.entry))
        try:
            await asyncio.wait_for(connection.connect(), self.entry.connection_timeout)
            self._publishers = [
                cast(aiormq.Channel, await connection.channel(publisher_confirms=True))
                for _ in range(PUBLISHERS)
            ]
        except BaseException:
            with contextlib.suppress(Exception):
                await connection.close()
            raise
        self._connection = connection
        self._admin = None
        self._delay_queues = set()  # declared lazily, again on a new connection

    async def start(self) -> None:
        try:
            await self._connect()
        except (AMQPError, OSError, TimeoutError) as exc:
            raise QueueError(
                Kind.UNAVAILABLE,
                f"cannot connect to {safe_url(self.url)}: {exc or type(exc).__name__}",
                retryable=True,
            ) from exc
        self._linked.set()
        self._recovery = asyncio.create_task(self._keep_linked(), name=f"{self.entry.id}#link")

    async def _keep_linked(self) -> None:
        """Wait for the connection to drop; reconnect with backoff and restore what we had."""
        while not self._closing:
            assert self._connection is not None
            await asyncio.wait([self._connection.closing])
            if self._closing:
                return
            self._linked.clear()
            delay = self.entry.reconnect_delay
            _log.warning("connection lost, reconnecting", extra={"driver": self.entry.id})
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                    await self._restore()
                except (AMQPError, OSError, TimeoutError, QueueError) as exc:
                    _log.warning(
                        "reconnect failed, retrying",
                        extra={"driver": self.entry.id, "error": str(exc), "delay": delay},
                    )
                    if self._connection is not None and not self._connection.is_closed:
                        with contextlib.suppress(AMQPError, OSError):
                            await self._connection.close()  # a half-restored link
                    delay = min(delay * 2, self.entry.reconnect_max_delay)
                    continue
                _log.info("connection restored", extra={"driver": self.entry.id})
                self._linked.set()
                break

    async def _restore(self) -> None:
        """On a new connection (not yet linked): the queues, then the consumers."""
        assert self._connection is not None
        channel = await self._admin_on(self._connection)
        for queue in self._declared.values():
            await self._declare_on(channel, queue)
        for subscription in list(self.subscriptions):
            if subscription.active:
                await subscription.attach(self._connection)

    async def _link(self) -> aiormq.abc.AbstractConnection:
        if not self._linked.is_set():
            try:
                await asyncio.wait_for(self._linked.wait(), self.entry.connection_timeout)
            except TimeoutError as exc:
                raise QueueError(
                    Kind.UNAVAILABLE,
                    f"no connection to {safe_url(self.url)} for {self.entry.connection_timeout:g}s",
                    retryable=True,
                ) from exc
        assert self._connection is not None
        return self._connection

    async def _admin_channel(self) -> aiormq.abc.AbstractChannel:
        return await self._admin_on(await self._link())

    async def _admin_on(
        self, connection: aiormq.abc.AbstractConnection
    ) -> aiormq.abc.AbstractChannel:
        """A channel for declarations; a failed passive declare closes it, so reopen."""
        if self._admin is None or self._admin.is_closed:
            self._admin = await connection.channel(publisher_confirms=False)
        return self._admin

    async def close(self) -> None:
        self._closing = True
        for subscription in list(self.subscriptions):
            await subscription.close()
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        if self._connection is not None:
            with contextlib.suppress(AMQPError, OSError):
                await self._connection.close()

    async def _declare_on(self, channel: aiormq.abc.AbstractChannel, queue: QueueEntry) -> None:
        options = queue.driver_options.amqp
        try:
            await channel.queue_declare(
                queue.external_name,
                durable=options.durable,
                auto_delete=options.auto_delete,
                arguments=queue_arguments(queue, self.entry),
            )
        except ChannelPreconditionFailed as exc:
            raise QueueError(
                Kind.CONFLICT,
                f"queue {queue.external_name} exists on the broker with other options: {exc}",
            ) from exc

    async def declare(self, queue: QueueEntry) -> None:
        await self._declare_on(await self._admin_channel(), queue)
        self._declared[queue.external_name] = queue

    async def publish(
        self, queue: QueueEntry, body: bytes, headers: Mapping[str, Any], content_type: str
    ) -> str:
        message_id = str(headers.get("message_id") or self._ids.next())
        return await self._publish(queue, body, headers, content_type, message_id)

    async def republish(self, queue: QueueEntry, delivery: Delivery, delay: float) -> None:
        """The same message again, with the attempts it has had, for another try: straight
        into its queue, or into a delay queue whose TTL dead-letters it back there."""
        headers = {**delivery.headers, ATTEMPTS: delivery.attempts}
        route = await self._delay_queue(queue, delay) if delay > 0 else None
        await self._publish(
            queue, delivery.body, headers, delivery.content_type, delivery.id, route
        )

    async def _delay_queue(self, queue: QueueEntry, delay: float) -> str:
        """One queue per distinct delay, so its single TTL keeps it first-in first-out. No
        x-expires: RabbitMQ would delete it while messages still wait in it (publishes do not
        count as use); an idle, empty delay queue costs nothing."""
        milliseconds = max(_milliseconds(delay), 1)
        name = f"{queue.external_name}.retry.{milliseconds}ms"
        if name not in self._delay_queues:
            channel = await self._admin_channel()
            await channel.queue_declare(
                name,
                durable=queue.driver_options.amqp.durable,
                arguments={
                    "x-message-ttl": milliseconds,
                    "x-dead-letter-exchange": "",
                    "x-dead-letter-routing-key": queue.external_name,
                },
            )
            self._delay_queues.add(name)
        return name

    async def _publish(
        self,
        queue: QueueEntry,
        body: bytes,
        headers: Mapping[str, Any],
        content_type: str,
        message_id: str,
        route: str | None = None,
    ) -> str:
        if queue.external_name not in self._declared:
            raise QueueError(
                Kind.NOT_FOUND,
                f"queue {queue.external_name} is not declared on driver {self.entry.id}",
            )
        await self._link()
        self._next_publisher += 1
        channel = self._publishers[self._next_publisher % len(self._publishers)]
        properties = properties_for(
            headers, content_type, message_id, queue.driver_options.amqp.durable
        )
        try:
            confirmation = await channel.basic_publish(
                body,
                routing_key=route or queue.external_name,
                properties=properties,
                mandatory=True,
                # do not hold the channel's lock until the frame is on the socket: the broker's
                # confirmation is what this publish waits for
                wait=False,
            )
        except PublishError as exc:
            raise QueueError(
                Kind.NOT_FOUND,
                f"queue {queue.external_name} does not exist on the broker (message returned)",
            ) from exc
        except TypeError as exc:  # a header value AMQP's field tables cannot carry
            raise QueueError(Kind.INVALID, f"headers cannot be sent over AMQP: {exc}") from exc
        except (AMQPError, ChannelInvalidStateError, OSError) as exc:
            raise QueueError(
                Kind.INTERNAL, f"publish to {queue.external_name} failed: {exc}", retryable=True
            ) from exc
        if not isinstance(confirmation, Basic.Ack):
            raise QueueError(
                Kind.INTERNAL,
                f"the broker did not accept the message for {queue.external_name}",
                retryable=True,
            )
        return message_id

    async def info(self, queue: QueueEntry) -> QueueInfo:
        channel = await self._admin_channel()
        try:
            ok = await channel.queue_declare(queue.external_name, passive=True)
        except ChannelNotFoundEntity as exc:
            raise QueueError(
                Kind.NOT_FOUND, f"queue {queue.external_name} does not exist on the broker"
            ) from exc
        return QueueInfo(ok.message_count or 0, ok.consumer_count or 0)

    async def consume(
        self, queue: QueueEntry, consumer: ConsumerEntry, on_delivery: OnDelivery
    ) -> Subscription:
        prefetch = consumer.prefetch
        if "prefetch" not in consumer.model_fields_set and self.entry.prefetch_count:
            prefetch = self.entry.prefetch_count
        subscription = AmqpSubscription(self, queue, consumer, prefetch, on_delivery)
        await subscription.attach(await self._link())
        self.subscriptions.add(subscription)
        return subscription
