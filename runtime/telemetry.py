"""How a worker process is doing: whether it is live and ready, and its metrics.

The metric catalogue (README's table) is here: a scrape turns the plain counters the consumers,
the host and the drivers keep into metric families (metrics.py serves them). A pulse gives a sign
of life every second, samples the queues' depth now and then, and writes the snapshot a pod's
supervisor merges. What it does is set once, by its constructor (assembly.build).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Literal

from . import __version__
from .errors import ErrorKind, QueueError
from .metrics import STALE_AFTER, Family, Snapshots, Source
from .security import ACTIONS

if TYPE_CHECKING:
    from .consumer import Consumer
    from .drivers import Driver
    from .entries import Config
    from .metrics import PublishStats, UserMetrics

PULSE = 1.0  # seconds between two signs of life of the event loop
BACKLOG_EVERY = 5.0  # seconds between two samples of the queues' depth


@dataclass
class Lifecycle:
    """Where the worker is in its life, which readiness reports: the worker sets it (and the
    command line, at once, on a signal to stop)."""

    state: Literal["starting", "running", "stopping"] = "starting"


class Telemetry:
    """The liveness, readiness and metrics of one worker process, and its pulse: started first
    and stopped last of the worker's parts."""

    def __init__(
        self,
        config: Config,
        drivers: Mapping[str, Driver],
        consumers: Sequence[Consumer],
        publishes: Mapping[str, PublishStats],
        user_metrics: UserMetrics,
        lifecycle: Lifecycle,
        *,
        sample_backlog: bool = False,
        snapshots: Snapshots | None = None,
        address: str | None = None,
    ) -> None:
        """`sample_backlog`: the depth of the queues consumed and of their dead-letter queues,
        every BACKLOG_EVERY seconds (the metrics are served); `snapshots`: a pod's worker
        process reports through them; `address`: where the metrics are served, if they are."""
        self.config = config
        self.drivers = drivers
        self.consumers = consumers
        self.publishes = publishes
        self._user_metrics = user_metrics
        self.lifecycle = lifecycle
        self.sample_backlog = sample_backlog
        self.snapshots = snapshots
        self.address = address
        self.backlog: dict[str, int] = {}
        self.beat = time.monotonic()  # the event loop's last sign of life
        self._pulse: asyncio.Task[None] | None = None

    def source(self) -> Source:
        """What a metrics server serves for this process."""
        return Source(self.families, self.unhealthy, self.unready)

    def alive(self) -> None:
        """A sign of life of the event loop (the pulse's, or a long handler's keepalive)."""
        self.beat = time.monotonic()

    async def start(self) -> None:
        self._pulse = asyncio.create_task(self._keep_pulse(), name="luaq#pulse")

    async def stop(self, grace: float) -> None:
        """The pulse stops; the last snapshot is written (not when it never started: a worker
        that only published)."""
        if self._pulse is not None:
            self._pulse.cancel()
            await asyncio.gather(self._pulse, return_exceptions=True)
            if self.snapshots is not None:
                self.snapshots.write(self.families(), self.unready())

    def unhealthy(self) -> str | None:
        """Why the worker is not live: its event loop gave no sign of life for a while."""
        silent = time.monotonic() - self.beat
        if silent > STALE_AFTER:
            return f"the event loop gave no sign of life for {silent:.0f}s"
        return None

    def unready(self) -> str | None:
        """Why the worker is not ready for work, or None."""
        if self.lifecycle.state != "running":
            return self.lifecycle.state
        for driver_id, driver in self.drivers.items():
            if not driver.connected:
                return f"reconnecting {driver_id}"
        for consumer in self.consumers:
            if not consumer.attached:
                return f"consumer {consumer.entry.id} not attached"
        return None

    def families(self) -> list[Family]:
        """The worker's metrics now (README's table). Read from the server's thread: only
        copies of what the event loop changes are iterated."""
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
        denials = Family(
            "luaq_permission_denials", "counter", "Publishes refused by a security policy",
            ("consumer", "action"),
        )  # fmt: skip
        for consumer in self.consumers:
            stats, key = consumer.stats, (consumer.entry.id, consumer.queue.id)
            received.add(key, stats.received)
            for outcome, count in stats.settled.items():
                settled.add((*key, outcome.value), count)
            duration.histogram(key, stats.durations)
            sizes.histogram(key, stats.sizes)
            # every kind and action from the start: rate() misses a series' first sample
            for kind in ErrorKind:
                errors.add((*key, kind.value), stats.errors.get(kind, 0))
            in_flight.add(key, consumer.busy)
            concurrency.add(key, consumer.entry.concurrency)
            for action in ACTIONS:
                denials.add((consumer.entry.id, action), stats.denials.get(action, 0))
        by_queue = ("queue", "driver")
        published = Family("luaq_messages_published", "counter", "Messages published", by_queue)
        failures = Family(
            "luaq_publish_failures", "counter", "Publishes that failed, by error kind",
            (*by_queue, "kind"),
        )  # fmt: skip
        publish_duration = Family(
            "luaq_publish_duration_seconds", "histogram", "Publishes, confirm included", by_queue
        )
        for queue_id, publishes in self.publishes.items():
            key = (queue_id, self.config.queues[queue_id].driver)
            published.add(key, publishes.published)
            publish_duration.histogram(key, publishes.durations)
            for kind in ErrorKind:
                failures.add((*key, kind.value), publishes.failures.get(kind, 0))
        connected = Family(
            "luaq_driver_connected", "gauge", "1 when the driver's connections are up",
            ("driver",), merge="min",
        )  # fmt: skip
        reconnects = Family(
            "luaq_driver_reconnects", "counter", "Connections re-established after a loss",
            ("driver",),
        )  # fmt: skip
        for driver_id, driver in self.drivers.items():
            connected.add((driver_id,), int(driver.connected))
            reconnects.add((driver_id,), driver.reconnects)
        backlog = Family(
            "luaq_queue_backlog", "gauge",
            "Messages in the queue, those waiting for a retry included (sampled every few s)",
            by_queue, merge="max",
        )  # fmt: skip
        for queue_id, count in dict(self.backlog).items():
            backlog.add((queue_id, self.config.queues[queue_id].driver), count)
        ready = Family("luaq_worker_ready", "gauge", "1 when ready for work (/readyz)", merge="min")
        ready.add((), int(self.unready() is None))
        info = Family(
            "luaq_build_info", "gauge", "The luaq version running", ("version",), merge="max"
        )
        info.add((__version__,), 1)
        families = [
            received, settled, duration, errors, in_flight, concurrency, sizes, denials,
            published, failures, publish_duration, connected, reconnects, backlog, ready, info,
        ]  # fmt: skip
        return [*families, *self._user_metrics.families()]

    async def _keep_pulse(self) -> None:
        """A sign of life every second; the queues' depth now and then, and a snapshot for the
        pod's metrics, when asked for."""
        sampled = 0.0
        while True:
            self.beat = time.monotonic()
            running = self.lifecycle.state == "running"
            if running and self.sample_backlog and self.beat - sampled >= BACKLOG_EVERY:
                sampled = self.beat
                await self._sample_backlog()
            if self.snapshots is not None:
                self.snapshots.write(self.families(), self.unready())
            await asyncio.sleep(PULSE)

    async def _sample_backlog(self) -> None:
        queues = {consumer.queue.id for consumer in self.consumers}
        queues |= {
            q.dead_letter.queue
            for q in self.config.queues.values()
            if q.id in queues and q.dead_letter and q.dead_letter.queue
        }
        for queue_id in sorted(queues):
            queue = self.config.queues[queue_id]
            try:
                self.backlog[queue_id] = (
                    await self.drivers[queue.driver].info(queue)
                ).message_count
            except QueueError:
                self.backlog.pop(queue_id, None)  # unknown now: better no sample than an old one
