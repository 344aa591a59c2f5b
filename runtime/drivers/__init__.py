"""The driver interface: what the runtime needs from a broker, and nothing more.

A driver declares queues, publishes encoded bodies, reports queue depth and pushes deliveries to
a callback, at most `prefetch` unsettled at a time. Settlement is on the delivery itself. The
memory driver and the AMQP driver implement it; the conformance suite holds them to it.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

from ..entries import ConsumerEntry, QueueEntry


@dataclass(frozen=True, slots=True)
class QueueInfo:
    message_count: int
    consumer_count: int


class Delivery(ABC):
    """One message handed to a consumer. The first settlement wins; later ones are no-ops, so
    a handler's early `msg:ack()` and the consumer's final settlement never conflict."""

    __slots__ = ("attempts", "body", "content_type", "headers", "id", "settled")

    def __init__(
        self,
        message_id: str,
        body: bytes,
        headers: Mapping[str, Any],
        content_type: str,
        attempts: int,
    ) -> None:
        self.id = message_id
        self.body = body
        self.headers = headers
        self.content_type = content_type
        self.attempts = attempts
        self.settled: bool | None = None  # True once acked, False once nacked

    async def ack(self) -> None:
        if self.settled is None:
            self.settled = True
            await self._settle(ack=True, requeue=False)

    async def nack(self, requeue: bool = True) -> None:
        """Give the message back (requeue) or drop it (requeue=False, a rejection)."""
        if self.settled is None:
            self.settled = False
            await self._settle(ack=False, requeue=requeue)

    async def retry(self, delay: float = 0.0) -> None:
        """Give the message back for another attempt, counted in `attempts` next time, ready
        again after `delay` seconds. Drivers whose broker does not count redeliveries
        republish it with its count instead."""
        await self.nack()

    @abstractmethod
    async def _settle(self, ack: bool, requeue: bool) -> None: ...


OnDelivery = Callable[[Delivery], None]


class Subscription(ABC):
    @abstractmethod
    async def cancel(self) -> None:
        """Stop new deliveries; those already handed out can still be settled."""

    @abstractmethod
    async def close(self) -> None:
        """Cancel, and give every still-unsettled delivery back to the queue."""


class Driver(ABC):
    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None: ...

    @abstractmethod
    async def declare(self, queue: QueueEntry) -> None:
        """Create the queue if it does not exist; declaring again changes nothing."""

    @abstractmethod
    async def publish(
        self, queue: QueueEntry, body: bytes, headers: Mapping[str, Any], content_type: str
    ) -> str:
        """Enqueue a message and return its id; raises QueueError (NOT_FOUND, INTERNAL)."""

    @abstractmethod
    async def info(self, queue: QueueEntry) -> QueueInfo: ...

    @abstractmethod
    async def consume(
        self,
        queue: QueueEntry,
        consumer: ConsumerEntry,
        on_delivery: OnDelivery,
    ) -> Subscription: ...
