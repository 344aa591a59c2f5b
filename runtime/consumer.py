"""The consumer pool: the loop that takes deliveries, runs handlers and settles messages.

The driver pushes up to `prefetch` deliveries into a buffer; `concurrency` worker tasks take
them one at a time and run the handler. Each outcome maps to one settlement (DESIGN.md's
table), the first settlement wins, and nothing the handler does can stop the worker task.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

from .codecs import BY_CONTENT_TYPE
from .drivers import Delivery, Driver, Subscription
from .entries import ConsumerEntry, QueueEntry
from .errors import QueueError
from .lua import Outcome, Verdict

Invoke = Callable[[Any, Delivery], Awaitable[Outcome]]
DeadLetterSink = Callable[[Delivery, str, str], Awaitable[None]]  # delivery, reason, last error
YIELD_EVERY = 64
_log = logging.getLogger("luaq.consumer")


@dataclass
class ConsumerStats:
    processed: int = 0  # handler invocations that finished, whatever their outcome
    acked: int = 0
    nacked: int = 0  # given back: `false`, errors, budget, not started or cut short at shutdown
    failed: int = 0  # invocations that ended in an error (also counted in nacked)
    rejected: int = 0  # dropped without requeue: undecodable, or out of attempts with no DLQ
    dead_lettered: int = 0  # moved to the queue's dead-letter queue
    denied: int = 0  # publishes from the handler refused by a security policy
    first_at: float | None = None
    last_at: float | None = None
    errors: dict[str, int] = field(default_factory=dict)

    @property
    def rate(self) -> float:
        """Messages per second while the consumer was busy."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return self.processed / (self.last_at - self.first_at)


