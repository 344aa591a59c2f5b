"""A worker process, as assembly.build puts it together: drivers, consumers and the handlers'
host (host.py), started and stopped. And it says how it is doing: whether it is live and ready,
and its metrics (see metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Mapping
from typing import Any, Literal

from . import __version__, dlq
from .consumer import Consumer, Pace
from .drivers import create
from .entries import Config
from .errors import ErrorKind, QueueError
from .host import Host
from .logs import LogBudget
from .lua import LuaHandler, LuaRuntime
from .metrics import STALE_AFTER, Family, PublishStats, Snapshots
from .security import ACTIONS, access_for

_log = logging.getLogger("luaq.worker")
PULSE = 1.0  # seconds between two signs of life of the event loop
BACKLOG_EVERY = 5.0  # seconds between two samples of the queues' depth


class Worker:
    def __init__(
        self,
        config: Config,
        lua: LuaRuntime,
        handlers: Mapping[str, LuaHandler],
        *,
        sample_backlog: bool,
        snapshots: Snapshots | None,
        metrics_address: str | None,
    ) -> None:
        self.config = config
        self.lua = lua
        self.drivers = {entry.id: create(entry) for entry in config.drivers.values()}
        self.access = {entry.id: access_for(entry, config) for entry in config.consumers.values()}
        pace = Pace()
        self.consumers = [
            Consumer(
                entry,
                config.queues[entry.queue],
                self.drivers[config.queues[entry.queue].driver],
                lua.invoker(handlers[entry.function_id], entry.id),
                dlq.sink(config.queues[entry.queue], config.queues, self.drivers),
                config.drivers[config.queues[entry.queue].driver].max_message_size,
                pace,
            )
            for entry in config.consumers.values()
        ]
        self._idle_log = LogBudget(burst=1, interval=10.0)
        self.publishes = {queue_id: PublishStats() for queue_id in config.queues}
        self.host = Host(
            config,
            self.drivers,
            self.access,
            self.publishes,
            {consumer.entry.id: consumer.stats.denials for consumer in self.consumers},
            self._alive,
        )
        self.lua.serve(self.host)
        # depth of the queues consumed and of their dead-letter queues, sampled when asked to
        self.backlog: dict[str, int] = {}
        self.sample_backlog = sample_backlog
        self.metrics_address = metrics_address  # where the metrics are served, if they are
        self.snapshots = snapshots  # a pod's worker process reports through these
        self.state: Literal["starting", "running", "stopping"] = "starting"
        self.beat = time.monotonic()  # the event loop's last sign of life
        self._pulse: asyncio.Task[None] | None = None

    async def connect(self) -> None:
        """Start the drivers and declare every queue, without consuming."""
        for driver in self.drivers.values():
            await driver.start()
        for queue in self.config.queues.values():
            await self.drivers[queue.driver].declare(queue)

    async def start(self) -> None:
        self._pulse = asyncio.create_task(self._keep_pulse(), name="luaq#pulse")
        await self.connect()
        for consumer in self.consumers:
            await consumer.start()
        self.state = "running"
        _log.info("worker started", extra=self.describe())
        if not self.config.policies:
            _log.warning("no security.policy entries: every publish is allowed")
        elif unguarded := [id_ for id_, access in self.access.items() if access.open]:
            _log.warning(
                "consumers without policies: their publishes are allowed",
                extra={"consumers": unguarded},
            )

    def describe(self) -> dict[str, Any]:
        """What runs, for the start-up line."""
        return {
            "consumers": {
                c.entry.id: f"{c.queue.id}, concurrency {c.entry.concurrency}, "
                f"prefetch {c.entry.prefetch}"
                for c in self.consumers
            },
            "drivers": {d.id: d.kind.rsplit(".", 1)[1] for d in self.config.drivers.values()},
            "queues": list(self.config.queues),
            "metrics": f"http://{self.metrics_address}/metrics" if self.metrics_address else None,
        }

    async def stop(self, grace: float) -> None:
        """Graceful shutdown: consumers drain in parallel within `grace` seconds, then drivers
        close (each bounded, whatever the broker does)."""
        self.state = "stopping"
        await asyncio.gather(*(consumer.stop(grace) for consumer in self.consumers))
        await asyncio.gather(*(driver.close() for driver in self.drivers.values()))
        if self._pulse is not None:  # (not when it only published: it never started)
            self._pulse.cancel()
            await asyncio.gather(self._pulse, return_exceptions=True)
            if self.snapshots is not None:
                self.snapshots.write(self.families(), self.unready())

    def _alive(self) -> None:
        self.beat = time.monotonic()

    # -- health and metrics ----------------------------------------------------------------------

    def unhealthy(self) -> str | None:
        """Why the worker is not live: its event loop gave no sign of life for a while."""
        silent = time.monotonic() - self.beat
        if silent > STALE_AFTER:
            return f"the event loop gave no sign of life for {silent:.0f}s"
        return None

    def unready(self) -> str | None:
        """Why the worker is not ready for work, or None."""
        if self.state != "running":
            return self.state
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
        return [*families, *self.lua.user_metrics.families()]

    async def _keep_pulse(self) -> None:
        """A sign of life every second; the queues' depth now and then, and a snapshot for the
        pod's metrics, when asked for."""
        sampled = 0.0
        while True:
            self.beat = time.monotonic()
            running = self.state == "running"
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

    async def wait_idle(self, poll: float = 0.01) -> None:
        """Until `idle()` holds, and keeps holding with nothing received for the drivers'
        `idle_after`. Brokers do not push queue depth, so idleness can only be observed by
        asking."""
        loop = asyncio.get_running_loop()
        settle = max((consumer.driver.idle_after for consumer in self.consumers), default=0.0)
        since: float | None = None
        received = -1
        while True:
            if await self.idle():
                now, seen = loop.time(), sum(c.stats.received for c in self.consumers)
                if since is None or seen != received:
                    since, received = now, seen
                if now - since >= settle:
                    return
            else:
                since = None
            await asyncio.sleep(poll)
