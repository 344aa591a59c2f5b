"""The driver interface: what the runtime needs from a broker, and nothing more.

A driver declares queues, publishes encoded bodies, reports queue depth and pushes deliveries to
a callback, at most `prefetch` unsettled at a time. Settlement is on the delivery itself. The
memory driver and the AMQP driver implement it; the conformance suite holds them to it.
"""

from __future__ import annotations

import itertools
import os
from abc import ABC, abstractmethod
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from enum import StrEnum
from typing import Any

from ..entries import ConsumerEntry, QueueEntry, Retry

# For closing a subscription or a driver, after which connections are dropped: a worker spends
# twice that after its shutdown timeout, within its supervisor's KILL_MARGIN; one that cannot say
# goodbye to its broker in time drops the connection, and the broker gives back what it held.
CLOSE_TIMEOUT = 0.3


@dataclass(frozen=True, slots=True)
class QueueInfo:
    """A queue's ready messages and those waiting out a retry's delay (`delayed_count` of
    them; both are still the queue's: `--until-idle` waits for them too), and its consumers."""

    message_count: int
    consumer_count: int
    delayed_count: int = 0


class Settlement(StrEnum):
    """How a delivery was settled; metrics and summaries count by these, in this order.

    A driver settles with ACK, RETRY, REQUEUE or REJECT; DEAD_LETTER and STALE are what the
    consumer counts besides: an ack once the message's copy is in its dead-letter queue, and a
    settlement that did not reach the broker (its channel had closed: the broker delivers the
    message again)."""

    ACK = "ack"
    RETRY = "retry"  # given back for another attempt, after a delay
    REQUEUE = "requeue"  # given back at once (shutdown)
    DEAD_LETTER = "dead_letter"  # moved to the queue's dead-letter queue
    REJECT = "reject"  # dropped (a broker may dead-letter it by its own policy)
    STALE = "stale"  # the broker could not be told


class MessageIds:
    """Unique message ids without a uuid per message: a random 64-bit prefix per driver
    instance (so per process) and a counter."""

    def __init__(self) -> None:
        self._prefix = os.urandom(8).hex()
        self._counter = itertools.count(1)

    def next(self) -> str:
        return f"{self._prefix}{next(self._counter):08x}"


class Delivery(ABC):
    """One message handed to a consumer. The first settlement wins; later ones are no-ops, so
    a handler's early `msg:ack()` and the consumer's final settlement never conflict.

    `reached` tells whether the settlement got to the broker: not when the channel the message
    came on has closed meanwhile, and the broker then delivers it again (at-least-once)."""

    __slots__ = (
        "attempts", "body", "content_type", "headers", "id", "problem", "reached", "settled",
    )  # fmt: skip

    def __init__(
        self,
        message_id: str,
        body: bytes,
        headers: Mapping[str, Any],
        content_type: str,
        attempts: int,
        problem: str | None = None,
    ) -> None:
        self.id = message_id
        self.body = body
        self.headers = headers
        self.content_type = content_type
        self.attempts = attempts
        self.problem = problem  # why the driver could not read the message (it is poison)
        self.settled: Settlement | None = None
        self.reached = False

    @property
    def live(self) -> bool:
        """False once the message cannot be settled any more (its channel is gone): the broker
        has given it back to the queue, and handling it would only duplicate it."""
        return True

    async def ack(self) -> None:
        if self.settled is None:
            self.settled = Settlement.ACK
            self.reached = await self._settle(ack=True, requeue=False)

    async def nack(self, requeue: bool = True) -> None:
        """Give the message back at once (requeue) or drop it (requeue=False, a rejection)."""
        if self.settled is None:
            self.settled = Settlement.REQUEUE if requeue else Settlement.REJECT
            self.reached = await self._settle(ack=False, requeue=requeue)

    @abstractmethod
    async def retry(self, delay: float) -> bool:
        """Give the message back for another attempt, ready again after `delay` seconds and
        counted in `attempts` then. False when the driver could not (the message is still
        unsettled): the caller must not requeue it at once, or a failing message would spin."""

    @abstractmethod
    async def _settle(self, ack: bool, requeue: bool) -> bool:
        """Settle with the broker; False when it cannot be reached for this delivery."""


OnDelivery = Callable[[Delivery], None]


class Subscription(ABC):
    @property
    @abstractmethod
    def attached(self) -> bool:
        """Deliveries can arrive: consuming on a live connection."""

    @abstractmethod
    async def cancel(self) -> None:
        """Stop new deliveries; those already handed out can still be settled."""

    @abstractmethod
    async def close(self) -> None:
        """Cancel, and give every still-unsettled delivery back to the queue."""


class Driver(ABC):
    reconnects = 0  # connections re-established after a loss
    # How long empty queues must stay empty before `--until-idle` believes them: with a remote
    # broker a message can be in none of the counts for a moment (on the wire to a consumer, or
    # expired from a delay queue and on its way back to its own).
    idle_after = 0.0

    @property
    @abstractmethod
    def connected(self) -> bool:
        """Every connection the driver needs is up."""

    @abstractmethod
    async def start(self) -> None: ...

    @abstractmethod
    async def close(self) -> None:
        """Let go of the broker, giving back what is unsettled; within CLOSE_TIMEOUT even when
        the broker does not answer."""

    @abstractmethod
    def keepalive(self) -> None:
        """Called, time and again, while a handler keeps the event loop busy: send what cannot
        wait for the loop's next turn, such as heartbeats. Synchronous and cheap."""

    @abstractmethod
    async def declare(self, queue: QueueEntry) -> None:
        """Create the queue if it does not exist; declaring again changes nothing."""

    @abstractmethod
    async def publish(
        self, queue: QueueEntry, body: bytes, headers: Mapping[str, Any], content_type: str
    ) -> str:
        """Enqueue a message and return its id; raises QueueError (NOT_FOUND, INVALID,
        UNAVAILABLE, TIMEOUT, INTERNAL), never anything else."""

    async def forward(
        self, queue: QueueEntry, delivery: Delivery, headers: Mapping[str, Any]
    ) -> None:
        """Publish `delivery` to `queue` as it came, with `headers` added: the same id, body
        and headers, and on a broker the same properties and header types. For a dead letter,
        which must never expire: an `expiration` moves to the x_original_expiration header."""
        carried = {**delivery.headers, "message_id": delivery.id}
        if "expiration" in carried:
            carried["x_original_expiration"] = carried.pop("expiration")
        await self.publish(queue, delivery.body, {**carried, **headers}, delivery.content_type)

    def retries_with(self, queue: QueueEntry, retry: Retry) -> None:
        """A consumer of `queue` in this process retries with `retry`: `info` counts what waits
        out those delays too (beside the queue's own `retry`, or the default)."""
        return None  # a driver whose `info` counts delayed messages without knowing the delays

    @abstractmethod
    async def info(self, queue: QueueEntry) -> QueueInfo:
        """Messages in the queue, those waiting for a retry included (and counted apart), and
        its consumers."""

    @abstractmethod
    async def consume(
        self,
        queue: QueueEntry,
        consumer: ConsumerEntry,
        on_delivery: OnDelivery,
    ) -> Subscription: ...
