"""`luaq dlq`: look into a dead-letter queue, move its messages back, or empty it.

Works through the driver interface, so on any driver whose queues outlive a process (the
memory driver's do not). Messages are taken as a consumer would, up to MAX_BATCH at a time;
whatever is not explicitly acked is given back when the subscription closes.
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .drivers import Delivery, Subscription
from .entries import ConsumerEntry, QueueEntry
from .errors import Kind, QueueError
from .worker import Worker

MAX_BATCH = 10_000
DEAD_LETTER_HEADERS = (
    "x_dead_letter_reason",
    "x_original_queue",
    "x_attempts",
    "x_last_error",
    "x_failed_at",
)


@dataclass
class Batch:
    deliveries: list[Delivery]
    subscription: Subscription


async def take(worker: Worker, queue: QueueEntry, wait: float = 10.0) -> Batch:
    """Every message ready in `queue` (up to MAX_BATCH), unsettled."""
    driver = worker.drivers[queue.driver]
    ready = min((await driver.info(queue)).message_count, MAX_BATCH)
    reader = ConsumerEntry.model_construct(
        id="luaq:dlq",
        kind="queue.consumer",
        file=queue.file,
        queue=queue.id,
        prefetch=max(ready, 1),
    )
    deliveries: list[Delivery] = []
    subscription = await driver.consume(queue, reader, deliveries.append)
    loop = asyncio.get_running_loop()
    deadline = loop.time() + wait
    while len(deliveries) < ready:
        if loop.time() > deadline:
            break  # another consumer took some: work on what arrived
        await asyncio.sleep(0.01)
    await subscription.cancel()
    return Batch(deliveries, subscription)


def describe(delivery: Delivery) -> dict[str, Any]:
    headers = delivery.headers
    return {
        "id": delivery.id,
        "reason": headers.get("x_dead_letter_reason"),
        "attempts": headers.get("x_attempts"),
        "queue": headers.get("x_original_queue"),
        "failed_at": headers.get("x_failed_at"),
        "error": headers.get("x_last_error"),
    }


async def replay(worker: Worker, batch: Batch, report: Callable[[str], None]) -> int:
    """Publish each message back to its original queue, as it was, then ack it here. A message
    whose original queue is not declared stays in the dead-letter queue."""
    moved = 0
    for delivery in batch.deliveries:
        original = delivery.headers.get("x_original_queue")
        target = worker.config.queues.get(str(original))
        if target is None:
            report(f"{delivery.id}: original queue {original!r} is not declared here; kept")
            continue
        headers = {k: v for k, v in delivery.headers.items() if k not in DEAD_LETTER_HEADERS}
        headers["message_id"] = delivery.id
        try:
            await worker.drivers[target.driver].publish(
                target, delivery.body, headers, delivery.content_type
            )
        except QueueError as exc:
            report(f"{delivery.id}: not replayed: {exc.message}; kept")
            continue
        await delivery.ack()
        moved += 1
    return moved


def require_durable(worker: Worker, queue: QueueEntry) -> None:
    if worker.config.drivers[queue.driver].kind == "queue.driver.memory":
        raise QueueError(
            Kind.INVALID,
            f"{queue.id} is on an in-memory driver: its messages live only inside a running "
            "worker, there is nothing to inspect from here",
        )
