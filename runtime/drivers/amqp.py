"""RabbitMQ and any AMQP 0-9-1 broker, on luaq's own AMQP client (amqp_client.py).

What the broker needs to know is mapped here: headers to properties and back, queue options to
declare arguments, reply codes to error kinds. Consecutive acks are coalesced into one
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
from collections.abc import Mapping
from typing import Any
from urllib.parse import quote, urlsplit, urlunsplit

from ..entries import AmqpDriverEntry, ConsumerEntry, QueueEntry
from ..errors import Kind, QueueError
from . import Delivery, Driver, OnDelivery, QueueInfo, Subscription
from .amqp_client import Channel, ChannelClosed, Confirm, Connection, Endpoint

_log = logging.getLogger("luaq.amqp")

# Header names that travel as AMQP properties (other clients read them there), with the
# property's name. The headers table carries everything else, and the originals of values a
# property cannot hold exactly.
PROPERTIES = {
    "correlation_id": "correlation_id",
    "reply_to": "reply_to",
    "message_type": "type",
    "expiration": "expiration",
    "priority": "priority",
}
PRIORITY_NAMES = {"low": 1, "normal": 5, "high": 9}
ATTEMPTS = "x-luaq-attempts"  # attempts a retried message has had, carried in its headers
# Broker reply codes (channel closes) as error kinds
REPLY_KINDS = {
    403: Kind.PERMISSION_DENIED,  # access refused
    404: Kind.NOT_FOUND,
    405: Kind.CONFLICT,  # resource locked: another connection's exclusive consumer
    406: Kind.CONFLICT,  # precondition failed: declared before with other options
}


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
) -> dict[str, Any]:
    table: dict[str, Any] = {}
    properties: dict[str, Any] = {
        "content_type": content_type,
        "delivery_mode": 2 if persistent else 1,
        "message_id": message_id,
    }
    for key, value in headers.items():
        name = PROPERTIES.get(key)
        if name is None:
            table[key] = value
        elif key == "priority":
            properties[name] = priority(value)
            if not isinstance(value, int):
                table[key] = value
        elif key == "expiration":
            properties[name] = expiration(value)
            if not isinstance(value, str):
                table[key] = value
        elif isinstance(value, str):
            properties[name] = value
        else:
            table[key] = value
    if table:
        properties["headers"] = table
    return properties


def expiration(value: Any) -> str:
    """A per-message TTL in milliseconds; the broker closes the channel on anything else."""
    text = str(value)
    if isinstance(value, bool) or not text.isdigit():
        raise QueueError(
            Kind.INVALID, f"expiration must be a number of milliseconds, not {value!r}"
        )
    return text


def headers_from(properties: Mapping[str, Any]) -> dict[str, Any]:
    headers: dict[str, Any] = {}
    for key, name in PROPERTIES.items():
        value = properties.get(name)
        if value is not None:
            headers[key] = value
    table = properties.get("headers")
    if table:
        for key, value in table.items():
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
        channel: Channel | None,
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
    `multiple` ack, sent once per loop iteration; nacks go out at once. The connection writes
    frames in call order, so a nack always reaches the broker before a later `multiple` ack."""

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
        self.channel: Channel | None = None
        self.tag = consumer.driver_options.amqp.consumer_tag or f"{consumer.id}.{uuid.uuid4().hex}"
        self.active = True
        self._open: dict[int, bool] = {}  # delivery tag -> acked, in delivery order
        self._flush_scheduled = False
        self._reattaching: asyncio.Future[None] | None = None

    async def attach(self, connection: Connection) -> None:
        channel = await connection.channel()
        await channel.qos(self.prefetch)
        self._open.clear()  # tags of an old channel mean nothing on the new one
        self.channel = channel
        try:
            await channel.consume(
                self.queue.external_name,
                self._on_message,
                self.tag,
                exclusive=self.consumer.driver_options.amqp.exclusive,
                on_cancel=self._on_cancel,
            )
        except ChannelClosed as exc:
            what = f"cannot consume from queue {self.queue.external_name}"
            raise broker_error(exc, what) from exc

    def _on_cancel(self) -> None:
        if self.active:
            self._reattaching = asyncio.ensure_future(self._reattach())

    async def _reattach(self) -> None:
        """The broker ended this consumer, because its queue was deleted: the entries file
        still wants it, so declare the queue again and consume anew (deliveries still held
        went with the old queue)."""
        old = self.channel
        try:
            await self.driver.declare(self.queue)
            await self.attach(await self.driver._link())
        except (QueueError, ChannelClosed, OSError) as exc:
            _log.error(
                "consumer not restored after the broker cancelled it",
                extra={"queue": self.queue.external_name, "error": str(exc)},
            )
            return
        _log.warning(
            "queue declared again and consumer restored",
            extra={"queue": self.queue.external_name},
        )
        if old is not None:
            await old.close()

    def _on_message(
        self, tag: int, redelivered: bool, properties: dict[str, Any], body: bytes
    ) -> None:
        headers = headers_from(properties)
        delivery_count = headers.pop("x-delivery-count", None)
        if isinstance(delivery_count, int):
            attempts = delivery_count + 1
        else:
            attempts = 2 if redelivered else 1
        earlier = headers.pop(ATTEMPTS, 0)  # attempts before it was republished for a retry
        attempts += earlier if isinstance(earlier, int) else 0
        self._open[tag] = False
        self.on_delivery(
            AmqpDelivery(
                self,
                self.channel,
                tag,
                # another client may publish without an id; such a message gets a fresh one
                properties.get("message_id") or uuid.uuid4().hex,
                body,
                headers,
                properties.get("content_type") or "",
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
        channel.nack(tag, requeue)

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
            channel.ack(last, multiple=True)
        # acked tags behind an open one are sent on their own: none waits for a slow handler,
        # and each frees its prefetch slot at once
        stragglers = [tag for tag, acked in self._open.items() if acked]
        for tag in stragglers:
            del self._open[tag]
            channel.ack(tag)

    async def cancel(self) -> None:
        self.active = False
        channel = self.channel
        if channel is not None and not channel.is_closed:
            with contextlib.suppress(ChannelClosed, ConnectionError):
                await channel.cancel(self.tag)

    async def close(self) -> None:
        if self._reattaching is not None:
            self._reattaching.cancel()
        await self.cancel()
        channel, self.channel = self.channel, None
        self.driver.subscriptions.discard(self)
        if channel is not None:
            await channel.close()


def broker_error(exc: ChannelClosed, what: str) -> QueueError:
    kind = REPLY_KINDS.get(exc.code, Kind.INTERNAL)
    return QueueError(kind, f"{what}: {exc.text}", retryable=kind is Kind.INTERNAL)


class AmqpDriver(Driver):
    def __init__(self, entry: AmqpDriverEntry) -> None:
        self.entry = entry
        self.subscriptions: set[AmqpSubscription] = set()
        self._declared: dict[str, QueueEntry] = {}
        self._connection: Connection | None = None
        self._publisher: Channel | None = None
        self._admin: Channel | None = None
        self._channel_lock = asyncio.Lock()
        self._linked = asyncio.Event()
        self._recovery: asyncio.Task[None] | None = None
        self._closing = False
        self._ids = MessageIds()
        self._delay_queues: set[str] = set()

    @property
    def url(self) -> str:
        """The broker's URL as logs and errors show it: password masked, vhost applied."""
        url = self.entry.url
        if self.entry.vhost is not None:
            parts = urlsplit(url)
            url = urlunsplit(parts._replace(path="/" + quote(self.entry.vhost, safe="")))
        return safe_url(url)

    def endpoint(self) -> Endpoint:
        entry = self.entry
        options: dict[str, Any] = {
            "name": entry.connection_name,
            "tls": ssl_context(entry),
            "server_name": entry.tls.server_name,
        }
        if entry.heartbeat is not None:
            options["heartbeat"] = round(entry.heartbeat)
        if entry.vhost is not None:
            options["vhost"] = entry.vhost
        return Endpoint.from_url(entry.url, **options)

    async def _connect(self) -> None:
        async with asyncio.timeout(self.entry.connection_timeout):
            connection = await Connection.open(self.endpoint())
        try:
            publisher = await connection.channel()
            await publisher.confirm_select()
        except BaseException:
            await connection.close()
            raise
        self._connection = connection
        self._publisher = publisher
        self._admin = None
        self._delay_queues = set()  # declared lazily, again on a new connection

    async def start(self) -> None:
        try:
            await self._connect()
        except (ChannelClosed, OSError, TimeoutError) as exc:
            raise QueueError(
                Kind.UNAVAILABLE,
                f"cannot connect to {self.url}: {exc or type(exc).__name__}",
                retryable=True,
            ) from exc
        self._linked.set()
        self._recovery = asyncio.create_task(self._keep_linked(), name=f"{self.entry.id}#link")

    async def _keep_linked(self) -> None:
        """Wait for the connection to drop; reconnect with backoff and restore what we had."""
        while not self._closing:
            assert self._connection is not None
            await asyncio.wait([self._connection.closed])
            if self._closing:
                return
            self._linked.clear()
            delay = self.entry.reconnect_delay
            _log.warning(
                "connection lost, reconnecting",
                extra={"driver": self.entry.id, "error": str(self._connection.closed_by)},
            )
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                    await self._restore()
                except (ChannelClosed, OSError, TimeoutError, QueueError) as exc:
                    _log.warning(
                        "reconnect failed, retrying",
                        extra={"driver": self.entry.id, "error": str(exc), "delay": delay},
                    )
                    if self._connection is not None:
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

    async def _link(self) -> Connection:
        if not self._linked.is_set():
            try:
                await asyncio.wait_for(self._linked.wait(), self.entry.connection_timeout)
            except TimeoutError as exc:
                raise QueueError(
                    Kind.UNAVAILABLE,
                    f"no connection to {self.url} for {self.entry.connection_timeout:g}s",
                    retryable=True,
                ) from exc
        assert self._connection is not None
        return self._connection

    async def _admin_channel(self) -> Channel:
        return await self._admin_on(await self._link())

    async def _admin_on(self, connection: Connection) -> Channel:
        """A channel for declarations; a failed (passive) declare closes it, so reopen."""
        async with self._channel_lock:
            if self._admin is None or self._admin.is_closed:
                self._admin = await connection.channel()
            return self._admin

    async def _publisher_channel(self) -> Channel:
        """The confirm channel; the broker closes it on a publish it refuses, so reopen."""
        connection = await self._link()
        publisher = self._publisher
        if publisher is not None and not publisher.is_closed:
            return publisher
        async with self._channel_lock:
            if self._publisher is None or self._publisher.is_closed:
                publisher = await connection.channel()
                await publisher.confirm_select()
                self._publisher = publisher
            return self._publisher

    async def close(self) -> None:
        self._closing = True
        for subscription in list(self.subscriptions):
            await subscription.close()
        if self._recovery is not None:
            self._recovery.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._recovery
        if self._connection is not None:
            await self._connection.close()

    async def _declare_on(self, channel: Channel, queue: QueueEntry) -> None:
        options = queue.driver_options.amqp
        try:
            await channel.queue_declare(
                queue.external_name,
                durable=options.durable,
                auto_delete=options.auto_delete,
                arguments=queue_arguments(queue, self.entry),
            )
        except ChannelClosed as exc:
            what = f"cannot declare queue {queue.external_name}"
            if exc.code == 406:
                what = f"queue {queue.external_name} exists on the broker with other options"
            raise broker_error(exc, what) from exc

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
            try:
                await channel.queue_declare(
                    name,
                    durable=queue.driver_options.amqp.durable,
                    arguments={
                        "x-message-ttl": milliseconds,
                        "x-dead-letter-exchange": "",
                        "x-dead-letter-routing-key": queue.external_name,
                    },
                )
            except ChannelClosed as exc:
                raise broker_error(exc, f"cannot declare delay queue {name}") from exc
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
        properties = properties_for(
            headers, content_type, message_id, queue.driver_options.amqp.durable
        )
        channel = await self._publisher_channel()
        try:
            await channel.connection.drained()
            confirmation = await channel.publish(body, route or queue.external_name, properties)
        except TypeError as exc:  # a header value AMQP's field tables cannot carry
            raise QueueError(Kind.INVALID, f"headers cannot be sent over AMQP: {exc}") from exc
        except (ChannelClosed, OSError) as exc:
            raise QueueError(
                Kind.INTERNAL, f"publish to {queue.external_name} failed: {exc}", retryable=True
            ) from exc
        if confirmation == Confirm.RETURNED:
            raise QueueError(
                Kind.NOT_FOUND,
                f"queue {queue.external_name} does not exist on the broker (message returned)",
            )
        if confirmation != Confirm.ACK:
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
        except ChannelClosed as exc:
            what = f"no information on queue {queue.external_name}"
            raise broker_error(exc, what) from exc
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
