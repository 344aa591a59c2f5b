"""A worker process: the validated entries turned into running drivers, handlers and consumers.

The worker is also the handlers' host: `queue.publish` and `queue.info` from Lua arrive here,
are resolved against the declared queues and go to the queue's driver through its codec.
"""

from __future__ import annotations

import asyncio
import logging
from datetime import UTC, datetime
from typing import Any

from .codecs import CODECS
from .consumer import Consumer, DeadLetterSink, LogBudget, Pace
from .drivers import Delivery, Driver
from .drivers.amqp import AmqpDriver, priority
from .drivers.memory import MemoryDriver
from .entries import AmqpDriverEntry, Config, DriverEntry, QueueEntry, resolve_id
from .errors import ConfigError, Kind, QueueError
from .lua import LuaHandler, LuaLoadError, LuaRuntime
from .security import access_for
from .settings import Settings

_log = logging.getLogger("luaq.worker")
MAX_ERROR_TEXT = 2000  # characters of a handler's error kept in a dead letter's x_last_error


def _driver(entry: DriverEntry) -> Driver:
    if isinstance(entry, AmqpDriverEntry):
        return AmqpDriver(entry)
    return MemoryDriver(entry)


class Worker:
    def __init__(self, config: Config, settings: Settings) -> None:
        """Load every Lua function; raise ConfigError with all problems if anything is wrong."""
        self.config = config
        self.settings = settings
        self.lua = LuaRuntime(settings, host=self)
        problems = list(config.problems)
        self.handlers: dict[str, LuaHandler] = {}
        for function in config.functions.values():
            try:
                self.handlers[function.id] = self.lua.load(
                    function.id,
                    function.source_text,
                    function.method,
                    function.modules,
                    function.source_name,
                )
            except LuaLoadError as exc:
                owner = function.id.removesuffix("#handler")
                problems.append(f"{function.file}: {owner}: source: {exc}")
        if problems:
            raise ConfigError(problems)
        self.drivers = {entry.id: _driver(entry) for entry in config.drivers.values()}
        self.access = {entry.id: access_for(entry, config) for entry in config.consumers.values()}
        pace = Pace()
        self.consumers = [
            Consumer(
                entry,
                config.queues[entry.queue],
                self.drivers[config.queues[entry.queue].driver],
                self.lua.invoker(self.handlers[entry.function_id], entry.id),
                self._dead_letter_sink(config.queues[entry.queue]),
                config.drivers[config.queues[entry.queue].driver].max_message_size,
                pace,
            )
            for entry in config.consumers.values()
        ]
        self.consumers_by_id = {consumer.entry.id: consumer for consumer in self.consumers}
        self._idle_log = LogBudget(burst=1, interval=10.0)

    async def connect(self) -> None:
        """Start the drivers and declare every queue, without consuming."""
        for driver in self.drivers.values():
            await driver.start()
        for queue in self.config.queues.values():
            await self.drivers[queue.driver].declare(queue)

    async def start(self) -> None:
        await self.connect()
        for consumer in self.consumers:
            await consumer.start()
        consumers = [consumer.entry.id for consumer in self.consumers]
        _log.info("worker started", extra={"consumers": consumers})
        if not self.config.policies:
            _log.warning("no security.policy entries: every publish is allowed")
        elif unguarded := [id_ for id_, access in self.access.items() if access.open]:
            _log.warning(
                "consumers without policies: their publishes are allowed",
                extra={"consumers": unguarded},
            )

    async def stop(self, grace: float) -> None:
        """Graceful shutdown: consumers drain in parallel within `grace` seconds, then drivers
        close (each bounded, whatever the broker does)."""
        await asyncio.gather(*(consumer.stop(grace) for consumer in self.consumers))
        await asyncio.gather(*(driver.close() for driver in self.drivers.values()))

    def keepalive(self) -> None:
        for driver in self.drivers.values():
            driver.keepalive()

    def _dead_letter_sink(self, source: QueueEntry) -> DeadLetterSink | None:
        if source.dead_letter is None or source.dead_letter.queue is None:
            return None
        target = self.config.queues[source.dead_letter.queue]
        driver = self.drivers[target.driver]

        async def sink(delivery: Delivery, reason: str, error: str) -> None:
            headers = {
                **delivery.headers,
                "message_id": delivery.id,
                "x_dead_letter_reason": reason,
                "x_original_queue": source.id,
                "x_attempts": delivery.attempts,
                "x_last_error": _shortened(error),
                "x_failed_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
            }
            await driver.publish(target, delivery.body, headers, delivery.content_type)

        return sink

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
        # Brokers do not push queue depth, so idleness can only be observed by asking.
        while not await self.idle():  # noqa: ASYNC110
            await asyncio.sleep(poll)

    # -- host calls from Lua ---------------------------------------------------------------------

    def queue(self, namespace: str, queue_id: str) -> QueueEntry:
        full_id = resolve_id(queue_id, namespace)
        queue = self.config.queues.get(full_id)
        if queue is None:
            raise QueueError(Kind.NOT_FOUND, f"queue {full_id} is not declared")
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
        if consumer is not None:
            try:
                self.access[consumer].check_publish(queue.id, headers)
            except QueueError as exc:
                self.consumers_by_id[consumer].stats.denied += 1
                _log.warning("publish denied", extra={"consumer": consumer, "error": exc.message})
                raise
        if "priority" in headers:
            priority(headers["priority"])  # the same rule on every driver
        codec = CODECS[queue.codec]
        body = codec.encode(data)
        limit = self.config.drivers[queue.driver].max_message_size
        if len(body) > limit:
            raise QueueError(
                Kind.INVALID,
                f"message of {len(body)} bytes is over the max_message_size of {limit} bytes "
                f"of driver {queue.driver}",
            )
        try:
            return await self.drivers[queue.driver].publish(
                queue, body, headers, codec.content_type
            )
        except QueueError:
            raise
        except Exception as exc:
            raise QueueError(
                Kind.INTERNAL, f"publish to {queue.id} failed: {exc}", retryable=True
            ) from exc

    async def info(self, namespace: str, queue_id: str) -> tuple[int, int]:
        queue = self.queue(namespace, queue_id)
        info = await self.drivers[queue.driver].info(queue)
        return info.message_count, info.consumer_count


def _shortened(text: str) -> str:
    """At most MAX_ERROR_TEXT characters: an error text goes into a header, and the headers of a
    message must fit in one AMQP frame."""
    if len(text) <= MAX_ERROR_TEXT:
        return text
    return f"{text[:MAX_ERROR_TEXT]}... ({len(text) - MAX_ERROR_TEXT} more characters)"
