"""The consumers of a worker process as one of its parts: started and stopped together, idle,
ready, and reporting their metric families."""

from __future__ import annotations

import asyncio
import logging

from ..errors import ErrorKind, QueueError
from ..logs import LogBudget
from ..metrics import Family
from .loop import Consumer

_log = logging.getLogger("luaq.worker")  # the pool's lines are the worker process's


class Pool:
    """The consumers of a worker process, one of its parts: started one after the other,
    stopped together (each within the grace period); they report their metric families, and
    are not ready while one is not attached."""

    def __init__(self, consumers: list[Consumer]) -> None:
        self.consumers = consumers
        self._idle_log = LogBudget(burst=1, interval=10.0)

    async def start(self) -> None:
        for consumer in self.consumers:
            await consumer.start()

    async def stop(self, grace: float) -> None:
        await asyncio.gather(*(consumer.stop(grace) for consumer in self.consumers))

    async def idle(self) -> bool:
        """True when no consumed queue has messages (ready or waiting for a retry) and no
        consumer holds a delivery. A broker that cannot tell is not idle."""
        if any(consumer.held for consumer in self.consumers):
            return False
        for consumer in self.consumers:
            try:
                if (await consumer.driver.info(consumer.queue)).message_count:
                    return False
            except QueueError as exc:
                if self._idle_log.take() is not None:
                    _log.warning(
                        "cannot tell if the queues are empty", extra={"error": exc.message}
                    )
                return False
        return not any(consumer.held for consumer in self.consumers)

    def unready(self) -> str | None:
        for consumer in self.consumers:
            if not consumer.attached:
                return f"consumer {consumer.entry.id} not attached"
        return None

    def families(self) -> list[Family]:
        """The consumers' metrics now (README's table). Read from the metrics server's thread:
        only copies of what the event loop changes are iterated."""
        by_consumer = ("consumer", "queue")
        received = Family(
            "luaq_messages_received", "counter", "Deliveries taken from the driver", by_consumer
        )
        settled = Family(
            "luaq_messages_settled", "counter",
            "Messages settled, by outcome: ack, retry (after a backoff), requeue (at once, at "
            "shutdown), dead_letter, reject, stale (the broker could not be told: it delivers "
            "the message again)",
            (*by_consumer, "outcome"),
        )  # fmt: skip
        duration = Family(
            "luaq_handler_duration_seconds", "histogram", "Handler invocations", by_consumer
        )
        errors = Family(
            "luaq_handler_errors", "counter", "Failed handler invocations, by error kind",
            (*by_consumer, "kind"),
        )  # fmt: skip
        in_flight = Family(
            "luaq_handlers_in_flight", "gauge", "Handler invocations running", by_consumer
        )
        concurrency = Family(
            "luaq_consumer_concurrency", "gauge", "Handler invocations allowed at once", by_consumer
        )
        sizes = Family(
            "luaq_message_size_bytes", "histogram", "Sizes of message bodies received", by_consumer
        )
        for consumer in self.consumers:
            stats, key = consumer.stats, (consumer.entry.id, consumer.queue.id)
            received.add(key, stats.received)
            for outcome, count in stats.settled.items():
                settled.add((*key, outcome.value), count)
            duration.histogram(key, stats.durations)
            sizes.histogram(key, stats.sizes)
            # every kind from the start: rate() misses a series' first sample
            for kind in ErrorKind:
                errors.add((*key, kind.value), stats.errors.get(kind, 0))
            in_flight.add(key, consumer.busy)
            concurrency.add(key, consumer.entry.concurrency)
        return [received, settled, duration, errors, in_flight, concurrency, sizes]
