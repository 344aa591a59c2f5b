"""Queue-depth autoscaling: the decision (pure), the backlog reader (the broker), and what the
autoscaler remembers of a QueueConsumer between passes.

The reader uses the runtime's own AMQP driver on the QueueConsumer's own (validated) entries,
so it reaches the broker exactly as the workers do; it declares the queue, as a worker would,
so a QueueConsumer scaled to zero still has a queue to receive messages.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any
from urllib.parse import urlsplit

from luaq.runtime.drivers import Driver, create
from luaq.runtime.entries import AmqpDriverEntry, Config, QueueEntry, resolve_id

from .render import BROKER_ID
from .resource import Autoscaling, QueueConsumerSpec

_log = logging.getLogger("luaq.operator")


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
    """One broker connection per autoscaled QueueConsumer, kept while its entries stay the same
    (`key`: the broker's entry and the queue's id it was made for)."""

    def __init__(
        self, driver: AmqpDriverEntry, queue: QueueEntry, key: tuple[dict[str, Any], str]
    ) -> None:
        self.entry = driver
        self.queue = queue
        self.key = key
        self._driver: Driver | None = None

    async def backlog(self) -> int:
        """The queue's ready messages: those waiting out a retry's delay are no work for a
        replica yet; they are ready again (and count) when their delay is over."""
        if self._driver is None:
            driver = create(self.entry)
            await driver.start()
            try:
                await driver.declare(self.queue)
            except BaseException:
                await driver.close()
                raise
            self._driver = driver
        info = await self._driver.info(self.queue)
        return info.message_count - info.delayed_count

    async def close(self) -> None:
        if self._driver is not None:
            await self._driver.close()
            self._driver = None


@dataclass(frozen=True)
class Decision:
    replicas: int
    change: str | None = None  # how the autoscaler changed them this pass, for an Event


@dataclass
class Scaling:
    """What the autoscaler remembers of one QueueConsumer between passes."""

    reader: BacklogReader | None = None
    backlog: int | None = None
    backlog_read: float = float("-inf")  # when it was last due (monotonic)
    read_time: float | None = None  # when the backlog was last read (Unix time), for the metrics
    read_errors: int = 0  # reads that failed, for the metrics
    desired: int | None = None
    last_scale: datetime | None = None
    # Why the last read of the backlog failed (a Warning Event says it); None once one works.
    unavailable: str | None = None

    @property
    def last_read(self) -> tuple[int, float] | None:
        """The backlog last read and when (Unix time); None before a read, or not autoscaled."""
        if self.backlog is None or self.read_time is None:
            return None
        return self.backlog, self.read_time

    async def replicas(
        self,
        spec: QueueConsumerSpec,
        status: Mapping[str, Any],
        config: Config,
        period: float,
        now: datetime,
    ) -> Decision:
        """The replicas `spec` asks for, or, autoscaled, what the backlog calls for: read from
        the broker of the checked entries `config` at most every `period` seconds; `status` is
        what the operator reported last, which a restarted operator goes on from."""
        scaling = spec.autoscaling
        if scaling is None:
            await self.close()
            self.backlog = self.read_time = self.last_scale = self.desired = self.unavailable = None
            return Decision(spec.replicas)
        if self.desired is None:  # a restarted operator goes on from what it reported
            self.desired = status.get("desiredReplicas", scaling.min_replicas)
            last = status.get("lastScaleTime")
            self.last_scale = datetime.fromisoformat(last.replace("Z", "+00:00")) if last else None
        driver = config.drivers[resolve_id(BROKER_ID, spec.id_namespace)]
        assert isinstance(driver, AmqpDriverEntry)
        due = time.monotonic() - self.backlog_read >= period
        key = (driver.model_dump(mode="json"), spec.queue)
        if self.reader is None or self.reader.key != key:
            await self.close()
            self.reader = BacklogReader(driver, config.queues[spec.queue], key)
            due = True
        current = min(max(int(self.desired or 0), scaling.min_replicas), scaling.max_replicas)
        change = None
        if due:
            self.backlog_read = time.monotonic()
            try:
                self.backlog = await self.reader.backlog()
            except Exception as exc:
                # the tenant names the broker: say where, never what the network said (an Event
                # that tells an open port from a closed one is a port scanner)
                where = urlsplit(driver.url)
                self.unavailable = (
                    f"cannot read the backlog of {spec.queue} from the broker at "
                    f"{where.hostname}:{where.port or 5672}"
                )
                _log.warning("%s: %s", self.unavailable, exc)
                self.read_errors += 1
                await self.close()
                return Decision(current)
            self.read_time, self.unavailable = time.time(), None
            since = (now - self.last_scale).total_seconds() if self.last_scale else None
            target = decide(self.backlog, scaling, current, since)
            if target != current:
                self.last_scale = now
                change = f"{current} -> {target} replicas (backlog {self.backlog})"
            current = target
        self.desired = current
        return Decision(current, change)

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.close()
            self.reader = None
