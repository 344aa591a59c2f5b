"""A consumer: the loop that takes deliveries, runs handlers and settles messages.

The driver pushes up to `prefetch` deliveries into a buffer; `concurrency` worker tasks take
them one at a time and run the handler. Each outcome maps to one settlement (docs/design.md,
"Settlement"), the first settlement wins, and nothing the handler does can stop the worker task.

A message given back is never offered again at once: it waits out a backoff (the consumer's
`retry`, its queue's, or DEFAULT_RETRY), so a message that fails every time costs a few
attempts a minute, not a core.
"""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from ..drivers import CLOSE_TIMEOUT, Delivery, Driver, Settlement, Subscription
from ..entries import DEFAULT_RETRY, ConsumerEntry, QueueEntry
from ..errors import ErrorKind, QueueError
from ..logs import LogBudget
from ..lua import Invoke, Outcome, SettleEarly, Verdict, Watch
from .stats import ConsumerStats

REMEMBERED = 10_000  # attempts of messages given back by a plain requeue, by message id
# Attempts counted without `max_attempts`: a count another publisher set beyond it is taken as
# this (it still fits the 64-bit header that carries it, plus one per attempt for ages).
MAX_COUNTED_ATTEMPTS = 2**31
_log = logging.getLogger("luaq.consumer")
KILLED = "it was running when worker processes were killed or died, more than once"
# Where a consumer moves a message it gives up on (dlq.sink makes it): delivery, reason, last error
DeadLetterSink = Callable[[Delivery, str, str], Awaitable[None]]


_GIVING_UP = {  # why a consumer gives up on a message, in words, by reason
    "poison": "message cannot be handled",  # undecodable, too large, too deep for Lua
    "killed": "message kills worker processes",
    "max_attempts": "attempts exhausted",
}


class Pace:
    """Time slices for the event loop, shared by every consumer of a process.

    Lua runs on the loop's thread, and a worker task whose buffer is full goes from one handler
    to the next without waiting for anything: the loop would neither read its sockets nor run
    its timers (heartbeats, signals) nor write the acks of finished handlers until the backlog
    is gone. So, once `slice` seconds have passed since the loop last had a turn, every task
    about to start a handler gives it one first.

    A timer every half slice tells when the loop last had a turn (timers run only then): while
    handlers wait for the broker, as most do, the loop turns on its own and no task yields in
    vain. The timer runs only while handlers start, so an idle worker sleeps."""

    def __init__(self, slice_seconds: float = 0.005) -> None:
        self.slice = slice_seconds
        self.since = time.monotonic()
        self._marker: asyncio.TimerHandle | None = None
        self._started = False  # a handler started since the timer last ran

    def due(self) -> bool:
        self._started = True
        if self._marker is None:
            self._mark()  # (after a pause: the loop had all the turns it wanted meanwhile)
        return time.monotonic() - self.since > self.slice

    async def turn(self) -> None:
        # The first yield lets the loop poll its sockets and timers; the second lets the
        # callbacks that found (data received, heartbeats, acks written) run before this task.
        await asyncio.sleep(0)
        await asyncio.sleep(0)
        self.since = time.monotonic()

    def _mark(self) -> None:
        self.since = time.monotonic()
        if self._started:
            self._started = False
            self._marker = asyncio.get_running_loop().call_later(self.slice / 2, self._mark)
        else:
            self._marker = None


