"""One worker process as `luaq run` runs it, alone or as one of a pod's (supervisor.py): once
started it publishes --input, then runs until SIGTERM or SIGINT (not ready from the signal on,
while its handlers finish) or, with --until-idle, until its queues are empty; then it writes its
summary, a row per consumer (the command line names the columns), and says what it left
unsettled.
"""

from __future__ import annotations

import asyncio
import signal
import sys
import time
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, TextIO

import uvloop

from .errors import EXIT_FAILURE, EXIT_OK, QueueError, failed
from .logs import report

if TYPE_CHECKING:
    from .flight import FlightLog
    from .inputs import InputMessage
    from .worker import Worker


def run(
    worker: Worker,
    messages: Sequence[InputMessage],
    *,
    until_idle: bool,
    grace: float,
    summary: Sequence[str],
    watch: FlightLog | None = None,
) -> int:
    """Run `worker` (on uvloop) until a signal stops it or, `until_idle`, it is idle; then write
    its summary in the `summary` columns. Its exit code. `watch`: its supervisor's, where its
    event loop beats."""
    return uvloop.run(_run(worker, messages, until_idle, grace, summary, watch))


async def _run(
    worker: Worker,
    messages: Sequence[InputMessage],
    until_idle: bool,
    grace: float,
    summary: Sequence[str],
    watch: FlightLog | None,
) -> int:
    loop = asyncio.get_running_loop()
    beating = asyncio.create_task(watch.beating()) if watch is not None else None
    stop = asyncio.Event()

    def stopping() -> None:
        worker.lifecycle.state = "stopping"  # not ready from now on, while handlers finish
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping)
    progress = asyncio.create_task(_progress(worker, sys.stderr)) if sys.stderr.isatty() else None
    try:
        await worker.start()
        for message in messages:
            await worker.host.publish("", message.queue, message.data, message.headers)
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if until_idle:
            waiters.append(asyncio.create_task(worker.wait_idle()))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()  # a failure to tell idleness is not idleness
    except QueueError as exc:
        return failed(exc)
    finally:
        if progress is not None:
            progress.cancel()
            sys.stderr.write("\n")
        await worker.stop(grace)
        if beating is not None:
            beating.cancel()
    _summary(worker, summary, sys.stdout)
    if until_idle and (left := sum(c.stats.unsettled for c in worker.consumers)):
        report(
            f"{left} message(s) left unsettled by an error in luaq (logged above): the queues "
            "look empty, but the broker delivers these again"
        )
        return EXIT_FAILURE
    return EXIT_OK


def _summary(worker: Worker, columns: Sequence[str], out: TextIO) -> None:
    """One row per consumer: invocations, then what became of the messages (see ConsumerStats:
    `stale` ones came on a connection that was lost, and the broker delivers them again)."""
    width = max([len("consumer"), *(len(c.entry.id) for c in worker.consumers)])
    lines = [f"{'consumer':<{width}}  " + "  ".join(f"{c:>7}" for c in columns) + "    msg/s"]
    for consumer in worker.consumers:
        stats = consumer.stats
        values = "  ".join(f"{getattr(stats, c):>{max(len(c), 7)}}" for c in columns)
        lines.append(f"{consumer.entry.id:<{width}}  {values}  {stats.rate:>7.1f}")
    # one write: with --processes, the tables of the processes must not interleave (stdout may
    # be unbuffered: PYTHONUNBUFFERED is common in containers)
    out.write("".join(f"{line}\n" for line in lines))
    out.flush()


async def _progress(worker: Worker, out: TextIO) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        done = sum(c.stats.processed for c in worker.consumers)
        elapsed = time.monotonic() - started
        out.write(f"\r{done} processed in {elapsed:.0f}s ({done / elapsed:.0f} msg/s)  ")
        out.flush()
