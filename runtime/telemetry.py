"""How a worker process is doing: whether it is live and ready, and its metrics.

The metric catalogue is README's table. Each part of the worker reports the families of what it
counts (the consumers' pool: deliveries, settlements, handlers; the host: denials and publishes)
and why it is not ready; telemetry adds the process's own (the drivers' connections, the queues'
backlog, readiness, the build) and the handlers' own, and metrics.py serves them. A pulse gives a
sign of life every second and writes the snapshot a pod's supervisor merges; a task of its own
samples the queues' depth now and then. What it does is set once, by its constructor
(assembly.build).
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from . import __version__
from .errors import QueueError
from .metrics import STALE_AFTER, Family, Snapshots, Source

if TYPE_CHECKING:
    from .drivers import Driver
    from .entries import Config
    from .metrics import UserMetrics

PULSE = 1.0  # seconds between two signs of life of the event loop
BACKLOG_EVERY = 5.0  # seconds between two samples of the queues' depth


@dataclass
class Lifecycle:
    """Where the worker is in its life, which readiness reports: the worker sets it (and the
    command line, at once, on a signal to stop); and its event loop's last sign of life, which
    liveness reports: the pulse's, or a long handler's keepalive (the host's)."""

    state: Literal["starting", "running", "stopping"] = "starting"
    beat: float = field(default_factory=time.monotonic)

    def alive(self) -> None:
        self.beat = time.monotonic()


class Telemetry:
    """The liveness, readiness and metrics of one worker process, and its pulse: started first
    and stopped last of the worker's parts."""

    def __init__(
        self,
        config: Config,
        drivers: Mapping[str, Driver],
        lifecycle: Lifecycle,
        user_metrics: UserMetrics,
        *,
        reports: Sequence[Callable[[], list[Family]]] = (),
        checks: Sequence[Callable[[], str | None]] = (),
        sample_backlog: bool = False,
        snapshots: Snapshots | None = None,
        address: str | None = None,
    ) -> None:
        """`reports`: the parts' own metric families, in the catalogue's order (first);
        `checks`: why a part is not ready, asked after the drivers are; `sample_backlog`: the
        depth of the queues consumed and of their dead-letter queues, every BACKLOG_EVERY
        seconds (the metrics are served); `snapshots`: a pod's worker process reports through
        them; `address`: where the metrics are served, if they are."""
        self.config = config
        self.drivers = drivers
        self.lifecycle = lifecycle
        self._user_metrics = user_metrics
        self._reports = tuple(reports)
        self._checks = tuple(checks)
        self.sample_backlog = sample_backlog
        self.snapshots = snapshots
        self.address = address
        self.backlog: dict[str, tuple[int, int]] = {}  # queue: ready, delayed (the last sample)
        self._pulse: asyncio.Task[None] | None = None
        self._sampler: asyncio.Task[None] | None = None

    def source(self) -> Source:
        """What a metrics server serves for this process."""
        return Source(self.families, self.unhealthy, self.unready)

    async def start(self) -> None:
        self._pulse = asyncio.create_task(self._keep_pulse(), name="luaq#pulse")
        if self.sample_backlog:
            self._sampler = asyncio.create_task(self._keep_sampling(), name="luaq#backlog")

    async def stop(self, grace: float) -> None:
        """The pulse stops; the last snapshot is written (not when it never started: a worker
        that only published)."""
        if self._sampler is not None:
            self._sampler.cancel()
            await asyncio.gather(self._sampler, return_exceptions=True)
        if self._pulse is not None:
            self._pulse.cancel()
            await asyncio.gather(self._pulse, return_exceptions=True)
            if self.snapshots is not None:
                self.snapshots.write(self.families(), self.unready())

    def unhealthy(self) -> str | None:
        """Why the worker is not live: its event loop gave no sign of life for a while."""
        silent = time.monotonic() - self.lifecycle.beat
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
        for check in self._checks:
            if (why := check()) is not None:
                return why
        return None

    def families(self) -> list[Family]:
        """The worker's metrics now (README's table). Read from the server's thread: only
        copies of what the event loop changes are iterated."""
        by_queue = ("queue", "driver")
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
            "luaq_queue_backlog", "gauge", "Messages ready in the queue (sampled every few s)",
            by_queue, merge="max",
        )  # fmt: skip
        delayed = Family(
            "luaq_queue_delayed", "gauge",
            "Messages of the queue waiting out a retry's delay (sampled every few s)",
            by_queue, merge="max",
        )  # fmt: skip
        for queue_id, (ready_count, delayed_count) in dict(self.backlog).items():
            key = (queue_id, self.config.queues[queue_id].driver)
            backlog.add(key, ready_count)
            delayed.add(key, delayed_count)
        ready = Family("luaq_worker_ready", "gauge", "1 when ready for work (/readyz)", merge="min")
        ready.add((), int(self.unready() is None))
        info = Family(
            "luaq_build_info", "gauge", "The luaq version running", ("version",), merge="max"
        )
        info.add((__version__,), 1)
        parts = [family for report in self._reports for family in report()]
        own = [connected, reconnects, backlog, delayed, ready, info]
        return [*parts, *own, *self._user_metrics.families()]

    async def _keep_pulse(self) -> None:
        """A sign of life every second, and a snapshot for the pod's metrics when asked for.
        Liveness is this beat: it never waits on anything but the clock (a broker away for
        minutes is for readiness to say, not a reason to restart the process)."""
        while True:
            self.lifecycle.alive()
            if self.snapshots is not None:
                self.snapshots.write(self.families(), self.unready())
            await asyncio.sleep(PULSE)

    async def _keep_sampling(self) -> None:
        """The queues' depth every BACKLOG_EVERY seconds while running, one sample at a time:
        each waits on the broker at most its driver's connection_timeout."""
        while True:
            if self.lifecycle.state != "running":
                await asyncio.sleep(PULSE)
                continue
            await self._sample_backlog()
            await asyncio.sleep(BACKLOG_EVERY)

    async def _sample_backlog(self) -> None:
        queues = {consumer.queue for consumer in self.config.consumers.values()}
        queues |= {
            q.dead_letter.queue
            for q in self.config.queues.values()
            if q.id in queues and q.dead_letter and q.dead_letter.queue
        }
        for queue_id in sorted(queues):
            queue = self.config.queues[queue_id]
            try:
                info = await self.drivers[queue.driver].info(queue)
                self.backlog[queue_id] = (
                    info.message_count - info.delayed_count,
                    info.delayed_count,
                )
            except QueueError:
                self.backlog.pop(queue_id, None)  # unknown now: better no sample than an old one
