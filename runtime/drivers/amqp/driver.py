"""The AMQP driver: two links to the broker, the queues declared on it, publishes with
confirms, and subscriptions.

Two connections per driver, as RabbitMQ advises: one publishes, the other consumes, declares
and acks. Under a resource alarm the broker stops reading from publishing connections, and acks
on such a connection would stall with them; on their own they keep flowing and the queues drain.
When a link recovers, the consuming one declares the queues again and re-attaches every consumer
before anyone may use it.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Mapping
from typing import Any, TypeVar

from ...entries import DEFAULT_RETRY, AmqpDriverEntry, ConsumerEntry, QueueEntry, Retry
from ...errors import ErrorKind, MaybePublished, QueueError
from ..base import CLOSE_TIMEOUT, Delivery, Driver, MessageIds, OnDelivery, QueueInfo, Subscription
from .client import Channel, ChannelClosed, ChannelGone, Confirm, Connection, Endpoint
from .link import Link
from .mapping import ATTEMPTS, passed_on, properties_for, queue_arguments, to_milliseconds
from .subscription import AmqpSubscription

_log = logging.getLogger("luaq.amqp")
T = TypeVar("T")
# A delay queue found missing is looked for again after this many seconds (a passive declare
# of a queue that does not exist costs a channel, and an error line in the broker's log)
ABSENT_RECHECK = 5.0


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
        # the declarations' channel and one per consumer on the consuming connection
        self.consuming = Link(
            entry,
            "consume",
            self._restore,
            lambda: 1 + sum(1 for subscription in self.subscriptions if subscription.active),
        )
        self.publishing = Link(entry, "publish", self._open_publisher, lambda: 1)
        self._publisher: Channel | None = None
        self._admin: Channel | None = None
        self._channel_lock = asyncio.Lock()
        self.ids = MessageIds()  # of messages published, and of those that came without one

    async def start(self) -> None:
        await self.consuming.start()
        try:
            await self.publishing.start()
        except BaseException:
            await self.consuming.close()
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

        return await self.consuming.run(what, on)

    async def _admin_channel(self, connection: Connection) -> Channel:
        """A channel for declarations; a failed (passive) declare closes it, so reopen."""
        async with self._channel_lock:
            admin = self._admin
            if admin is None or admin.is_closed or admin.connection is not connection:
                admin = self._admin = await connection.channel()
            return admin

    async def _publisher_channel(self) -> Channel:
        """The confirm channel; the broker closes it on a publish it refuses, so reopen."""
        connection = await self.publishing.get()
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
        return self.consuming.up and self.publishing.up

    @property
    def reconnects(self) -> int:  # type: ignore[override]
        return self.consuming.reconnects + self.publishing.reconnects

    def keepalive(self) -> None:
        self.consuming.keepalive()
        self.publishing.keepalive()

    async def close(self) -> None:
        """Close the consumers, then both connections; whatever the broker does (a blocked
        connection is never read from again), within a few seconds."""
        try:
            async with asyncio.timeout(CLOSE_TIMEOUT):
                for subscription in list(self.subscriptions):
                    await subscription.close()
                await self.publishing.close()
                await self.consuming.close()
        except TimeoutError:
            _log.warning(
                "the broker did not answer the close; connections dropped",
                extra={"driver": self.entry.id},
            )
        finally:
            self.publishing.abort()
            self.consuming.abort()

    async def _declare_on(self, channel: Channel, queue: QueueEntry) -> None:
        options, name = queue.driver_options.amqp, queue.external_name
        with self.consuming.errors(
            f"cannot declare queue {name}",
            again=True,
            conflict=f"queue {name} exists on the broker with other options",
        ):
            await channel.queue_declare(
                name,
                durable=options.durable,
                auto_delete=options.auto_delete,
                arguments=queue_arguments(queue, self.entry),
            )

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
        milliseconds = max(to_milliseconds(delay), 1)
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
            with self.consuming.errors(f"cannot declare delay queue {quorum}", again=True):
                try:
                    await self._declare_delay_queue_on(channel, quorum, queue, milliseconds)
                    return quorum
                except ChannelClosed as exc:
                    # 406 "inequivalent arg": a queue of that name exists with other arguments
                    # (someone else's); the publish fails, and the message is held, not lost
                    gone = isinstance(exc, ChannelGone)  # (made again on a new channel)
                    if gone or exc.code != 406 or "inequivalent" in exc.text:
                        raise
                    refusal = exc.text
            self._at_most_once(queue, f"the broker refused a quorum delay queue: {refusal}")
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
        with self.consuming.errors(f"cannot declare delay queue {name}", again=True):
            await self._declare_delay_queue_on(channel, name, queue, milliseconds)

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
                    f"no connection to {self.publishing.url} within {timeout:g}s: nothing was "
                    f"published to {name}",
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
            delays = sorted({max(to_milliseconds(d), 1) for p in policies for d in p.delays()})
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
            ready, consumers, delayed = ok.message_count or 0, ok.consumer_count or 0, 0
            now = asyncio.get_running_loop().time()
            absent = self._absent
            for delay in places:
                if absent.get(delay, 0.0) > now:
                    continue
                try:
                    delayed += (await channel.queue_declare(delay, passive=True)).message_count or 0
                except ChannelClosed as exc:  # none, or deleted behind our back: none waits
                    if exc.code != 404 or isinstance(exc, ChannelGone):
                        raise
                    absent[delay] = now + ABSENT_RECHECK
                    self._delay_queues.pop(delay, None)  # declared again at its next use
                    channel = await self._admin_channel(channel.connection)
                else:
                    absent.pop(delay, None)
            return QueueInfo(ready + delayed, consumers, delayed)

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
            await self.consuming.run(
                f"cannot consume from queue {queue.external_name}", subscription.attach
            )
        except BaseException:
            subscription.active = False
            self.subscriptions.discard(subscription)
            raise
        return subscription
