"""The embedded in-memory broker: AMQP-like semantics inside one process, for laptops and tests.

Queues are bounded deques; consumers get deliveries pushed round-robin up to their prefetch;
nack requeues at the tail with the same id; closing a subscription requeues what it held, as a
broker does when a channel dies. Nothing survives the process.
"""

from __future__ import annotations

import asyncio
import itertools
from collections import deque
from collections.abc import Mapping
from typing import Any

from ..entries import ConsumerEntry, MemoryDriverEntry, QueueEntry
from ..errors import ErrorKind, QueueError
from .base import Delivery, Driver, MessageIds, OnDelivery, QueueInfo, Settlement, Subscription


class _Message:
    __slots__ = ("attempts", "body", "content_type", "headers", "id")

    def __init__(self, message_id: str, body: bytes, headers: dict[str, Any], content_type: str):
        self.id = message_id
        self.body = body
        self.headers = headers
        self.content_type = content_type
        self.attempts = 0


class _Queue:
    def __init__(self, name: str, max_length: int) -> None:
        self.name = name
        self.max_length = max_length
        self.ready: deque[_Message] = deque()
        self.subscriptions: list[MemorySubscription] = []
        self._next = 0
        self._space = asyncio.Event()
        self._space.set()
        self.delayed = 0  # waiting to be retried: still in the queue, not ready yet

    def delay(self, message: _Message, seconds: float) -> None:
        self.delayed += 1
        asyncio.get_running_loop().call_later(seconds, self._ready_again, message)

    def _ready_again(self, message: _Message) -> None:
        self.delayed -= 1
        self.ready.append(message)
        self.dispatch()

    async def wait_for_space(self, patience: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + patience
        while len(self.ready) >= self.max_length:
            self._space.clear()
            remaining = deadline - loop.time()
            if remaining <= 0:
                raise QueueError(
                    ErrorKind.INTERNAL,
                    f"queue {self.name} is full ({self.max_length} messages) "
                    f"and stayed full for {patience:g}s",
                    retryable=True,
                )
            try:
                async with asyncio.timeout(remaining):
                    await self._space.wait()
            except TimeoutError:
                continue

    def dispatch(self) -> None:
        """Hand ready messages to subscriptions with free prefetch slots, round-robin."""
        subscriptions = self.subscriptions
        ready = self.ready
        while ready and subscriptions:
            count = len(subscriptions)
            for _ in range(count):
                subscription = subscriptions[self._next % count]
                self._next += 1
                if len(subscription.unsettled) < subscription.prefetch:
                    break
            else:
                break
            message = ready.popleft()
            message.attempts += 1
            subscription.deliver(message)
        if len(ready) < self.max_length:
            self._space.set()


class MemoryDelivery(Delivery):
    __slots__ = ("_subscription", "_tag")

    def __init__(self, subscription: MemorySubscription, message: _Message, tag: int) -> None:
        super().__init__(
            message.id, message.body, message.headers, message.content_type, message.attempts
        )
        self._subscription = subscription
        self._tag = tag

    async def _settle(self, ack: bool, requeue: bool) -> bool:
        return self._subscription.settle(self._tag, requeue=requeue and not ack)

    async def retry(self, delay: float) -> bool:
        if self.settled is None:
            self.settled = Settlement.RETRY
            self.reached = self._subscription.settle_later(self._tag, delay)
        return True


class MemorySubscription(Subscription):
    def __init__(self, queue: _Queue, prefetch: int, on_delivery: OnDelivery) -> None:
        self.queue = queue
        self.prefetch = prefetch
        self.on_delivery = on_delivery
        self.unsettled: dict[int, _Message] = {}
        self._tags = itertools.count()

    def deliver(self, message: _Message) -> None:
        tag = next(self._tags)
        self.unsettled[tag] = message
        self.on_delivery(MemoryDelivery(self, message, tag))

    def settle_later(self, tag: int, delay: float) -> bool:
        message = self.unsettled.pop(tag, None)
        if message is None:
            return False  # given back already, when the subscription closed
        self.queue.delay(message, delay)
        self.queue.dispatch()
        return True

    def settle(self, tag: int, requeue: bool) -> bool:
        message = self.unsettled.pop(tag, None)
        if message is None:
            return False
        if requeue:
            self.queue.ready.append(message)
        self.queue.dispatch()
        return True

    @property
    def attached(self) -> bool:
        return self in self.queue.subscriptions

    async def cancel(self) -> None:
        if self in self.queue.subscriptions:
            self.queue.subscriptions.remove(self)

    async def close(self) -> None:
        await self.cancel()
        held = list(self.unsettled.values())
        self.unsettled.clear()
        self.queue.ready.extendleft(reversed(held))
        self.queue.dispatch()


class MemoryDriver(Driver):
    def __init__(self, entry: MemoryDriverEntry) -> None:
        self.entry = entry
        self._queues: dict[str, _Queue] = {}
        self._ids = MessageIds()

    @property
    def connected(self) -> bool:
        return True

    async def start(self) -> None:
        return None

    def keepalive(self) -> None:
        return None  # nothing outside the process waits for this one

    async def close(self) -> None:
        for queue in self._queues.values():
            for subscription in list(queue.subscriptions):
                await subscription.close()

    def _queue(self, queue: QueueEntry) -> _Queue:
        found = self._queues.get(queue.external_name)
        if found is None:
            raise QueueError(
                ErrorKind.NOT_FOUND,
                f"queue {queue.external_name} is not declared on driver {self.entry.id}",
            )
        return found

    async def declare(self, queue: QueueEntry) -> None:
        name = queue.external_name
        if name not in self._queues:
            self._queues[name] = _Queue(name, queue.driver_options.memory.max_length)

    async def publish(
        self, queue: QueueEntry, body: bytes, headers: Mapping[str, Any], content_type: str
    ) -> str:
        target = self._queue(queue)
        if len(target.ready) >= target.max_length:
            await target.wait_for_space(self.entry.publish_timeout)
        message_id = str(headers.get("message_id") or self._ids.next())
        target.ready.append(_Message(message_id, body, dict(headers), content_type))
        target.dispatch()
        return message_id

    async def info(self, queue: QueueEntry) -> QueueInfo:
        target = self._queue(queue)
        return QueueInfo(
            len(target.ready) + target.delayed, len(target.subscriptions), target.delayed
        )

    async def consume(
        self, queue: QueueEntry, consumer: ConsumerEntry, on_delivery: OnDelivery
    ) -> Subscription:
        target = self._queue(queue)
        subscription = MemorySubscription(target, consumer.prefetch, on_delivery)
        target.subscriptions.append(subscription)
        target.dispatch()
        return subscription