class Consumer:
    def __init__(
        self,
        entry: ConsumerEntry,
        queue: QueueEntry,
        driver: Driver,
        invoke: Invoke,
        decode: Callable[[bytes, str], Any],
        dead_letter: DeadLetterSink | None = None,
        max_message_size: int | None = None,
        pace: Pace | None = None,
        watch: Watch | None = None,
    ) -> None:
        """`decode` reads a body by its content type (codecs.decoder, for the queue's codec);
        `watch`: where a supervised worker reports its handlers' runs (flight.FlightLog)."""
        self._watch = watch
        self.entry = entry
        self._max_size = max_message_size
        self._backoff = entry.retry or queue.retry or DEFAULT_RETRY
        driver.retries_with(queue, self._backoff)
        self._max_attempts = queue.dead_letter.max_attempts if queue.dead_letter else None
        self._attempts_limit = self._max_attempts or MAX_COUNTED_ATTEMPTS
        self._dead_letter_sink = dead_letter
        self.queue = queue
        self._decode_body = decode
        self.driver = driver
        self.stats = ConsumerStats()
        self._invoke = invoke
        self._settle_early_fn: SettleEarly = self._settle_early
        self._pace = pace or Pace()
        # Deliveries not yet taken, and a future per worker task waiting for one: a plain deque
        # hands a delivery over in about half the time asyncio.Queue takes.
        self._buffer: collections.deque[Delivery] = collections.deque()
        self._waiting: collections.deque[asyncio.Future[None]] = collections.deque()
        self._workers: list[asyncio.Task[None]] = []
        self._holding: dict[Delivery, asyncio.Task[None]] = {}
        # A plain requeue tells the next delivery only "redelivered": the attempts of messages
        # given back that way (after a failed retry), to count on from there.
        self._requeued_attempts: dict[str, int] = {}
        self._subscription: Subscription | None = None
        self._busy = 0
        self._held = 0
        self._idle = asyncio.Event()
        self._idle.set()
        # every line about one message (failures, dead letters, rejects, refused publishes)
        # shares it: a flood of failing messages logs a few lines and how many it held back
        self.log_budget = LogBudget()

    @property
    def busy(self) -> int:
        """Deliveries being handled now."""
        return self._busy

    @property
    def attached(self) -> bool:
        return self._subscription is not None and self._subscription.attached

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
        self.stats.received += 1
        if self._requeued_attempts:
            earlier = self._requeued_attempts.pop(delivery.id, 0)
            delivery.attempts = max(delivery.attempts, earlier + 1)
        if not 1 <= delivery.attempts <= self._attempts_limit:
            self._clamp_attempts(delivery)
        self._buffer.append(delivery)
        waiting = self._waiting
        while waiting:
            waiter = waiting.popleft()
            if not waiter.done():  # (done: its worker task was cancelled)
                waiter.set_result(None)
                break

    def _clamp_attempts(self, delivery: Delivery) -> None:
        """An attempt count below 1 (from another publisher: x-luaq-attempts, x-delivery-count)
        would dodge max_attempts: it is taken as 1, and said. Above the limit the message has
        had every attempt it may have: a message the dead-letter queue refused comes back so,
        from luaq itself, and that is no news."""
        given = delivery.attempts
        delivery.attempts = min(max(given, 1), self._attempts_limit)
        if given >= 1:
            return
        self.log_budget.log(
            _log,
            logging.WARNING,
            "attempt count out of range",
            {
                "consumer": self.entry.id,
                "message_id": delivery.id,
                "given": given,
                "taken_as": delivery.attempts,
            },
        )

    async def _work(self) -> None:
        buffer, waiting, pace = self._buffer, self._waiting, self._pace
        create_future = asyncio.get_running_loop().create_future
        while True:
            if pace.due():
                await pace.turn()
            while not buffer:  # (woken, it may find another task took the delivery first)
                waiter = create_future()
                waiting.append(waiter)
                await waiter
            delivery = buffer.popleft()
            self._busy += 1
            self._idle.clear()
            try:
                await self._handle(delivery)
            except asyncio.CancelledError:
                # Cut short at shutdown: the subscription gives the message back unless the
                # handler settled it early.
                if delivery.settled is None:
                    self.stats.count(Settlement.REQUEUE)
                raise
            except Exception:
                # A bug in luaq itself, not in the handler: keep the message and the worker.
                self.log_budget.log(
                    _log, logging.ERROR, "handling failed", {"consumer": self.entry.id}, True
                )
                try:
                    await self._retry(delivery, self._backoff.delay_after(delivery.attempts))
                except Exception:  # the broker redelivers it when its channel closes
                    self.stats.unsettled += 1
                    self.log_budget.log(
                        _log,
                        logging.ERROR,
                        "giving the message back failed",
                        {"consumer": self.entry.id},
                        True,
                    )
            finally:
                self._held -= 1
                self._busy -= 1
                if not self._busy:
                    self._idle.set()

    async def _handle(self, delivery: Delivery) -> None:
        stats = self.stats
        if not delivery.live:
            # its channel closed while it waited here: the broker has it back
            stats.count(Settlement.STALE)
            return
        if stats.first_at is None:
            stats.first_at = time.monotonic()
        stats.sizes.observe(len(delivery.body))
        key = None
        if self._watch is not None:
            key = self._watch.key(self.queue.id, delivery.body)
            if self._watch.is_poison(key):
                await self._give_up(delivery, "killed", KILLED, ErrorKind.INTERNAL)
                return
        try:
            payload = self._decode(delivery)
        except (ValueError, RecursionError) as exc:
            # A poison message can never succeed: redelivering it would loop forever.
            await self._give_up(delivery, "poison", str(exc))
            return
        if self.entry.auto_ack:
            await self._ack(delivery)
        started = time.monotonic()
        outcome = await self._invoke(payload, delivery, self._settle_early_fn, key)
        if outcome.verdict is Verdict.POISON and delivery.settled is None:
            await self._give_up(delivery, "poison", outcome.error or "")
            return
        stats.processed += 1
        stats.last_at = finished = time.monotonic()
        stats.durations.observe(finished - started)
        failed = outcome.verdict >= Verdict.FAIL
        if failed:
            stats.failed += 1
            # a kind a handler made up counts as UNKNOWN: the metric's labels stay bounded
            kind = ErrorKind.__members__.get(outcome.kind or "", ErrorKind.UNKNOWN)
            stats.errors[kind] = stats.errors.get(kind, 0) + 1
        if delivery.settled is not None:
            # auto_ack, or the handler settled early with msg:ack() / msg:nack()
            if failed:
                self._log_failure(delivery, outcome, "the message was settled before")
        elif outcome.verdict is Verdict.ACK:
            await self._ack(delivery)
        elif failed and self._max_attempts is not None and delivery.attempts >= self._max_attempts:
            await self._give_up(
                delivery, "max_attempts", outcome.error or "", outcome.kind or ErrorKind.UNKNOWN
            )
        else:
            delay = self._backoff.delay_after(delivery.attempts)
            if failed:
                self._log_failure(delivery, outcome, f"retried in {delay:g}s")
            await self._retry(delivery, delay)

    def _decode(self, delivery: Delivery) -> Any:
        if delivery.problem is not None:
            raise ValueError(delivery.problem)
        if self._max_size is not None and len(delivery.body) > self._max_size:
            raise ValueError(
                f"body of {len(delivery.body)} bytes is over max_message_size {self._max_size}"
            )
        return self._decode_body(delivery.body, delivery.content_type)

    def _log_failure(self, delivery: Delivery, outcome: Outcome, then: str) -> None:
        extra: dict[str, Any] = {
            "consumer": self.entry.id,
            "message_id": delivery.id,
            "attempt": delivery.attempts,
            "kind": outcome.kind or "UNKNOWN",
            "error": outcome.error,
            "then": then,
        }
        self.log_budget.log(_log, logging.WARNING, "handler failed", extra)

    async def _settle_early(self, delivery: Delivery, ack: bool) -> None:
        """msg:ack() and msg:nack() from a handler: a nack is a retry, with its backoff."""
        if ack:
            await self._ack(delivery)
        else:
            await self._retry(delivery, self._backoff.delay_after(delivery.attempts))

    async def _ack(self, delivery: Delivery) -> None:
        await delivery.ack()
        self.stats.count(Settlement.ACK, delivery.reached)

    async def _retry(self, delivery: Delivery, delay: float) -> None:
        if delivery.settled is not None:
            return
        if not delivery.live:
            self.stats.count(Settlement.STALE)
            return
        if await delivery.retry(delay):
            self.stats.count(Settlement.RETRY, delivery.reached)
            return
        # The driver could not send it round (a republish failed): keep it here and give it
        # back when its delay is over. Giving it back now would spin, and dropping it would
        # lose it.
        self.stats.count(Settlement.RETRY)
        self._held += 1
        self._holding[delivery] = asyncio.create_task(self._hold(delivery, delay))

    async def _hold(self, delivery: Delivery, delay: float) -> None:
        try:
            await asyncio.sleep(delay)
        finally:
            self._holding.pop(delivery, None)
            self._held -= 1
            remembered = self._requeued_attempts
            remembered[delivery.id] = delivery.attempts
            if len(remembered) > REMEMBERED:
                del remembered[next(iter(remembered))]
            await delivery.nack()

    async def _give_up(
        self, delivery: Delivery, reason: str, error: str, kind: str = ErrorKind.INVALID
    ) -> None:
        """Out of attempts, or poison: to the dead-letter queue; with `dead_letter` but no
        queue, rejected; without `dead_letter` at all, kept and retried with backoff (nothing
        is dropped unless asked for). If the dead-letter queue refuses the message, it is
        retried too: nothing is lost. The line logged here stands for the last failure."""
        what = _GIVING_UP[reason]
        extra = {
            "consumer": self.entry.id,
            "message_id": delivery.id,
            "attempt": delivery.attempts,
            "reason": reason,
            "kind": kind,
            "error": error,
        }
        delay = self._backoff.delay_after(delivery.attempts)
        if self._dead_letter_sink is not None:
            try:
                await self._dead_letter_sink(delivery, reason, error)
            except QueueError as exc:
                self.log_budget.log(
                    _log,
                    logging.ERROR,
                    f"{what}, dead-lettering failed, retried in {delay:g}s",
                    {**extra, "dlq": exc.message},
                )
                await self._retry(delivery, delay)
                return
            await delivery.ack()
            self.stats.count(Settlement.DEAD_LETTER, delivery.reached)
            self.log_budget.log(_log, logging.WARNING, f"{what}, dead-lettered", extra)
        elif self.queue.dead_letter is not None:
            await delivery.nack(requeue=False)
            self.stats.count(Settlement.REJECT, delivery.reached)
            self.log_budget.log(_log, logging.WARNING, f"{what}, rejected", extra)
        else:
            self.log_budget.log(
                _log,
                logging.WARNING,
                f"{what}, retried in {delay:g}s (set dead_letter on queue {self.queue.id} to "
                "move such messages aside)",
                extra,
            )
            await self._retry(delivery, delay)

    async def stop(self, grace: float) -> None:
        """Stop taking deliveries, let running handlers finish, give the rest back: within
        `grace` seconds and CLOSE_TIMEOUT, whatever the broker does."""
        deadline = asyncio.get_running_loop().time() + grace
        if self._subscription is not None:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout_at(deadline):
                    await self._subscription.cancel()
        while self._buffer:
            delivery = self._buffer.popleft()
            self._held -= 1
            await delivery.nack()
            self.stats.count(Settlement.REQUEUE, delivery.reached)
        for task in list(self._holding.values()):
            task.cancel()  # held back for a retry: given back now
        if not self._idle.is_set():
            try:
                async with asyncio.timeout_at(deadline):
                    await self._idle.wait()
            except TimeoutError:
                _log.warning(
                    "handlers still running after the shutdown timeout; their messages are "
                    "requeued",
                    extra={"consumer": self.entry.id, "running": self._busy},
                )
        for task in self._workers:
            task.cancel()
        await asyncio.gather(*self._workers, *self._holding.values(), return_exceptions=True)
        if self._subscription is not None:
            with contextlib.suppress(TimeoutError):  # the driver's close drops what is left
                async with asyncio.timeout(CLOSE_TIMEOUT):
                    await self._subscription.close()
        self._held = 0
        self.log_budget.flush(_log, {"consumer": self.entry.id})
