"""Queue-depth autoscaling: the decision (pure) and the backlog reader (the broker).

The reader uses the runtime's own AMQP driver on the QueueConsumer's own (validated) entries,
so it reaches the broker exactly as the workers do; it declares the queue, as a worker would,
so a QueueConsumer scaled to zero still has a queue to receive messages.
"""

from __future__ import annotations

import math

from luaq.runtime.drivers import Driver, create
from luaq.runtime.entries import AmqpDriverEntry, QueueEntry

from .resource import Autoscaling


def decide(
    backlog: int,
    scaling: Autoscaling,
    current: int,
    since_change: float | None,
) -> int:
    """Replicas for `backlog` ready messages; scaling down waits `cooldown_seconds` after the
    last change (`since_change` seconds ago; None: never changed)."""
    if backlog <= scaling.activation_backlog:
        target = scaling.min_replicas
    else:
        target = math.ceil(backlog / scaling.backlog_per_replica)
    target = min(max(target, scaling.min_replicas), scaling.max_replicas)
    cooling = since_change is not None and since_change < scaling.cooldown_seconds
    if target < current and cooling:
        return current
    return target


class BacklogReader:
    """One broker connection per autoscaled QueueConsumer, kept while its entries stay the same."""

    def __init__(self, driver: AmqpDriverEntry, queue: QueueEntry, checksum: str) -> None:
        self.entry = driver
        self.queue = queue
        self.checksum = checksum
        self._driver: Driver | None = None

    async def backlog(self) -> int:
        if self._driver is None:
            driver = create(self.entry)
            await driver.start()
            try:
                await driver.declare(self.queue)
            except BaseException:
                await driver.close()
                raise
            self._driver = driver
        return (await self._driver.info(self.queue)).message_count

    async def close(self) -> None:
        if self._driver is not None:
            await self._driver.close()
            self._driver = None
