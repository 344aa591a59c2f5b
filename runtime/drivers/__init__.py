"""The drivers: the interface the runtime codes against (base), and one driver per entry kind.

`create` is the one place that knows which class runs a driver entry: a worker's drivers
(Drivers) and the operator's backlog reader both build drivers through it.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Any

from ..codecs import CODECS
from ..entries import Config, DriverEntry, QueueEntry
from ..errors import ErrorKind, QueueError
from ..headers import priority
from .amqp import AmqpDriver
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
from .memory import MemoryDriver

__all__ = [
    "CLOSE_TIMEOUT",
    "DRIVERS",
    "Delivery",
    "Driver",
    "Drivers",
    "MessageIds",
    "OnDelivery",
    "QueueInfo",
    "Settlement",
    "Subscription",
    "create",
]

# The class that runs each driver entry kind, given the entry.
DRIVERS: dict[str, Callable[[Any], Driver]] = {
    "queue.driver.memory": MemoryDriver,
    "queue.driver.amqp": AmqpDriver,
}


def create(entry: DriverEntry) -> Driver:
    """The driver of a (validated) driver entry, not yet started."""
    return DRIVERS[entry.kind](entry)


class Drivers(dict[str, Driver]):
    """The drivers of a worker process by id, one of its parts: started one after the other,
    then every queue is declared; stopped together, each close bounded by CLOSE_TIMEOUT
    whatever the broker does (the grace period is the consumers'). What the process publishes
    through them is encoded here, by the rules that hold on every driver."""

    def __init__(self, config: Config) -> None:
        super().__init__((entry.id, create(entry)) for entry in config.drivers.values())
        self.config = config

    async def start(self) -> None:
        for driver in self.values():
            await driver.start()
        for queue in self.config.queues.values():
            await self[queue.driver].declare(queue)

    async def stop(self, grace: float) -> None:
        await asyncio.gather(*(driver.close() for driver in self.values()))

    def encode(self, queue: QueueEntry, data: Any, headers: Mapping[str, Any]) -> tuple[bytes, str]:
        """The body and content type of a message to `queue`: INVALID for a `priority` header
        no driver takes, data the queue's codec cannot encode, or a body over the driver's
        max_message_size."""
        if "priority" in headers:
            priority(headers["priority"])  # the same rule on every driver
        codec = CODECS[queue.codec]
        body = codec.encode(data)
        limit = self.config.drivers[queue.driver].max_message_size
        if len(body) > limit:
            raise QueueError(
                ErrorKind.INVALID,
                f"message of {len(body)} bytes is over the max_message_size of {limit} bytes "
                f"of driver {queue.driver}",
            )
        return body, codec.content_type
