"""A worker process: the parts assembly.build puts together, started in order and stopped in
reverse, as controller-runtime's Manager runs its Runnables. The Worker wires nothing and owns
no domain logic: it starts, stops and tells when the work is done; its parts do the rest.

The parts, in start order: the telemetry (liveness, readiness and metrics: first up, last down,
so a probe is answered from the start to the end), the drivers (connected, every queue declared)
and the consumers' pool. The handlers' host is no part: it runs nothing of its own.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Sequence
from typing import Any, Protocol

from .consumer import Pool
from .drivers import Drivers
from .entries import Config
from .host import Host
from .telemetry import Telemetry

_log = logging.getLogger("luaq.worker")


class Part(Protocol):
    """What a worker starts and stops."""

    async def start(self) -> None: ...

    async def stop(self, grace: float) -> None:
        """Within `grace` seconds (each part says how), whatever the broker does."""


class Worker:
    def __init__(
        self,
        config: Config,
        parts: Sequence[Part],
        *,
        drivers: Drivers,
        pool: Pool,
        host: Host,
        telemetry: Telemetry,
    ) -> None:
        """`parts` in start order; the others are the same parts by name, for what the worker
        says of itself and what its users reach (publishing through the host, say)."""
        self.config = config
        self.parts = tuple(parts)
        self.drivers = drivers
        self.pool = pool
        self.consumers = pool.consumers
        self.host = host
        self.telemetry = telemetry
        self.lifecycle = telemetry.lifecycle

    async def connect(self) -> None:
        """Start the drivers and declare every queue, without consuming."""
        await self.drivers.start()

    async def start(self) -> None:
        for part in self.parts:
            await part.start()
        self.lifecycle.state = "running"
        _log.info("worker started", extra=self.describe())
        if not self.config.policies:
            _log.warning("no security.policy entries: every publish is allowed")
        elif unguarded := [id_ for id_, access in self.host.access.items() if access.open]:
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
        """Graceful shutdown: not ready from now on; the parts stop in reverse order, the
        consumers draining within `grace` seconds."""
        self.lifecycle.state = "stopping"
        for part in reversed(self.parts):
            await part.stop(grace)

    async def idle(self) -> bool:
        """True when the pool has nothing left to do (see Pool.idle)."""
        return await self.pool.idle()

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