class Consumer:
    def __init__(
        self,
        entry: ConsumerEntry,
        queue: QueueEntry,
        driver: Driver,
        invoke: Invoke,
        dead_letter: DeadLetterSink | None = None,
        max_message_size: int | None = None,
    ) -> None:
        self.entry = entry
        self._max_size = max_message_size
        self._backoff = entry.retry or queue.retry
        self._dead_letter_sink = dead_letter
        self.queue = queue
        self.driver = driver
        self.stats = ConsumerStats()
        self._invoke = invoke
        self._buffer: asyncio.Queue[Delivery] = asyncio.Queue()
        self._workers: list[asyncio.Task[None]] = []
        self._subscription: Subscription | None = None
        self._busy = 0
        self._held = 0
        self._idle = asyncio.Event()
        self._idle.set()

    @property
    def held(self) -> int:
        """Deliveries received from the driver that the consumer has not finished with.

        At most prefetch + concurrency: a delivery acked early (msg:ack(), auto_ack) frees its
        prefetch slot while its handler still runs."""
        return self._held

    async def start(self) -> None:
        self._workers = [
            asyncio.create_task(self._work(), name=f"{self.entry.id}#{n}")
            for n in range(self.entry.concurrency)
        ]
        self._subscription = await self.driver.consume(self.queue, self.entry, self._receive)

    def _receive(self, delivery: Delivery) -> None:
        self._held += 1
        self._buffer.put_nowait(delivery)

    async def _work(self) -> None:
        get = self._buffer.get
        handled = 0
        while True:
            handled += 1
            if not handled % YIELD_EVERY:
                # get() only waits on an empty buffer: with a driver that refills it at once
                # (memory) and handlers that never wait, nothing else (no signal, no other
                # consumer) would run while a backlog lasts or a message fails forever.
                await asyncio.sleep(0)
            delivery = await get()
            self._busy += 1
            self._idle.clear()
            try:
                await self._handle(delivery)
            except asyncio.CancelledError:
                # Cut short at shutdown: the subscription gives the message back unless the
                # handler settled it early.
                self._count(delivery.settled is True)
                raise
            except Exception:
                # A bug in luaq itself, not in the handler: keep the message and the worker.
                _log.exception("handling failed", extra={"consumer": self.entry.id})
                await delivery.nack()
            finally:
                self._held -= 1
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _handle(self, delivery: Delivery) -> None:
        stats = self.stats
        if stats.first_at is None:
            stats.first_at = time.monotonic()
        codec = BY_CONTENT_TYPE.get(delivery.content_type)
        try:
            if self._max_size is not None and len(delivery.body) > self._max_size:
                raise ValueError(
                    f"body of {len(delivery.body)} bytes is over max_message_size {self._max_size}"
                )
            if codec is None:
                raise ValueError(f"unknown content type {delivery.content_type!r}")
            payload = codec.decode(delivery.body)
        except (ValueError, RecursionError) as exc:
            # A poison message can never succeed: redelivering it would loop forever.
            await self._give_up(delivery, "poison", str(exc))
            return
        if self.entry.auto_ack:
            await delivery.ack()
        outcome = await self._invoke(payload, delivery)
        stats.processed += 1
        stats.last_at = time.monotonic()
        if outcome.verdict is Verdict.FAIL:
            stats.failed += 1
            kind = outcome.kind or "UNKNOWN"
            stats.errors[kind] = stats.errors.get(kind, 0) + 1
            _log.warning(
                "handler failed",
                extra={
                    "consumer": self.entry.id,
                    "message_id": delivery.id,
                    "attempt": delivery.attempts,
                    "kind": kind,
                    "error": outcome.error,
                },
            )
        if delivery.settled is not None:
            # auto_ack, or the handler settled early with msg:ack() / msg:nack()
            self._count(delivery.settled)
        elif outcome.verdict is Verdict.ACK:
            self._count(True)
            await delivery.ack()
        elif outcome.verdict is Verdict.FAIL and (self.queue.dead_letter or self._backoff):
            limit = self.queue.dead_letter
            if limit and delivery.attempts >= limit.max_attempts:
                await self._give_up(delivery, "max_attempts", outcome.error or "")
            else:
                self._count(False)
                backoff = self._backoff
                await delivery.retry(backoff.delay_after(delivery.attempts) if backoff else 0.0)
        else:
            self._count(False)
            await delivery.nack()

    async def _give_up(self, delivery: Delivery, reason: str, error: str) -> None:
        """Dead-letter the message, or reject it when its queue has no dead-letter queue.
        Should the dead-letter queue refuse it, the message is requeued, never lost."""
        what = "message body cannot be decoded" if reason == "poison" else "attempts exhausted"
        extra = {
            "consumer": self.entry.id,
            "message_id": delivery.id,
            "attempt": delivery.attempts,
            "reason": reason,
            "error": error,
        }
        if self._dead_letter_sink is None:
            self.stats.rejected += 1
            _log.warning(f"{what}, rejected", extra=extra)
            await delivery.nack(requeue=False)
            return
        try:
            await self._dead_letter_sink(delivery, reason, error)
        except QueueError as exc:
            _log.error("dead-lettering failed, message requeued", extra={**extra, "dlq": str(exc)})
            self._count(False)
            await delivery.nack()
            return
        self.stats.dead_lettered += 1
        _log.warning(f"{what}, dead-lettered", extra=extra)
        await delivery.ack()

    def _count(self, acked: bool) -> None:
        if acked:
            self.stats.acked += 1
        else:
            self.stats.nacked += 1

    async def stop(self, grace: float) -> None:
        """Stop taking deliveries, let running handlers finish, give the rest back."""
        if self._subscription is not None:
            await self._subscription.cancel()
        while not self._buffer.empty():
            delivery = self._buffer.get_nowait()
            self._held -= 1
            self._count(False)
            await delivery.nack()
        try:
            await asyncio.wait_for(self._idle.wait(), grace)
        except TimeoutError:
            _log.warning(
                "handlers still running after the shutdown timeout; their messages are requeued",
                extra={"consumer": self.entry.id, "running": self._busy},
            )
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, return_exceptions=True)
        if self._subscription is not None:
            await self._subscription.close()
        self._held = 0
