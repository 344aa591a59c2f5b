"""Dead letters: the sink a consumer moves a message to when it gives up on it (the message as
it came, with DEAD_LETTER_HEADERS saying why), and `luaq dlq`: look into a dead-letter queue,
move its messages back, or empty it.

Works through the driver interface, so on any driver whose queues outlive a process (the
memory driver's do not). A run takes the messages that were in the queue when it started (its
depth then), as a consumer does, in the queue's order; what is dead-lettered meanwhile waits for
the next run. However many there are, memory stays bounded:

* `list` prints each message as it arrives and keeps none: it holds them unacknowledged (an
  unlimited prefetch), and gives them all back at the end, which puts them back in their places
  (on RabbitMQ: the order is kept, and each is marked redelivered).
* `replay` and `purge` hold at most WINDOW messages at a time (the consumer's prefetch) and
  settle each as they go. `replay` acks a dead letter only once the broker has confirmed its
  copy, and stops at the first failure; `purge` acks them.

Whatever is not acked is given back when the subscription closes.
"""

from __future__ import annotations

import asyncio
import functools
import json
import sys
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import TYPE_CHECKING, Any, TextIO

from .drivers import Delivery, Driver, Subscription
from .entries import Config, ConsumerEntry, QueueEntry
from .errors import EXIT_FAILURE, EXIT_OK, ErrorKind, MaybePublished, QueueError, failed

if TYPE_CHECKING:
    from .consumer import DeadLetterSink
    from .worker import Worker

WINDOW = 500  # messages a replay or purge holds at once: its consumer's prefetch
WAIT = 10.0  # seconds without a message, while more are due, before a run gives up on them
PROGRESS_EVERY = 2.0  # seconds between two progress lines on stderr, in a long run
DEAD_LETTER_HEADERS = (
    "x_dead_letter_reason",
    "x_original_queue",
    "x_attempts",
    "x_last_error",
    "x_failed_at",
)
MAX_ERROR_TEXT = 2000  # characters of a handler's error kept in a dead letter's x_last_error

Report = Callable[[str], None]


def sink(
    source: QueueEntry, queues: Mapping[str, QueueEntry], drivers: Mapping[str, Driver]
) -> DeadLetterSink | None:
    """Where the consumers of `source` move a message they give up on: its dead-letter queue,
    if it has one."""
    if source.dead_letter is None or source.dead_letter.queue is None:
        return None
    target = queues[source.dead_letter.queue]
    driver = drivers[target.driver]

    async def dead_letter(delivery: Delivery, reason: str, error: str) -> None:
        # the message as it came (never with an expiration), and why it is here
        headers = {
            "x_dead_letter_reason": reason,
            "x_original_queue": source.id,
            "x_attempts": delivery.attempts,
            "x_last_error": _shortened(error),
            "x_failed_at": datetime.now(UTC).isoformat(timespec="milliseconds"),
        }
        await driver.forward(target, delivery, headers)

    return dead_letter


def _shortened(text: str) -> str:
    """At most MAX_ERROR_TEXT characters: an error text goes into a header, and the headers of a
    message must fit in one AMQP frame."""
    if len(text) <= MAX_ERROR_TEXT:
        return text
    return f"{text[:MAX_ERROR_TEXT]}... ({len(text) - MAX_ERROR_TEXT} more characters)"


@dataclass
class Outcome:
    """What a run did, for an honest last line and exit code."""

    total: int  # messages in the queue when the run started
    done: int = 0  # listed, replayed or purged
    kept: int = 0  # replay: messages of queues not declared here, moved to the queue's end
    uncertain: list[str] = field(default_factory=list)  # ids that may have been replayed
    twice: list[str] = field(default_factory=list)  # kept, and their copy may be there too
    stopped: str | None = None  # why the run ended before `total`

    @property
    def failed(self) -> bool:
        return self.stopped is not None


class Progress:
    """A line on stderr every PROGRESS_EVERY seconds, from the first one on."""

    def __init__(self, what: str, total: int, report: Report) -> None:
        self.what, self.total, self.report = what, total, report
        self.next = time.monotonic() + PROGRESS_EVERY

    def tick(self, done: int) -> None:
        if (now := time.monotonic()) >= self.next:
            self.next = now + PROGRESS_EVERY
            self.report(f"... {self.what} {done} of {self.total} message(s) so far")


async def depth(driver: Driver, queue: QueueEntry) -> int:
    """Messages in the queue now: how many a run takes."""
    return (await driver.info(queue)).message_count


async def _subscribe(
    driver: Driver, queue: QueueEntry, prefetch: int, on_delivery: Callable[[Delivery], None]
) -> Subscription:
    reader = ConsumerEntry.model_construct(
        id="luaq:dlq",
        kind="queue.consumer",
        file=queue.file,
        queue=queue.id,
        prefetch=prefetch,  # 0: no limit
    )
    return await driver.consume(queue, reader, on_delivery)


