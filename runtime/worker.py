"""A worker process, as assembly.build puts it together: drivers, consumers and the handlers'
host (host.py), started and stopped. And it says how it is doing: whether it is live and ready,
and its metrics (see metrics.py).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Mapping
from typing import Any

from . import dlq
from .consumer import Consumer, Pace
from .drivers import create
from .entries import Config
from .errors import QueueError
from .host import Host
from .logs import LogBudget
from .lua import LuaHandler, LuaRuntime
from .metrics import PublishStats, Snapshots
from .security import access_for
from .telemetry import Lifecycle, Telemetry

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
        self.lifecycle = Lifecycle()
        self.telemetry = Telemetry(
            config,
            self.drivers,
            self.consumers,
            {queue_id: PublishStats() for queue_id in config.queues},
            lua.user_metrics,
            self.lifecycle,
            sample_backlog=sample_backlog,
            snapshots=snapshots,
            address=metrics_address,
        )
        self.host = Host(
            config,
            self.drivers,
            self.access,
            self.telemetry.publishes,
            {consumer.entry.id: consumer.stats.denials for consumer in self.consumers},
            self.telemetry.alive,
        )
        self.lua.serve(self.host)

    async def connect(self) -> None:
        """Start the drivers and declare every queue, without consuming."""
        for driver in self.drivers.values():
            await driver.start()
        for queue in self.config.queues.values():
            await self.drivers[queue.driver].declare(queue)

    async def start(self) -> None:
        await self.telemetry.start()
        await self.connect()
        for consumer in self.consumers:
            await consumer.start()
        self.lifecycle.state = "running"
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
            "metrics": f"http://{address}/metrics" if (address := self.telemetry.address) else None,
        }

    async def stop(self, grace: float) -> None:
        """Graceful shutdown: consumers drain in parallel within `grace` seconds, then drivers
        close (each bounded, whatever the broker does)."""
        self.lifecycle.state = "stopping"
        await asyncio.gather(*(consumer.stop(grace) for consumer in self.consumers))
        await asyncio.gather(*(driver.close() for driver in self.drivers.values()))
        await self.telemetry.stop(grace)

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
