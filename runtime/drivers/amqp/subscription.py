"""A consumer on the broker, kept consuming, and the deliveries it hands out."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import uuid
from collections.abc import Mapping
from typing import TYPE_CHECKING, Any

from ...entries import ConsumerEntry, QueueEntry
from ...errors import ErrorKind, QueueError
from ...logs import LogBudget
from ..base import Delivery, OnDelivery, Settlement, Subscription
from .client import MALFORMED, Channel, ChannelClosed, Connection
from .mapping import ATTEMPTS, headers_from, unreadable_encoding

if TYPE_CHECKING:
    from .driver import AmqpDriver

_log = logging.getLogger("luaq.amqp")


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
        except QueueError as exc:  # (for every message, while the broker blocks publishes)
            subscription.log_budget.log(
                _log,
                logging.WARNING,
                "retry by republish failed",
                {
                    "consumer": subscription.consumer.id,
                    "queue": subscription.queue.external_name,
                    "error": exc.message,
                },
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
        self.log_budget = LogBudget()  # for lines about one of its deliveries
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
                with self.driver.consuming.errors(
                    f"cannot consume from queue {self.queue.external_name}"
                ):
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
                    if channel.closed_by is not None:  # closed before the consumer was told
                        raise channel.closed_by
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
                await self.driver.consuming.run(f"cannot consume from queue {name}", self.attach)
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
        if isinstance(earlier, int) and not isinstance(earlier, bool):
            attempts += earlier
        else:  # (luaq writes an integer: another publisher's, and not counted)
            self.log_budget.log(
                _log,
                logging.WARNING,
                f"{ATTEMPTS} is no integer: not counted",
                {
                    "consumer": self.consumer.id,
                    "queue": self.queue.external_name,
                    "given": repr(earlier)[:40],
                },
            )
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
        self.log_budget.flush(_log, {"consumer": self.consumer.id})
        channel, self.channel = self.channel, None
        self.driver.subscriptions.discard(self)
        if channel is not None:
            await channel.close()
