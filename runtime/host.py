"""The handlers' host: what `queue.publish` and `queue.info` from Lua (and luaq's own
publishes: --input, `luaq publish`) do in a worker process.

A publish is resolved against the declared queues, checked against the publishing consumer's
policies, encoded (Drivers.encode: the header rules of every driver, the queue's codec, the
driver's max_message_size) and sent through the driver; the host counts it (PublishStats), and
the publishes policies refused, and reports both as metric families.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .entries import Config, QueueEntry, resolve_id
from .errors import ErrorKind, QueueError
from .metrics import DURATION_BUCKETS, Family, Histogram
from .security import ACTIONS, Access, Denied

if TYPE_CHECKING:
    from .drivers import Drivers

_log = logging.getLogger("luaq.worker")  # a worker process's lines, wherever written


@dataclass
class PublishStats:
    """Publishes to one queue by handlers and the command line (not retries, dead letters)."""

    published: int = 0
    failures: dict[str, int] = field(default_factory=dict)  # by error kind
    durations: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))


class Host:
    """The lua.Host of a worker process. `denials` counts refused publishes by consumer and
    action; `alive` is told of every keepalive (a long handler's sign of life). A refused
    publish is logged within its consumer's budget for per-message lines (`log_within`: a
    consumer's LogBudget.log)."""

    def __init__(
        self,
        config: Config,
        drivers: Drivers,
        access: Mapping[str, Access],
        denials: Mapping[str, dict[str, int]],
        log_within: Mapping[str, Callable[[logging.Logger, int, str, dict[str, Any]], None]],
        alive: Callable[[], None],
    ) -> None:
        self.config = config
        self.drivers = drivers
        self.access = access
        self.publishes = {queue_id: PublishStats() for queue_id in config.queues}
        self._denials = denials
        self._log_within = log_within
        self._alive = alive

    def keepalive(self) -> None:
        self._alive()
        for driver in self.drivers.values():
            driver.keepalive()

    def queue(self, namespace: str, queue_id: str) -> QueueEntry:
        full_id = resolve_id(queue_id, namespace)
        queue = self.config.queues.get(full_id)
        if queue is None:
            raise QueueError(ErrorKind.NOT_FOUND, f"queue {full_id} is not declared")
        return queue

    async def publish(
        self,
        namespace: str,
        queue_id: str,
        data: Any,
        headers: dict[str, Any],
        consumer: str | None = None,
    ) -> str:
        """Publish through the queue's codec and driver; returns the message id. A handler's
        publish is checked against its consumer's policies first."""
        queue = self.queue(namespace, queue_id)
        stats = self.publishes[queue.id]
        try:
            if consumer is not None:
                self._check_publish(consumer, queue, headers)
            body, content_type = self.drivers.encode(queue, data, headers)
            started = time.monotonic()
            message_id = await self.drivers[queue.driver].publish(
                queue, body, headers, content_type
            )
        except QueueError as exc:
            stats.failures[exc.kind] = stats.failures.get(exc.kind, 0) + 1
            raise
        except Exception as exc:
            stats.failures[ErrorKind.INTERNAL] = stats.failures.get(ErrorKind.INTERNAL, 0) + 1
            raise QueueError(
                ErrorKind.INTERNAL, f"publish to {queue.id} failed: {exc}", retryable=True
            ) from exc
        stats.durations.observe(time.monotonic() - started)
        stats.published += 1
        return message_id

    def _check_publish(self, consumer: str, queue: QueueEntry, headers: dict[str, Any]) -> None:
        try:
            self.access[consumer].check_publish(queue.id, headers)
        except Denied as exc:
            denials = self._denials[consumer]
            denials[exc.action] = denials.get(exc.action, 0) + 1
            self._log_within[consumer](
                _log,
                logging.WARNING,
                "publish denied",
                {"consumer": consumer, "error": exc.message},
            )
            raise

    async def info(self, namespace: str, queue_id: str) -> tuple[int, int]:
        queue = self.queue(namespace, queue_id)
        info = await self.drivers[queue.driver].info(queue)
        return info.message_count, info.consumer_count

    def families(self) -> list[Family]:
        """The refused publishes and the publishes now (README's table). Read from the metrics
        server's thread: only copies of what the event loop changes are iterated."""
        denials = Family(
            "luaq_permission_denials", "counter", "Publishes refused by a security policy",
            ("consumer", "action"),
        )  # fmt: skip
        for consumer, counts in self._denials.items():
            # every action and kind from the start: rate() misses a series' first sample
            for action in ACTIONS:
                denials.add((consumer, action), counts.get(action, 0))
        by_queue = ("queue", "driver")
        published = Family("luaq_messages_published", "counter", "Messages published", by_queue)
        failures = Family(
            "luaq_publish_failures", "counter", "Publishes that failed, by error kind",
            (*by_queue, "kind"),
        )  # fmt: skip
        duration = Family(
            "luaq_publish_duration_seconds", "histogram", "Publishes, confirm included", by_queue
        )
        for queue_id, publishes in self.publishes.items():
            key = (queue_id, self.config.queues[queue_id].driver)
            published.add(key, publishes.published)
            duration.histogram(key, publishes.durations)
            for kind in ErrorKind:
                failures.add((*key, kind.value), publishes.failures.get(kind, 0))
        return [denials, published, failures, duration]