def describe(delivery: Delivery) -> dict[str, Any]:
    headers = delivery.headers
    return {
        "id": delivery.id,
        "reason": headers.get("x_dead_letter_reason"),
        "attempts": headers.get("x_attempts"),
        "queue": headers.get("x_original_queue"),
        "failed_at": headers.get("x_failed_at"),
        "error": headers.get("x_last_error"),
    }


def _short(taken: int, total: int, queue: QueueEntry, wait: float) -> str:
    return (
        f"only {taken} of {total} message(s) came within {wait:g}s of each other: another "
        f"consumer may be reading {queue.id}"
    )


async def show(
    driver: Driver,
    queue: QueueEntry,
    total: int,
    out: TextIO,
    report: Report,
    wait: float = WAIT,
) -> Outcome:
    """Print a JSON line per message, each as it arrives, and leave them all in the queue."""
    outcome = Outcome(total)
    if total == 0:
        return outcome
    arrived = asyncio.Event()
    last: list[Delivery] = []  # the one listed last

    def lost() -> bool:
        """Its channel is gone (the connection dropped): the broker has taken every message
        back, and would deliver them all again."""
        if last and not last[0].live and outcome.stopped is None:
            outcome.stopped = (
                f"the connection to the broker was lost after {outcome.done} message(s) "
                "(they are all back in the queue)"
            )
        return outcome.stopped is not None

    def on_delivery(delivery: Delivery) -> None:
        if outcome.done < total and not lost():  # later ones are given back at the end
            outcome.done += 1
            out.write(json.dumps(describe(delivery), ensure_ascii=False, default=str) + "\n")
            last[:] = [delivery]
        arrived.set()

    progress = Progress("listed", total, report)
    subscription = await _subscribe(driver, queue, 0, on_delivery)
    try:
        while outcome.done < total and not lost():
            arrived.clear()
            try:
                async with asyncio.timeout(wait):
                    await arrived.wait()
            except TimeoutError:
                outcome.stopped = _short(outcome.done, total, queue, wait)
                break
            progress.tick(outcome.done)
    finally:
        out.flush()
        await subscription.close()  # gives every message back, in its place
    return outcome


class _Window:
    """Deliveries as they arrive, at most the consumer's prefetch of them unsettled."""

    def __init__(self) -> None:
        self.arrived: asyncio.Queue[Delivery | None] = asyncio.Queue()

    def put(self, delivery: Delivery) -> None:
        self.arrived.put_nowait(delivery)

    def interrupt(self) -> None:
        self.arrived.put_nowait(None)

    async def next(self, wait: float) -> Delivery | None:
        """The next delivery; None when interrupted, TimeoutError after `wait` seconds."""
        async with asyncio.timeout(wait):
            return await self.arrived.get()


async def replay(
    drivers: Mapping[str, Driver],
    queues: Mapping[str, QueueEntry],
    queue: QueueEntry,
    total: int,
    report: Report,
    window: int = WINDOW,
    wait: float = WAIT,
) -> Outcome:
    """Publish each message back to its original queue, as it was, and ack it here once the
    broker has confirmed the copy. Up to `window` copies are in flight at once, the first
    alone: a broker that blocks publishers (a resource alarm) says so only once it has read
    the first publish of a connection, and whatever was sent with it would be in doubt too.

    The first failure stops the run: the copies in flight finish, and every message not
    confirmed stays in the queue, in its place. One whose copy may have been published (sent,
    but not confirmed) is named: it may arrive twice. A message whose original queue is not
    declared here is kept: copied to the end of this queue, then acked."""
    outcome = Outcome(total)
    if total == 0:
        return outcome
    deliveries = _Window()
    pending: set[asyncio.Task[None]] = set()
    progress = Progress("replayed", total, report)

    def stop(why: str) -> None:
        if outcome.stopped is None:
            outcome.stopped = why
            deliveries.interrupt()

    async def move(delivery: Delivery, target: QueueEntry, headers: dict[str, Any]) -> None:
        kept = target is queue
        driver = drivers[target.driver]
        try:
            if kept:  # exactly as it is
                await driver.forward(target, delivery, {})
            else:
                await driver.publish(target, delivery.body, headers, delivery.content_type)
        except MaybePublished as exc:
            (outcome.twice if kept else outcome.uncertain).append(delivery.id)
            where = f"the end of {queue.id}" if kept else target.id
            report(
                f"{delivery.id}: may have been copied to {where}: {exc.message}; it stays in "
                f"its place in {queue.id} as well (at-least-once: it may be there twice)"
            )
            stop(exc.message)
            return
        except QueueError as exc:
            report(f"{delivery.id}: not {'kept' if kept else 'replayed'}: {exc.message}")
            stop(exc.message)
            return
        await delivery.ack()
        if kept:
            outcome.kept += 1
        else:
            outcome.done += 1
            progress.tick(outcome.done)
        if not delivery.reached:  # its channel is gone: the broker has it back
            report(f"{delivery.id}: copied, but the connection was lost before it was removed")
            stop(f"the connection to the broker was lost: {delivery.id} is in {queue.id} too")

    subscription = await _subscribe(drivers[queue.driver], queue, window, deliveries.put)
    try:
        taken = 0
        while taken < total and outcome.stopped is None:
            try:
                delivery = await deliveries.next(wait)
            except TimeoutError:
                if pending:  # the window is full of copies awaiting their confirms
                    await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                    continue
                stop(_short(taken, total, queue, wait))
                break
            if delivery is None or outcome.stopped is not None:
                break  # a failure: this one stays where it is
            if not delivery.live:  # the broker has it back already, and the rest
                stop(f"the connection to the broker was lost after {taken} message(s)")
                break
            taken += 1
            original = delivery.headers.get("x_original_queue")
            target = queues.get(str(original))
            if target is None:
                report(
                    f"{delivery.id}: original queue {original!r} is not declared here; kept "
                    f"(moved to the end of {queue.id})"
                )
                target, headers = queue, {}
            else:
                headers = {
                    k: v for k, v in delivery.headers.items() if k not in DEAD_LETTER_HEADERS
                }
                headers["message_id"] = delivery.id
            task = asyncio.create_task(move(delivery, target, headers))
            pending.add(task)
            task.add_done_callback(pending.discard)
            if taken == 1:
                await task
    finally:
        if pending:
            await asyncio.wait(pending)  # each bounded by the driver's publish timeout
        await subscription.close()  # gives back every message not acked, in its place
    return outcome


