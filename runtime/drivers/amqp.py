"""RabbitMQ and any AMQP 0-9-1 broker, on luaq's own AMQP client (amqp_client.py).

What the broker needs to know is mapped here: headers to properties and back, queue options to
declare arguments, reply codes and connection failures to error kinds (nothing else leaves the
driver). Consecutive acks are coalesced into one `multiple` ack per loop iteration.

Two connections per driver, as RabbitMQ advises: one publishes, the other consumes, declares
and acks. Under a resource alarm the broker stops reading from publishing connections, and acks
on such a connection would stall with them; on their own they keep flowing and the queues drain.

Recovery is owned here, as aio-pika's robust connection does it: when a connection drops,
reconnect with exponential backoff, declare the queues again and re-attach every consumer;
publishes and declarations wait for the link (bounded) meanwhile. Every wait on the broker is
bounded: a broker that blocks or stalls gives an error, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
import uuid
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from ..entries import DEFAULT_RETRY, AmqpDriverEntry, ConsumerEntry, QueueEntry, Retry
from ..errors import ErrorKind, MaybePublished, QueueError
from ..headers import priority
from .amqp_client import (
    MALFORMED,
    Channel,
    ChannelClosed,
    ChannelGone,
    ChannelLimit,
    Confirm,
    Connection,
    Endpoint,
    HeadersTable,
    raw_fields,
)
from .base import (
    CLOSE_TIMEOUT,
    Delivery,
    Driver,
    MessageIds,
    OnDelivery,
    QueueInfo,
    Settlement,
    Subscription,
)

_log = logging.getLogger("luaq.amqp")
T = TypeVar("T")

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
ATTEMPTS = "x-luaq-attempts"  # attempts a retried message has had, carried in its headers
DELIVERY_COUNT = "x-delivery-count"  # a quorum queue's count of earlier deliveries
# The properties a retry or a dead letter passes on as they came (`headers` aside)
PASSED_ON = frozenset(
    {"content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
     "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
     "cluster_id"}
)  # fmt: skip
# A delay queue found missing is looked for again after this many seconds (a passive declare
# of a queue that does not exist costs a channel, and an error line in the broker's log)
ABSENT_RECHECK = 5.0
# Broker reply codes (channel closes) as error kinds
REPLY_KINDS = {
    403: ErrorKind.PERMISSION_DENIED,  # access refused
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.CONFLICT,  # resource locked: another connection's exclusive consumer
    406: ErrorKind.CONFLICT,  # precondition failed: declared before with other options
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


class AmqpHeaders(dict[str, Any]):
    """A delivery's headers as its handler sees them (headers_from), and the AMQP properties
    they came from: a retry or a dead letter passes those on as they were."""

    __slots__ = ("properties",)

    properties: Mapping[str, Any]


class Properties(dict[str, Any]):
    """AMQP properties made already, for a message passed on as it came: given to `_publish`
    as its headers, properties_for takes them as they are."""


def properties_for(
    headers: Mapping[str, Any], content_type: str, message_id: str, persistent: bool
) -> dict[str, Any]:
    if type(headers) is Properties:
        return headers
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


# content encodings that leave the body as it is: kombu (Celery) says utf-8 for JSON and
# binary for msgpack, Spring AMQP UTF-8
PLAIN_ENCODINGS = frozenset({"", "identity", "utf-8", "utf8", "binary"})


def unreadable_encoding(properties: Mapping[str, Any]) -> str | None:
    """A body compressed by another client (gzip, ...): luaq decodes none of them, so say that
    rather than let its codec fail on the compressed bytes."""
    encoding = properties.get("content_encoding")
    if encoding is None or encoding.lower() in PLAIN_ENCODINGS:
        return None
    return f"content encoding {encoding!r}: luaq reads bodies only as they are, uncompressed"


def expiration(value: Any) -> str:
    """A per-message TTL in milliseconds; the broker closes the channel on anything else."""
    text = str(value)
    if isinstance(value, bool) or not text.isdigit():
        raise QueueError(
            ErrorKind.INVALID, f"expiration must be a number of milliseconds, not {value!r}"
        )
    return text


def headers_from(properties: Mapping[str, Any]) -> AmqpHeaders:
    headers = AmqpHeaders()
    headers.properties = properties
    for key, name in PROPERTIES.items():
        value = properties.get(name)
        if value is not None:
            headers[key] = value
    table = properties.get("headers")
    if table:
        headers.update(table)  # as decoded: bytes, decimals, timestamps kept for a republish
    return headers


def passed_on(
    delivery: Delivery, user: str, extra: Mapping[str, Any], drop: tuple[str, ...] = ()
) -> Properties:
    """The properties of `delivery` for a copy sent on (a retry, a dead letter): as it came,
    every header of the wire type it had, with `extra` headers set and `drop` left out, and
    the broker's x-delivery-count too (a retry carries x-luaq-attempts).

    Two properties cannot go on as they are. `expiration`: the copy would expire out of a
    delay queue before its backoff, and out of a dead-letter queue; it goes in the header
    x_original_expiration instead (as RabbitMQ's own dead-lettering drops it). And `user_id`,
    unless it is the user luaq publishes as: RabbitMQ refuses any other (x_original_user_id)."""
    original: Mapping[str, Any] | None = getattr(delivery.headers, "properties", None)
    table: dict[str, Any] = {}
    if original is None:  # not from a broker (a test's delivery): as luaq would publish it
        original = properties_for(delivery.headers, delivery.content_type, delivery.id, True)
        table.update(original.get("headers") or {})
    elif isinstance(original.get("headers"), HeadersTable):
        table.update(raw_fields(original["headers"].raw))
    else:
        table.update(original.get("headers") or {})
    properties = {k: v for k, v in original.items() if k in PASSED_ON}
    properties["message_id"] = delivery.id
    for key in (DELIVERY_COUNT, *drop):
        table.pop(key, None)
    expiration = properties.pop("expiration", None)
    if expiration is not None:
        table.setdefault("x_original_expiration", expiration)
    user_id = properties.get("user_id")
    if user_id is not None and user_id != user:
        del properties["user_id"]
        table.setdefault("x_original_user_id", user_id)
    table.update(extra)
    if table:
        properties["headers"] = table
    return Properties({k: v for k, v in properties.items() if v is not None})


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
        problem: str | None,
    ) -> None:
        super().__init__(message_id, body, headers, content_type, attempts, problem)
        self._subscription = subscription
        self._channel = channel
        self._tag = tag

    @property
    def live(self) -> bool:
        channel = self._channel
        return (
            channel is self._subscription.channel
            and channel is not None
            and not (channel.is_closed)
        )

    async def _settle(self, ack: bool, requeue: bool) -> bool:
        # Tags restart on every channel: after a reconnect, this tag may name another message.
        if self._channel is not self._subscription.channel:
            return False
        return self._subscription.settle(self._tag, ack, requeue)

    async def retry(self, delay: float) -> bool:
        """A broker requeue only says "redelivered", so the count would stop at 2: publish the
        message again carrying its attempts (through a delay queue when it should wait), then
        ack this copy (at-least-once either way)."""
        if self.settled is not None:
            return True
        if not self.live:
            return False  # the broker has it back already; republishing would duplicate it
        subscription = self._subscription
        try:
            await subscription.driver.republish(subscription.queue, self, delay)
        except QueueError as exc:
            _log.warning(
                "retry by republish failed",
                extra={"queue": subscription.queue.external_name, "error": exc.message},
            )
            return False
        self.settled = Settlement.RETRY
        self.reached = await self._settle(ack=True, requeue=False)
        return True


class AmqpSubscription(Subscription):
    """A consumer on its own channel. Acks are coalesced: the lowest tag still open bounds a
    `multiple` ack, sent once per loop iteration; nacks go out at once. The connection writes
    frames in call order, so a nack always reaches the broker before a later `multiple` ack.

    Kept consuming, as aio-pika's robust channel does: when the broker cancels the consumer
    (its queue was deleted) or closes its channel (a consumer_timeout, say) while the
    connection lives on, `_recover` consumes again on a new channel, declaring the queue first
    when the broker says it is gone, with backoff, until that works or the subscription is
    cancelled. A lost connection is its Link's to recover, which attaches every subscription."""

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
        self.consuming = False  # the broker has this consumer, on self.channel
        self.tag = consumer.driver_options.amqp.consumer_tag or f"{consumer.id}.{uuid.uuid4().hex}"
        self.active = True
        self._open: dict[int, bool] = {}  # delivery tag -> acked, in delivery order
        self._flush_scheduled = False
        self._unsent = 0  # acks coalesced and not yet sent
        self._attaching = asyncio.Lock()  # recovery and a reconnect may attach at once
        self._recovery: asyncio.Task[None] | None = None
        self._missing = False  # the broker says the queue is gone: declare it before consuming
        self._closing: set[asyncio.Future[None]] = set()  # channels a failed attach left

    async def attach(self, connection: Connection) -> None:
        """Consume on `connection` on a new channel, unless this subscription already does
        (recovery may have attached it there meanwhile). A cancelled consumer's channel is
        closed first: a consumer takes one channel, and the broker may allow no more."""
        async with self._attaching:
            old = self.channel
            if not self.active or (self.attached and old and old.connection is connection):
                return
            if old is not None and not old.is_closed:
                await old.close()  # its deliveries are stale from now on
            channel = await connection.channel()
            try:
                channel.on_close = lambda reason: self._closed(channel, reason)
                await channel.qos(self.prefetch)
                self._open.clear()  # tags of an old channel mean nothing on the new one
                self._unsent = 0
                self.channel = channel
                await channel.consume(
                    self.queue.external_name,
                    self._on_message,
                    self.tag,
                    exclusive=self.consumer.driver_options.amqp.exclusive,
                    on_cancel=self._on_cancel,
                )
                if channel.closed_by is not None:  # closed before the consumer could be told
                    raise channel.closed_by
            except ChannelClosed as exc:
                what = f"cannot consume from queue {self.queue.external_name}"
                raise broker_error(exc, what) from exc
            except BaseException:
                if not channel.is_closed:  # (a timeout, a cancel): not left open behind us
                    closing = asyncio.ensure_future(channel.close())
                    self._closing.add(closing)
                    closing.add_done_callback(self._closing.discard)
                raise
            self.consuming = True

    def _closed(self, channel: Channel, reason: Exception) -> None:
        """`channel` closed. By the broker on a connection that lives on (a consumer_timeout,
        say): nothing else would ever consume again, so recover. With its connection: the
        Link reconnects and attaches us again."""
        if channel is not self.channel or not self.consuming:
            return  # an old channel, or one still attaching (attach raises)
        self.consuming = False
        if isinstance(reason, ChannelClosed) and not channel.connection.is_closed:
            self._recover(f"the broker closed the consumer's channel: {reason}", at_once=False)

    def _on_cancel(self) -> None:
        """The broker ended this consumer, because its queue was deleted: the entries file
        still wants it, so declare the queue again at once and consume anew (deliveries still
        held went with the old queue)."""
        self.consuming = False
        self._missing = True
        self._recover("the broker cancelled the consumer (its queue was deleted)", at_once=True)

    def _recover(self, why: str, at_once: bool) -> None:
        if self.active and (self._recovery is None or self._recovery.done()):
            name = f"{self.consumer.id}#recover"
            self._recovery = asyncio.create_task(self._recovering(why, at_once), name=name)

    async def _recovering(self, why: str, at_once: bool) -> None:
        """Consume again, with backoff (reconnect_delay doubling up to reconnect_max_delay),
        until this subscription is attached or cancelled; whatever fails is logged and tried
        again. The broker's reason is logged once, as each failed attempt is."""
        entry = self.driver.entry
        name = self.queue.external_name
        where = {"consumer": self.consumer.id, "queue": name}
        _log.warning("consumer lost, restoring it", extra={**where, "error": why})
        delay = entry.reconnect_delay
        wait = not at_once
        while self.active:
            if wait:
                await asyncio.sleep(delay)
                delay = min(delay * 2, entry.reconnect_max_delay)
            wait = True
            try:
                if self._missing:
                    await self.driver.declare(self.queue)
                    self._missing = False
                await self.driver.on_link(f"cannot consume from queue {name}", self.attach)
            except Exception as exc:
                if isinstance(exc, QueueError):
                    self._missing = self._missing or exc.kind is ErrorKind.NOT_FOUND
                    error = exc.message
                else:  # a bug, or something no one foresaw: the loop must go on
                    _log.exception("restoring a consumer failed", extra=where)
                    error = f"{type(exc).__name__}: {exc}"
                _log.warning(
                    "consumer not restored, retrying",
                    extra={**where, "error": error, "delay": delay},
                )
                continue
            if self.attached:
                _log.warning("consumer restored", extra=where)
                return

    def _on_message(
        self, tag: int, redelivered: bool, properties: dict[str, Any], body: bytes
    ) -> None:
        if self._flush_scheduled:
            # The acks of the last run of handlers go before this run's deliveries are read:
            # the loop reads its sockets before it runs the callback that would send them.
            self._flush()
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
                properties.get("message_id") or self.driver.ids.next(),
                body,
                headers,
                properties.get("content_type") or "",
                attempts,
                properties.get(MALFORMED) or unreadable_encoding(properties),
            )
        )

    def settle(self, tag: int, ack: bool, requeue: bool) -> bool:
        channel = self.channel
        if tag not in self._open or channel is None or channel.is_closed:
            return False  # from a channel that is gone: the broker has requeued it already
        if ack:
            self._open[tag] = True
            self._unsent += 1
            if not self._flush_scheduled:
                self._flush_scheduled = True
                asyncio.get_running_loop().call_soon(self._flush)
            return True
        del self._open[tag]
        channel.nack(tag, requeue)
        return True

    def _flush(self) -> None:
        """Ack every leading acked tag with one frame, and write at once: the next callback
        may be a handler that keeps the loop busy for a while."""
        self._flush_scheduled = False
        unsent, self._unsent = self._unsent, 0
        channel = self.channel
        if channel is None or channel.is_closed:
            return
        opened = self._open
        leading = []
        for tag, acked in opened.items():
            if not acked:
                break
            leading.append(tag)
        for tag in leading:
            del opened[tag]
        if leading:
            channel.ack(leading[-1], multiple=True)
        if len(leading) < unsent:
            # acked tags behind an open one are sent on their own: none waits for a slow
            # handler, and each frees its prefetch slot at once
            for tag in [tag for tag, acked in opened.items() if acked]:
                del opened[tag]
                channel.ack(tag)
        channel.connection.flush()

    @property
    def attached(self) -> bool:
        """Consuming now: the broker has this consumer, on a channel that is open."""
        channel = self.channel
        return self.consuming and channel is not None and not channel.is_closed

    async def cancel(self) -> None:
        self.active = False
        if self._recovery is not None:
            self._recovery.cancel()
        channel, consuming = self.channel, self.consuming
        self.consuming = False
        if consuming and channel is not None and not channel.is_closed:
            with contextlib.suppress(ChannelClosed, ConnectionError, TimeoutError):
                await channel.cancel(self.tag)

    async def close(self) -> None:
        await self.cancel()
        channel, self.channel = self.channel, None
        self.driver.subscriptions.discard(self)
        if channel is not None:
            await channel.close()