async def purge(
    driver: Driver,
    queue: QueueEntry,
    total: int,
    report: Report,
    window: int = WINDOW,
    wait: float = WAIT,
) -> Outcome:
    """Ack the `total` messages at the head of the queue (those there when the run started)."""
    outcome = Outcome(total)
    if total == 0:
        return outcome
    deliveries = _Window()
    progress = Progress("purged", total, report)
    subscription = await _subscribe(driver, queue, window, deliveries.put)
    try:
        while outcome.done < total:
            try:
                delivery = await deliveries.next(wait)
            except TimeoutError:
                outcome.stopped = _short(outcome.done, total, queue, wait)
                break
            assert delivery is not None  # nothing interrupts a purge
            await delivery.ack()
            if not delivery.reached:
                outcome.stopped = f"the broker could not be told to delete {delivery.id}"
                break
            outcome.done += 1
            progress.tick(outcome.done)
    finally:
        await subscription.close()
    return outcome


def require_durable(config: Config, queue: QueueEntry) -> None:
    if config.drivers[queue.driver].kind == "queue.driver.memory":
        raise QueueError(
            ErrorKind.INVALID,
            f"{queue.id} is on an in-memory driver: its messages live only inside a running "
            "worker, there is nothing to inspect from here",
        )


async def command(worker: Worker, action: str, queue_id: str, yes: bool) -> int:
    """`luaq dlq ACTION QUEUE_ID` on the worker's drivers: 1 when the run ends before it went
    through the messages it found (the first broker refusal, a copy not confirmed, messages
    that never came), saying what it did."""
    report = functools.partial(print, file=sys.stderr)
    try:
        queue = worker.host.queue(worker.config.namespace, queue_id)
        require_durable(worker.config, queue)
        await worker.connect()
        driver = worker.drivers[queue.driver]
        total = await depth(driver, queue)
        if action == "list":
            outcome = await show(driver, queue, total, sys.stdout, report)
            report(f"listed {outcome.done} of {total} message(s) in {queue.id}")
        elif action == "replay":
            outcome = await replay(worker.drivers, worker.config.queues, queue, total, report)
            print(_replayed(outcome, queue.id))
        elif _confirmed(yes, f"delete {total} message(s) of {queue.id}"):
            outcome = await purge(driver, queue, total, report)
            print(f"purged {outcome.done} of {total} message(s)")
        else:
            report("nothing deleted")
            return EXIT_OK
    except QueueError as exc:
        return failed(exc)
    finally:
        await worker.stop(0)
    if outcome.stopped is not None:
        report(f"luaq: stopped: {outcome.stopped}")
        return EXIT_FAILURE
    return EXIT_OK


def _replayed(outcome: Outcome, queue_id: str) -> str:
    """`replayed 3 of 10 message(s)`, and what became of the others."""
    parts = [f"replayed {outcome.done} of {outcome.total} message(s)"]
    if outcome.kept:
        parts.append(f"{outcome.kept} kept: their queue is not declared here")
    if outcome.uncertain:
        parts.append(
            f"{len(outcome.uncertain)} may have been replayed, and stay in {queue_id} as well: "
            + " ".join(outcome.uncertain)
        )
    if outcome.twice:
        parts.append(
            f"{len(outcome.twice)} kept may be in {queue_id} twice: " + " ".join(outcome.twice)
        )
    if outcome.stopped is not None:
        left = outcome.total - outcome.done - outcome.kept
        left -= len(outcome.uncertain) + len(outcome.twice)
        parts.append(f"stopped at the first failure: {left} not replayed, still in {queue_id}")
    return "; ".join(parts)


def _confirmed(yes: bool, what: str) -> bool:
    if yes:
        return True
    if not sys.stdin.isatty():
        print(f"refusing to {what} without --yes (no terminal to ask on)", file=sys.stderr)
        return False
    return input(f"{what}? [y/N] ").strip().lower() in ("y", "yes")