def broker_error(exc: ChannelClosed, what: str) -> QueueError:
    kind = REPLY_KINDS.get(exc.code, ErrorKind.INTERNAL)
    return QueueError(kind, f"{what}: {exc.text}", retryable=kind is ErrorKind.INTERNAL)


def channel_limit_error(exc: ChannelLimit, needed: int, what: str = "") -> QueueError:
    """A broker whose channel_max is below what luaq opens on one connection: no reconnection
    helps, its configuration must change."""
    reason = str(exc)
    if needed > exc.limit:
        reason = (
            f"the broker allows {exc.limit} channels per connection, luaq needs {needed}: "
            "raise channel_max"
        )
    return QueueError(ErrorKind.UNAVAILABLE, f"{what}: {reason}" if what else reason)


class Link:
    """One connection to the broker, kept up: when it drops, reconnect with backoff, and run
    `restore` on the new connection before anyone may use it."""

    def __init__(
        self, driver: AmqpDriver, role: str, restore: Callable[[Connection], Awaitable[None]]
    ) -> None:
        self.driver = driver
        self.role = role
        self.connection: Connection | None = None
        self._restore = restore
        self.reconnects = 0
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        try:
            await self._connect()
        except Exception as exc:  # whatever it is, a message, not a traceback
            _log.debug("connecting failed", exc_info=True)
            raise QueueError(
                ErrorKind.UNAVAILABLE,
                f"cannot connect to {self.driver.url}: {self._reason(exc)}",
                retryable=not isinstance(exc, ChannelLimit),
            ) from exc
        self._up.set()
        entry = self.driver.entry
        self._task = asyncio.create_task(self._keep(), name=f"{entry.id}#{self.role}")

    def channels_needed(self) -> int:
        """The channels the driver opens on this link's connection: the publisher's, or the
        declarations' and one per consumer."""
        if self.role == "publish":
            return 1
        return 1 + sum(1 for subscription in self.driver.subscriptions if subscription.active)

    async def _connect(self) -> None:
        async with asyncio.timeout(self.driver.entry.connection_timeout):
            connection = await Connection.open(self.driver.endpoint(self.role))
        try:
            if connection.channel_max < self.channels_needed():
                raise ChannelLimit(connection.channel_max)
            await self._restore(connection)
        except BaseException:
            connection.abort()
            raise
        self.connection = connection

    def _reason(self, exc: Exception) -> str:
        """Why connecting failed, for a log line or an error."""
        if isinstance(exc, ChannelLimit):
            return channel_limit_error(exc, self.channels_needed()).message
        if isinstance(exc, ChannelClosed | OSError | TimeoutError | QueueError):
            return str(exc) or type(exc).__name__
        return f"{type(exc).__name__}: {exc}"  # not expected: a bug, named

    async def _keep(self) -> None:
        """Wait for the connection to drop; reconnect with backoff and restore what we had.
        Nothing but close() ends this task: any failure is logged (once per distinct reason
        in an outage) and retried."""
        entry = self.driver.entry
        where = {"driver": entry.id, "connection": self.role}
        while not self._closing:
            assert self.connection is not None
            await asyncio.wait([self.connection.closed])
            if self._closing:
                return
            self._up.clear()
            delay = entry.reconnect_delay
            _log.warning(
                "connection lost, reconnecting",
                extra={**where, "error": str(self.connection.closed_by)},
            )
            told: set[str] = set()  # reasons logged in this outage
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                except Exception as exc:
                    reason = self._reason(exc)
                    expected = isinstance(exc, ChannelClosed | OSError | TimeoutError | QueueError)
                    level = logging.DEBUG if reason in told else logging.WARNING
                    told.add(reason)
                    _log.log(
                        level,
                        "reconnect failed, retrying",
                        extra={**where, "error": reason, "delay": delay},
                        exc_info=not expected and level == logging.WARNING,
                    )
                    delay = min(delay * 2, entry.reconnect_max_delay)
                    continue
                _log.info("connection restored", extra=where)
                self.reconnects += 1
                self._up.set()
                break

    async def get(self) -> Connection:
        """The connection; while it is down, wait for the recovery (at most
        connection_timeout)."""
        connection = self.connection
        if connection is not None and connection.closed_by is not None:
            # closed, or closing (its reason is set a loop turn before it is gone): the
            # recovery task is about to notice
            self._up.clear()
        if not self._up.is_set():
            timeout = self.driver.entry.connection_timeout
            try:
                async with asyncio.timeout(timeout):  # (wait_for may swallow a cancel on 3.11)
                    await self._up.wait()
            except TimeoutError as exc:
                raise QueueError(
                    ErrorKind.UNAVAILABLE,
                    f"no connection to {self.driver.url} for {timeout:g}s",
                    retryable=True,
                ) from exc
        assert self.connection is not None
        return self.connection

    @property
    def up(self) -> bool:
        connection = self.connection
        return self._up.is_set() and connection is not None and connection.closed_by is None

    def keepalive(self) -> None:
        if self.connection is not None and not self.connection.is_closed:
            self.connection.keepalive()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.connection is not None:
            await self.connection.close()

    def abort(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self.connection is not None:
            self.connection.abort()


class AmqpDriver(Driver):
    idle_after = 0.2

    def __init__(self, entry: AmqpDriverEntry) -> None:
        self.entry = entry
        self.subscriptions: set[AmqpSubscription] = set()
        self._declared: dict[str, QueueEntry] = {}
        # name -> (the queue it feeds, its TTL in ms); declared again after a reconnect
        self._delay_queues: dict[str, tuple[QueueEntry, int]] = {}
        self._delay_routes: dict[tuple[str, int], str] = {}  # (queue, TTL in ms) -> delay queue
        self._retries: dict[str, set[Retry]] = {}  # queue -> its consumers' retry policies here
        self._waits: dict[str, list[str]] = {}  # queue -> every delay queue it may have
        self._absent: dict[str, float] = {}  # delay queue found missing -> when to look again
        self._warned: set[str] = set()  # queues told to retry at-most-once
        self._user = Endpoint.from_url(entry.url).username  # user_id a publish may carry
        self._consuming = Link(self, "consume", self._restore)
        self._publishing = Link(self, "publish", self._open_publisher)
        self._publisher: Channel | None = None
        self._admin: Channel | None = None
        self._channel_lock = asyncio.Lock()
        self.ids = MessageIds()  # of messages published, and of those that came without one

    @property
    def url(self) -> str:
        """The broker's URL as logs and errors show it: password masked, vhost applied."""
        url = self.entry.url
        if self.entry.vhost is not None:
            parts = urlsplit(url)
            url = urlunsplit(parts._replace(path="/" + quote(self.entry.vhost, safe="")))
        return safe_url(url)

    def endpoint(self, role: str) -> Endpoint:
        entry = self.entry
        options: dict[str, Any] = {
            "name": f"{entry.connection_name or 'luaq ' + entry.id} ({role})",
            "tls": ssl_context(entry),
            "server_name": entry.tls.server_name,
            "timeout": entry.connection_timeout,
        }
        if entry.heartbeat is not None:
            options["heartbeat"] = round(entry.heartbeat)
        if entry.vhost is not None:
            options["vhost"] = entry.vhost
        return Endpoint.from_url(entry.url, **options)

    async def start(self) -> None:
        await self._consuming.start()
        try:
            await self._publishing.start()
        except BaseException:
            await self._consuming.close()
            raise

    async def _restore(self, connection: Connection) -> None:
        """On a new consuming connection (not yet linked): the queues, then the consumers."""
        channel = await self._admin_channel(connection)
        for queue in self._declared.values():
            await self._declare_on(channel, queue)
        for name, (queue, milliseconds) in self._delay_queues.items():
            await self._declare_delay_queue(channel, name, queue, milliseconds)
        for subscription in list(self.subscriptions):
            if subscription.active:
                await subscription.attach(connection)

    async def _open_publisher(self, connection: Connection) -> None:
        publisher = await connection.channel()
        await publisher.confirm_select()
        self._publisher = publisher

    async def on_link(self, what: str, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `operation` on the consuming connection; if that connection drops meanwhile,
        again on the recovered one, for at most connection_timeout. Failures leave as
        QueueError, named by `what`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.entry.connection_timeout
        while True:
            connection = await self._consuming.get()
            try:
                return await operation(connection)
            except ChannelClosed as exc:
                raise broker_error(exc, what) from exc
            except (TypeError, ValueError) as exc:  # a name or argument AMQP cannot carry
                raise QueueError(ErrorKind.INVALID, f"{what}: {exc}") from exc
            except TimeoutError as exc:
                raise QueueError(
                    ErrorKind.TIMEOUT,
                    f"{what}: no answer from the broker within {self.entry.connection_timeout:g}s",
                    retryable=True,
                ) from exc
            except ChannelLimit as exc:
                raise channel_limit_error(exc, self._consuming.channels_needed(), what) from exc
            except OSError as exc:  # the connection went: the recovery is on it
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise QueueError(
                        ErrorKind.UNAVAILABLE, f"{what}: {exc}", retryable=True
                    ) from exc
                # A connection the broker closed in the same read as its last reply fails the
                # next call at once, before it is gone: wait until it is, so that the next try
                # waits for the link's recovery instead of spinning on it, the loop frozen.
                await asyncio.wait([connection.closed], timeout=remaining)

    async def _with_admin(self, what: str, operation: Callable[[Channel], Awaitable[T]]) -> T:
        """`operation` on the channel for declarations, which a failed declaration closes (a
        passive one for a queue that is gone, say): a call queued behind that one is made
        again on a new channel."""

        async def on(connection: Connection) -> T:
            while True:
                try:
                    return await operation(await self._admin_channel(connection))
                except ChannelGone:
                    continue

        return await self.on_link(what, on)

    async def _admin_channel(self, connection: Connection) -> Channel:
        """A channel for declarations; a failed (passive) declare closes it, so reopen."""
        async with self._channel_lock:
            admin = self._admin
            if admin is None or admin.is_closed or admin.connection is not connection:
                admin = self._admin = await connection.channel()
            return admin

    async def _publisher_channel(self) -> Channel:
        """The confirm channel; the broker closes it on a publish it refuses, so reopen."""
        connection = await self._publishing.get()
        publisher = self._publisher
        if publisher is not None and not publisher.is_closed:
            return publisher
        async with self._channel_lock:
            if self._publisher is None or self._publisher.is_closed:
                await self._open_publisher(connection)
            assert self._publisher is not None
            return self._publisher

    @property
    def connected(self) -> bool:
        return self._consuming.up and self._publishing.up

    @property
    def reconnects(self) -> int:  # type: ignore[override]
        return self._consuming.reconnects + self._publishing.reconnects

    def keepalive(self) -> None:
        self._consuming.keepalive()
        self._publishing.keepalive()

    async def close(self) -> None:
        """Close the consumers, then both connections; whatever the broker does (a blocked
        connection is never read from again), within a few seconds."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                for subscription in list(self.subscriptions):
                    await subscription.close()
                await self._publishing.close()
                await self._consuming.close()
        except TimeoutError:
            _log.warning(
                "the broker did not answer the close; connections dropped",
                extra={"driver": self.entry.id},
            )
        finally:
            self._publishing.abort()
            self._consuming.abort()

    async def _declare_on(self, channel: Channel, queue: QueueEntry) -> None:
        options = queue.driver_options.amqp
        try:
            await channel.queue_declare(
                queue.external_name,
                durable=options.durable,
                auto_delete=options.auto_delete,
                arguments=queue_arguments(queue, self.entry),
            )
        except ChannelGone:
            raise
        except ChannelClosed as exc:
            what = f"cannot declare queue {queue.external_name}"
            if exc.code == 406:
                what = f"queue {queue.external_name} exists on the broker with other options"
            raise broker_error(exc, what) from exc

    async def declare(self, queue: QueueEntry) -> None:
        async def declare(channel: Channel) -> None:
            await self._declare_on(channel, queue)

        await self._with_admin(f"cannot declare queue {queue.external_name}", declare)
        self._declared[queue.external_name] = queue

    async def publish(
        self, queue: QueueEntry, body: bytes, headers: Mapping[str, Any], content_type: str
    ) -> str:
        message_id = str(headers.get("message_id") or self.ids.next())
        return await self._publish(queue, body, headers, content_type, message_id)

    async def republish(self, queue: QueueEntry, delivery: Delivery, delay: float) -> None:
        """The same message again, with the attempts it has had, for another try: straight
        into its queue, or into a delay queue whose TTL dead-letters it back there. It keeps
        its properties and headers as they came (passed_on)."""
        properties = passed_on(delivery, self._user, {ATTEMPTS: delivery.attempts})
        route = await self._delay_queue(queue, delay) if delay > 0 else None
        await self._publish(
            queue, delivery.body, properties, delivery.content_type, delivery.id, route
        )

    async def forward(
        self, queue: QueueEntry, delivery: Delivery, headers: Mapping[str, Any]
    ) -> None:
        """A dead letter: the message as it came (passed_on), `headers` added; never with an
        expiration, and without luaq's count of attempts (`headers` says it)."""
        properties = passed_on(delivery, self._user, headers, drop=(ATTEMPTS,))
        await self._publish(queue, delivery.body, properties, delivery.content_type, delivery.id)

    async def _delay_queue(self, queue: QueueEntry, delay: float) -> str:
        """One queue per distinct delay, so its single TTL keeps it first-in first-out. No
        x-expires: RabbitMQ would delete it while messages still wait in it (publishes do not
        count as use); an idle, empty delay queue costs nothing.

        A quorum queue, `<queue>.delay.<ms>ms`, whose dead-lettering is at-least-once: the
        broker hands an expired message back only once `<queue>` confirmed it, and keeps it
        while `<queue>` refuses it (full, with overflow reject-publish). A queue that is not
        durable (quorum queues are), or a broker that refuses quorum delay queues, gets a
        classic one, `<queue>.retry.<ms>ms`, as before: at-most-once, a warning says so."""
        milliseconds = max(_milliseconds(delay), 1)
        key = (queue.external_name, milliseconds)
        name = self._delay_routes.get(key)
        if name is not None and name in self._delay_queues:
            return name
        quorum = f"{queue.external_name}.delay.{milliseconds}ms"
        classic = f"{queue.external_name}.retry.{milliseconds}ms"

        async def declare(channel: Channel) -> str:
            if not queue.driver_options.amqp.durable:
                self._at_most_once(queue, "the queue is not durable, and quorum queues are")
                await self._declare_delay_queue(channel, classic, queue, milliseconds)
                return classic
            try:
                await self._declare_delay_queue_on(channel, quorum, queue, milliseconds)
                return quorum
            except ChannelGone:
                raise
            except ChannelClosed as exc:
                # 406 "inequivalent arg": a queue of that name exists with other arguments
                # (someone else's); the publish fails, and the message is held, not lost
                if exc.code != 406 or "inequivalent" in exc.text:
                    raise broker_error(exc, f"cannot declare delay queue {quorum}") from exc
                self._at_most_once(queue, f"the broker refused a quorum delay queue: {exc.text}")
            channel = await self._admin_channel(channel.connection)
            await self._declare_delay_queue(channel, classic, queue, milliseconds)
            return classic

        name = await self._with_admin(f"cannot declare delay queue {quorum}", declare)
        self._delay_queues[name] = (queue, milliseconds)
        self._delay_routes[key] = name
        self._absent.pop(name, None)
        return name

    def _at_most_once(self, queue: QueueEntry, why: str) -> None:
        if queue.external_name not in self._warned:
            self._warned.add(queue.external_name)
            _log.warning(
                "retries wait in classic delay queues: a retry whose queue is full when its "
                "delay ends is dropped (at-most-once)",
                extra={"queue": queue.external_name, "why": why},
            )

    async def _declare_delay_queue(
        self, channel: Channel, name: str, queue: QueueEntry, milliseconds: int
    ) -> None:
        try:
            await self._declare_delay_queue_on(channel, name, queue, milliseconds)
        except ChannelGone:
            raise
        except ChannelClosed as exc:
            raise broker_error(exc, f"cannot declare delay queue {name}") from exc

    async def _declare_delay_queue_on(
        self, channel: Channel, name: str, queue: QueueEntry, milliseconds: int
    ) -> None:
        """Quorum for a `.delay.` name, classic for a `.retry.` one (see _delay_queue)."""
        arguments: dict[str, Any] = {
            "x-message-ttl": milliseconds,
            "x-dead-letter-exchange": "",
            "x-dead-letter-routing-key": queue.external_name,
        }
        if name == f"{queue.external_name}.delay.{milliseconds}ms":
            arguments |= {
                "x-queue-type": "quorum",
                "x-dead-letter-strategy": "at-least-once",
                "x-overflow": "reject-publish",  # which at-least-once asks of its source
            }
        await channel.queue_declare(
            name, durable=queue.driver_options.amqp.durable, arguments=arguments
        )

    async def _publish(
        self,
        queue: QueueEntry,
        body: bytes,
        headers: Mapping[str, Any],
        content_type: str,
        message_id: str,
        route: str | None = None,
    ) -> str:
        name = queue.external_name
        if name not in self._declared:
            raise QueueError(
                ErrorKind.NOT_FOUND, f"queue {name} is not declared on driver {self.entry.id}"
            )
        properties = properties_for(
            headers, content_type, message_id, queue.driver_options.amqp.durable
        )
        confirmation = await self._send(name, route or name, body, properties, message_id)
        if confirmation == Confirm.RETURNED:
            # No queue took it, so nothing was enqueued: the queue was deleted behind our back.
            # The entries want it: declare it again and publish once more.
            await self._declare_again(queue, route)
            confirmation = await self._send(name, route or name, body, properties, message_id)
            if confirmation == Confirm.RETURNED:
                raise QueueError(
                    ErrorKind.NOT_FOUND,
                    f"queue {route or name} does not exist on the broker (message returned, "
                    "also after declaring the queue again)",
                )
        if confirmation != Confirm.ACK:
            raise QueueError(
                ErrorKind.INTERNAL,
                f"the broker did not accept the message for {name}",
                retryable=True,
            )
        return message_id

    async def _send(
        self,
        name: str,
        routing_key: str,
        body: bytes,
        properties: dict[str, Any],
        message_id: str,
    ) -> str:
        """One publish, and the broker's answer (a Confirm). A failure says whether anything
        was published: nothing, when the frames never left; once they did, only the broker's
        confirm tells, and without it the message may have been published (MaybePublished)."""
        timeout = self.entry.publish_timeout
        deadline = asyncio.get_running_loop().time() + timeout
        connection: Connection | None = None
        sent = False
        try:
            channel = self._publisher
            if channel is None or not channel.connection.publishable or channel.is_closed:
                # Only a publish that has to wait pays for a timer of its own; the channel
                # keeps one for the confirmations of all.
                async with asyncio.timeout_at(deadline):
                    channel = await self._publisher_channel()
                    connection = channel.connection
                    await connection.unblocked()
                    await connection.drained()
            connection = channel.connection
            confirmation = channel.publish(body, routing_key, properties, deadline)
            sent = True
            return await confirmation
        except (TypeError, ValueError) as exc:  # headers AMQP cannot carry, or too big
            raise QueueError(ErrorKind.INVALID, f"cannot publish to {name}: {exc}") from exc
        except TimeoutError as exc:
            if connection is None:
                raise QueueError(
                    ErrorKind.UNAVAILABLE,
                    f"no connection to {self.url} within {timeout:g}s: nothing was published "
                    f"to {name}",
                    retryable=True,
                ) from exc
            blocking = connection.blocked
            if not sent:
                why = "the connection to the broker could not take it"
                if blocking:
                    why = f"the broker is blocking publishers ({blocking})"
                raise QueueError(
                    ErrorKind.UNAVAILABLE,
                    f"{why}: nothing was published to {name} within {timeout:g}s",
                    retryable=True,
                ) from exc
            if blocking:
                # The broker blocks a connection once it reads a publish from it: the first
                # of a connection, and any sent before the block reached us, are in its hands.
                raise MaybePublished(
                    ErrorKind.UNAVAILABLE,
                    f"the broker is blocking publishers ({blocking}) and did not confirm "
                    f"message {message_id} to {name} within {timeout:g}s: it was sent before "
                    "the broker blocked, so it may have been published",
                    retryable=True,
                ) from exc
            raise MaybePublished(
                ErrorKind.TIMEOUT,
                f"no confirmation from the broker within {timeout:g}s for message {message_id} "
                f"to {name}: it may have been published",
                retryable=True,
            ) from exc
        except (ChannelClosed, OSError) as exc:
            kind = ErrorKind.INTERNAL if isinstance(exc, ChannelClosed) else ErrorKind.UNAVAILABLE
            if sent:
                raise MaybePublished(
                    kind,
                    f"publish to {name} failed: {exc}: message {message_id} was sent, so it "
                    "may have been published",
                    retryable=True,
                ) from exc
            raise QueueError(
                kind, f"publish to {name} failed: {exc}: nothing was published", retryable=True
            ) from exc

    async def _declare_again(self, queue: QueueEntry, route: str | None) -> None:
        """A publish came back unroutable: declare its queue (or the delay queue it went to)
        again."""
        _log.warning(
            "a publish was returned: its queue is gone from the broker, declaring it again",
            extra={"queue": route or queue.external_name},
        )
        if route is None:
            await self.declare(queue)
            return
        delay = self._delay_queues.get(route)
        if delay is None:  # forgotten meanwhile (found deleted): the next retry declares it
            raise QueueError(
                ErrorKind.NOT_FOUND,
                f"queue {route} does not exist on the broker (message returned)",
            )
        target, milliseconds = delay

        async def declare(channel: Channel) -> None:
            await self._declare_delay_queue(channel, route, target, milliseconds)

        await self._with_admin(f"cannot declare delay queue {route}", declare)
        self._absent.pop(route, None)

    def retries_with(self, queue: QueueEntry, retry: Retry) -> None:
        self._retries.setdefault(queue.external_name, set()).add(retry)
        self._waits.pop(queue.external_name, None)

    def _delay_queues_of(self, queue: QueueEntry) -> list[str]:
        """Every delay queue a retry of `queue` may wait in, whoever declared it: one per delay
        of its retry policies (its own or the default, and its consumers' here), quorum and
        classic (as before quorum ones, or for a queue that is not durable)."""
        name = queue.external_name
        waits = self._waits.get(name)
        if waits is None:
            policies = {queue.retry or DEFAULT_RETRY, *self._retries.get(name, ())}
            delays = sorted({max(_milliseconds(d), 1) for p in policies for d in p.delays()})
            waits = [f"{name}.{kind}.{ms}ms" for ms in delays for kind in ("delay", "retry")]
            self._waits[name] = waits
        known = [n for n, (q, _) in self._delay_queues.items() if q is queue]
        return [*waits, *(n for n in known if n not in waits)]

    async def info(self, queue: QueueEntry) -> QueueInfo:
        """Counts from a passive declare, plus what waits in the queue's delay queues: those
        of every delay its retry policies give, whoever declared them (an earlier process,
        say). One found missing is looked for again after ABSENT_RECHECK, or once this driver
        declares it. Messages a quorum delay queue holds back while their queue refuses them
        (full) are in no count: the broker's passive declare leaves them out."""
        name = queue.external_name
        places = self._delay_queues_of(queue)

        async def count(channel: Channel) -> QueueInfo:
            ok = await channel.queue_declare(name, passive=True)
            messages, consumers = ok.message_count or 0, ok.consumer_count or 0
            now = asyncio.get_running_loop().time()
            absent = self._absent
            for delay in places:
                if absent.get(delay, 0.0) > now:
                    continue
                try:
                    messages += (
                        await channel.queue_declare(delay, passive=True)
                    ).message_count or 0
                except ChannelClosed as exc:  # none, or deleted behind our back: none waits
                    if exc.code != 404 or isinstance(exc, ChannelGone):
                        raise
                    absent[delay] = now + ABSENT_RECHECK
                    self._delay_queues.pop(delay, None)  # declared again at its next use
                    channel = await self._admin_channel(channel.connection)
                else:
                    absent.pop(delay, None)
            return QueueInfo(messages, consumers)

        return await self._with_admin(f"no information on queue {name}", count)

    async def consume(
        self, queue: QueueEntry, consumer: ConsumerEntry, on_delivery: OnDelivery
    ) -> Subscription:
        prefetch = consumer.prefetch
        if "prefetch" not in consumer.model_fields_set and self.entry.prefetch_count:
            prefetch = self.entry.prefetch_count
        subscription = AmqpSubscription(self, queue, consumer, prefetch, on_delivery)
        self.subscriptions.add(subscription)  # from now on, a recovery attaches it too
        try:
            await self.on_link(
                f"cannot consume from queue {queue.external_name}", subscription.attach
            )
        except BaseException:
            subscription.active = False
            self.subscriptions.discard(subscription)
            raise
        return subscription
