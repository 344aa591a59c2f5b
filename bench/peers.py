"""luaq beside the Python consumer frameworks, the broker's limit and latency, in one run.

    python bench/peers.py [--messages 20000] [--rounds 3] [--latency-seconds 20] [--no-profile]

Needs a RabbitMQ on this machine (--url, default amqp://guest:guest@127.0.0.1:5672/) and its
`rabbitmqctl`: the run creates a vhost of its own and deletes it at the end, so it touches no
other queue. The peers come with luaq's `bench` extra (`pip install -e '.[bench]'`).

Throughput: the same workload for every framework, on a fresh durable queue each time: N small
JSON messages pre-published, then consumed by a no-op handler (`consume`), then the same with one
publish per input (`publish`). The frameworks run one after the other, in the opposite order
every other round; the JSON has the medians over the rounds. Each is configured as its
documentation recommends for throughput ("settings" in the JSON says how):

  luaq        a Worker in this process, as `luaq run` runs it: the AMQP driver, a Lua handler
  minimal     luaq's own AMQP client alone, a Python callback that acks: the broker's limit
  aio_pika    aio-pika's callback consumer
  faststream  a FastStream RabbitBroker subscriber
  dramatiq    `dramatiq` workers (bench/peer_dramatiq.py)
  celery      a `celery worker` (bench/peer_celery.py)

A rate is counted from the first message settled to the last (N minus those settled before the
first look, over the time between), so start-up costs nobody anything. "cpu_us_per_msg" is the
CPU time the consumer's processes and the broker (beam.smp, with whatever else it served
meanwhile) spent per message: on a small machine, that is where the time goes.

Latency: a separate process publishes at a fixed rate (--latency-rate, by default half the most
luaq carries on that load: "luaq_end_to_end_max", the publisher going as fast as the broker
confirms while luaq consumes, messages over the time until luaq had them all; on a small machine
publisher, broker and consumer share the cores, so this is less than luaq's `consume` rate,
which is the broker only delivering) for --latency-seconds, each message with a `sent_at` header
(time.time()); luaq's Lua handler takes `time.now() - msg:header("sent_at")` (time.now() is
time.time() too) and, once all have arrived, sends its samples back through a queue; aio-pika's
callback does the same in Python. "backlog_s" is how long the consumer took to catch up after the
last publish (0: it kept up), "cores_busy" what the publisher, the broker and the consumer used.

Then luaq runs each workload once more under py-spy, and "profile" shows where its process
spent its time: the share of samples by innermost function and file ("Runner.run" there is the
event loop's own C code, uvloop's socket reads and writes). The JSON also lists the targets the
issue set, and those this run missed. A target over a peer is 5x that peer, or 0.8x the minimal
consumer (the broker's limit, in the same run) when that is lower: 5x a peer that comes close to
the broker asks more of luaq than the broker can deliver to anyone.
"""

from __future__ import annotations

import abc
import argparse
import asyncio
import concurrent.futures
import contextlib
import importlib.metadata
import json
import math
import multiprocessing
import os
import platform
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import Any, ClassVar
from urllib.parse import quote, urlsplit, urlunsplit

import aio_pika
import aiormq
import celery
import dramatiq
import psutil
import uvloop
from dramatiq.brokers.rabbitmq import RabbitmqBroker
from faststream.rabbit import Channel as RabbitChannel
from faststream.rabbit import RabbitBroker, RabbitQueue
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.drivers.amqp.client import Channel, Confirm, Connection, Endpoint
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker
from rabbitmq import BODY, delete, entries_file, fill

HERE = Path(__file__).parent
BIN = Path(sys.executable).parent
PAYLOAD = json.loads(BODY)
PERSISTENT = {"content_type": "application/json", "delivery_mode": 2}
WORKLOADS = ("consume", "publish")
POLL = 0.001
# The latency publisher sends what is due every TICK, each message stamped as it leaves: a
# shorter sleep would only spin, since the event loop's timers count milliseconds.
TICK = 0.001
WINDOW = 2000  # unconfirmed messages of a publisher going as fast as it can
STALL = 60.0  # seconds without progress before a run is declared stuck
CPUS = os.cpu_count() or 1

MINIMAL_SHARE = 0.8
TARGETS = {"faststream": 5.0, "dramatiq": 5.0, "celery": 5.0, "minimal": MINIMAL_SHARE}
P99_TARGET_MS = 50.0


@dataclass(frozen=True)
class Bench:
    url: str  # in the run's own vhost
    messages: int
    prefetch: int
    concurrency: int
    workdir: Path
    broker: list[psutil.Process]  # the broker's process, when it runs on this machine

    @property
    def options(self) -> argparse.Namespace:
        """What bench/rabbitmq.py's entries_file reads."""
        return argparse.Namespace(prefetch=self.prefetch, concurrency=self.concurrency)


@dataclass(frozen=True)
class Queues:
    inbox: str
    outbox: str  # where the `publish` workload's handlers publish

    @classmethod
    def new(cls, peer: str, workload: str) -> Queues:
        tag = f"{peer}-{workload}-{uuid.uuid4().hex[:8]}"
        return cls(f"bench-{tag}", f"bench-{tag}-out")


@dataclass
class Consumer:
    """A consumer at work: how many messages it has settled so far, which processes do the work,
    and a check that raises when it died."""

    settled: Callable[[], int]
    processes: Callable[[], list[psutil.Process]] = lambda: [psutil.Process()]
    check: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Run:
    rate: float
    consumer_cpu_us: float
    broker_cpu_us: float | None


class Peer(abc.ABC):
    """A framework under test: how it is set up, how its queue is filled, how it consumes."""

    name: ClassVar[str]

    @abc.abstractmethod
    def settings(self, bench: Bench) -> dict[str, Any]:
        """How it is configured, for the report."""

    async def fill(self, bench: Bench, queues: Queues, workload: str) -> None:
        await fill(bench.url, queues.inbox, bench.messages)
        await fill(bench.url, queues.outbox, 0)  # declared, for the handlers to publish to

    @abc.abstractmethod
    def consume(
        self, bench: Bench, queues: Queues, workload: str
    ) -> contextlib.AbstractAsyncContextManager[Consumer]:
        """The consumer, started; stopped when the context exits."""

    def queue_names(self, queues: Queues) -> list[str]:
        return [queues.inbox, queues.outbox]


LUA = {
    "consume": "function handle(payload) end",
    "publish": 'function handle(payload) return queue.publish("bench:out", payload) end',
}


class Luaq(Peer):
    name = "luaq"

    def settings(self, bench: Bench) -> dict[str, Any]:
        return {
            "run": "a Worker in the bench's process, as `luaq run` runs it (one process, uvloop)",
            "driver": "queue.driver.amqp",
            "handler": LUA,
            "concurrency": f"{bench.concurrency} handlers at once"
            + (
                " (the prefetch: any message in flight can be in a handler, as the README advises "
                "for handlers that wait on the broker)"
                if bench.concurrency == bench.prefetch
                else ""
            ),
            "prefetch": bench.prefetch,
            "ack": "after the handler returns",
            "publish": "publisher confirms, persistent, awaited before the ack",
        }

    @contextlib.asynccontextmanager
    async def consume(self, bench: Bench, queues: Queues, workload: str) -> AsyncIterator[Consumer]:
        async with luaq_worker(bench, queues, LUA[workload]) as worker:
            stats = worker.consumers[0].stats
            yield Consumer(lambda: stats.acked)


@contextlib.asynccontextmanager
async def luaq_worker(
    bench: Bench, queues: Queues, lua: str, modules: tuple[str, ...] = entries.DEFAULT_MODULES
) -> AsyncIterator[Worker]:
    with tempfile.TemporaryDirectory(dir=bench.workdir) as tmp:
        ids = {"in": queues.inbox, "out": queues.outbox}
        path = entries_file(Path(tmp), bench.url, lua, ids, bench.options, modules)
        worker = build(load(entries.load([path]), Settings()))
        await worker.start()
        try:
            yield worker
        finally:
            await worker.stop(5.0)


class Minimal(Peer):
    name = "minimal"

    def settings(self, bench: Bench) -> dict[str, Any]:
        return {
            "run": "luaq's AMQP client alone (Connection, Channel.consume) in the bench's "
            "process, uvloop",
            "handler": "a Python callback that acks at once",
            "prefetch": bench.prefetch,
            "publish": "a second channel with confirms; the input acked on the confirm",
        }

    @contextlib.asynccontextmanager
    async def consume(self, bench: Bench, queues: Queues, workload: str) -> AsyncIterator[Consumer]:
        connection = await Connection.open(Endpoint.from_url(bench.url))
        try:
            channel = await connection.channel()
            await channel.qos(bench.prefetch)
            settled = 0

            def ack(tag: int) -> None:
                nonlocal settled
                channel.ack(tag)
                settled += 1

            if workload == "consume":
                await channel.consume(queues.inbox, lambda tag, *_: ack(tag), "bench")
            else:
                out = await connection.channel()
                await out.confirm_select()
                on_message = relay(channel, out, queues.outbox, ack)
                await channel.consume(queues.inbox, on_message, "bench")
            yield Consumer(lambda: settled)
        finally:
            await connection.close()


def relay(
    channel: Channel, out: Channel, queue: str, ack: Callable[[int], None]
) -> Callable[[int, bool, dict[str, Any], bytes], None]:
    def on_message(tag: int, redelivered: bool, properties: dict[str, Any], body: bytes) -> None:
        def settle(confirm: asyncio.Future[str]) -> None:
            if confirm.result() == Confirm.ACK:
                ack(tag)
            else:
                channel.nack(tag, requeue=True)

        out.publish(body, queue, PERSISTENT).add_done_callback(settle)

    return on_message


class AioPika(Peer):
    name = "aio_pika"

    def settings(self, bench: Bench) -> dict[str, Any]:
        return {
            "version": importlib.metadata.version("aio-pika"),
            "run": "in the bench's process, uvloop: connect_robust, channel.set_qos, "
            "queue.consume(callback), `async with message.process()` (ack when it exits)",
            "prefetch": bench.prefetch,
            "publish": "default_exchange.publish in the callback, persistent, publisher "
            "confirms (aio-pika's default), before the ack",
        }

    @contextlib.asynccontextmanager
    async def consume(self, bench: Bench, queues: Queues, workload: str) -> AsyncIterator[Consumer]:
        connection = await aio_pika.connect_robust(bench.url)
        try:
            channel = await connection.channel()
            await channel.set_qos(prefetch_count=bench.prefetch)
            queue = await channel.declare_queue(queues.inbox, durable=True)
            exchange = channel.default_exchange
            publish = workload == "publish"
            settled = 0

            async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
                nonlocal settled
                async with message.process():
                    if publish:
                        await exchange.publish(
                            aio_pika.Message(
                                message.body,
                                content_type="application/json",
                                delivery_mode=aio_pika.DeliveryMode.PERSISTENT,
                            ),
                            routing_key=queues.outbox,
                        )
                settled += 1

            await queue.consume(on_message)
            yield Consumer(lambda: settled)
        finally:
            await connection.close()


class FastStream(Peer):
    name = "faststream"

    def settings(self, bench: Bench) -> dict[str, Any]:
        return {
            "version": importlib.metadata.version("faststream"),
            "run": "RabbitBroker in the bench's process, uvloop (as `faststream run` runs it), "
            "per-message logs off (logger=None, as --log-level warning)",
            "handler": "@broker.subscriber(RabbitQueue(durable=True)) async def, payload: dict",
            "prefetch": f"{bench.prefetch} (default_channel=Channel(prefetch_count=...))",
            "ack": "after the handler (the default AckPolicy)",
            "publish": "@broker.publisher(queue) on the handler, which returns the payload: "
            "publisher confirms, not persistent (FastStream's defaults)",
        }

    @contextlib.asynccontextmanager
    async def consume(self, bench: Bench, queues: Queues, workload: str) -> AsyncIterator[Consumer]:
        broker = RabbitBroker(
            bench.url, default_channel=RabbitChannel(prefetch_count=bench.prefetch), logger=None
        )
        subscriber = broker.subscriber(RabbitQueue(queues.inbox, durable=True))
        settled = 0
        if workload == "consume":

            @subscriber
            async def noop(payload: dict[str, Any]) -> None:
                nonlocal settled
                settled += 1
        else:

            @subscriber
            @broker.publisher(RabbitQueue(queues.outbox, durable=True))
            async def forward(payload: dict[str, Any]) -> dict[str, Any]:
                nonlocal settled
                settled += 1
                return payload

        async with broker:
            await broker.start()
            yield Consumer(lambda: settled)


class Command(Peer):
    """A framework run by its own worker command, in processes of its own; its tasks write a
    byte per message done to a file that the bench counts."""

    @abc.abstractmethod
    def command(self, bench: Bench, queues: Queues) -> list[str]:
        """The worker command, as its users run it."""

    async def fill(self, bench: Bench, queues: Queues, workload: str) -> None:
        """The framework's own messages, sent by the framework (which declares its queues)
        without publisher confirms, its default: its connection stays open until they are all in
        the queue, since a broker that blocks publishers (a resource alarm) loses what it had not
        read yet when the connection closes."""
        loop = asyncio.get_running_loop()
        what = f"{self.name} {workload}: filling"

        def arrived() -> None:
            coroutine = filled(what, bench.url, queues.inbox, bench.messages)
            asyncio.run_coroutine_threadsafe(coroutine, loop).result()

        await asyncio.to_thread(self.send, bench, queues, workload, arrived)

    @abc.abstractmethod
    def send(
        self, bench: Bench, queues: Queues, workload: str, arrived: Callable[[], None]
    ) -> None:
        """Publish the workload's messages, call `arrived` (which returns once they are all in
        the queue), disconnect."""

    @contextlib.asynccontextmanager
    async def consume(self, bench: Bench, queues: Queues, workload: str) -> AsyncIterator[Consumer]:
        done = bench.workdir / f"{queues.inbox}.done"
        done.touch()
        log_path = bench.workdir / f"{queues.inbox}.log"
        environment = {
            **os.environ,
            "BENCH_URL": bench.url,
            "BENCH_IN": queues.inbox,
            "BENCH_OUT": queues.outbox,
            "BENCH_DONE": str(done),
        }
        with log_path.open("wb") as log:
            process = await asyncio.create_subprocess_exec(
                *self.command(bench, queues),
                cwd=HERE,
                env=environment,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        root = psutil.Process(process.pid)

        def check() -> None:
            if process.returncode is not None:
                tail = log_path.read_text(errors="replace")[-2000:]
                raise RuntimeError(f"{self.name} exited with {process.returncode}:\n{tail}")

        try:
            yield Consumer(
                lambda: done.stat().st_size,
                lambda: [root, *root.children(recursive=True)],
                check,
            )
        finally:
            await stop(process)


def shown(command: list[str]) -> str:
    return " ".join([Path(command[0]).name, *command[1:]])


async def stop(process: asyncio.subprocess.Process) -> None:
    """At once, the whole process group (its main process may have died and left workers): the
    work is done and counted, and a graceful shutdown takes Celery and Dramatiq seconds."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(process.pid, signal.SIGKILL)
    await process.wait()


class Dramatiq(Command):
    name = "dramatiq"
    threads = 8  # Dramatiq's default

    def settings(self, bench: Bench) -> dict[str, Any]:
        return {
            "version": importlib.metadata.version("dramatiq"),
            "run": shown(self.command(bench, Queues("IN", "OUT"))),
            "broker": "RabbitmqBroker (pika)",
            "processes": f"{CPUS} (its default: one per CPU)",
            "threads": f"{self.threads} per process (its default)",
            "prefetch": f"{2 * self.threads} per process (its default: 2 x threads)",
            "ack": "after the actor (Dramatiq always acks late)",
            "publish": "forward.send(payload) in the actor (no publisher confirms, "
            "Dramatiq's default)",
        }

    def command(self, bench: Bench, queues: Queues) -> list[str]:
        return [str(BIN / "dramatiq"), "peer_dramatiq", "--processes", str(CPUS),
                "--threads", str(self.threads), "--queues", queues.inbox]  # fmt: skip

    def send(
        self, bench: Bench, queues: Queues, workload: str, arrived: Callable[[], None]
    ) -> None:
        actor = "noop" if workload == "consume" else "relay"
        broker = RabbitmqBroker(url=bench.url)
        try:
            for _ in range(bench.messages):
                message = dramatiq.Message(
                    queue_name=queues.inbox,
                    actor_name=actor,
                    args=(PAYLOAD,),
                    kwargs={},
                    options={},
                )
                broker.enqueue(message)
            arrived()
        finally:
            broker.close()

    def queue_names(self, queues: Queues) -> list[str]:
        return [f"{name}{suffix}" for name in super().queue_names(queues)
                for suffix in ("", ".DQ", ".XQ")]  # fmt: skip


class Celery(Command):
    name = "celery"
    prefetch_multiplier = 64  # "lots of short tasks": Celery's Optimizing guide says 64 or 128

    def settings(self, bench: Bench) -> dict[str, Any]:
        return {
            "version": importlib.metadata.version("celery"),
            "run": shown(self.command(bench, Queues("IN", "OUT"))),
            "broker": "RabbitMQ through kombu (py-amqp)",
            "pool": f"prefork, {CPUS} processes (its default: one per CPU)",
            "prefetch": f"{self.prefetch_multiplier} x {CPUS} (worker_prefetch_multiplier, "
            "high for many short tasks as its Optimizing guide advises)",
            "ack": "task_acks_late=True (after the task), task_ignore_result=True",
            "publish": "forward.delay(payload) in the task (no publisher confirms, Celery's "
            "default)",
        }

    def command(self, bench: Bench, queues: Queues) -> list[str]:
        return [str(BIN / "celery"), "-A", "peer_celery", "worker", "--pool", "prefork",
                "--concurrency", str(CPUS), "--prefetch-multiplier",
                str(self.prefetch_multiplier), "--queues", queues.inbox, "--loglevel", "WARNING",
                "--without-mingle", "--without-gossip", "--without-heartbeat"]  # fmt: skip

    def send(
        self, bench: Bench, queues: Queues, workload: str, arrived: Callable[[], None]
    ) -> None:
        task = "noop" if workload == "consume" else "relay"
        app = celery.Celery("bench", broker=bench.url)
        try:
            with app.producer_or_acquire() as producer:
                for _ in range(bench.messages):
                    app.send_task(task, args=(PAYLOAD,), queue=queues.inbox, producer=producer)
                arrived()
        finally:
            app.close()


PEERS: dict[str, Peer] = {
    peer.name: peer for peer in (Luaq(), Minimal(), AioPika(), FastStream(), Dramatiq(), Celery())
}


def cpu_seconds(processes: list[psutil.Process]) -> float:
    total = 0.0
    for process in processes:
        with contextlib.suppress(psutil.NoSuchProcess):
            times = process.cpu_times()
            total += times.user + times.system
    return total


async def depth(url: str, queue: str) -> int:
    """Ready messages, by a passive declare."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.queue_declare(queue, passive=True)
        return int(declared.message_count or 0)
    finally:
        await connection.close()


async def filled(what: str, url: str, queue: str, total: int) -> None:
    """Wait for all `total` messages to be in the queue."""
    deadline = time.monotonic() + STALL
    while (ready := await depth(url, queue)) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{what}: {ready:,} of {total:,} messages in the queue")
        await asyncio.sleep(0.05)
    if ready != total:
        raise RuntimeError(f"{what}: {ready:,} messages in the queue, not {total:,}")


async def progress(what: str, count: Callable[[], int], done: Callable[[int], bool],
                   check: Callable[[], None] = lambda: None) -> None:  # fmt: skip
    """Poll `count` until `done`; a count that does not move for STALL seconds is an error."""
    last, moved = count(), time.monotonic()
    while not done(last):
        check()
        await asyncio.sleep(POLL)
        now = count()
        if now != last:
            last, moved = now, time.monotonic()
        elif time.monotonic() - moved > STALL:
            raise TimeoutError(f"{what}: stuck at {now:,} for {STALL:.0f}s")


async def measure(
    bench: Bench, peer: Peer, workload: str, around: Callable[[], Any] = contextlib.nullcontext
) -> Run:
    """One run: fill, consume to the end, count from the first message settled to the last.
    `around` wraps the consumer's life (a profiler)."""
    what = f"{peer.name} {workload}"
    queues = Queues.new(peer.name, workload)
    total = bench.messages
    try:
        await peer.fill(bench, queues, workload)
        with around():
            async with peer.consume(bench, queues, workload) as consumer:
                await progress(what, consumer.settled, lambda n: n > 0, consumer.check)
                started, first = time.perf_counter(), consumer.settled()
                processes = consumer.processes()
                cpu = cpu_seconds(processes), cpu_seconds(bench.broker)
                await progress(what, consumer.settled, lambda n: n >= total, consumer.check)
                elapsed = time.perf_counter() - started
                used = cpu_seconds(processes) - cpu[0], cpu_seconds(bench.broker) - cpu[1]
                settled = consumer.settled()
    finally:
        await delete(bench.url, *peer.queue_names(queues))
    if settled != total:
        raise RuntimeError(f"{what}: {settled:,} messages settled, not {total:,}")
    counted = total - first
    if counted == 0:
        raise RuntimeError(
            f"{what}: all settled before the first look: too few to time (--messages)"
        )
    return Run(
        rate=counted / elapsed,
        consumer_cpu_us=used[0] / counted * 1e6,
        broker_cpu_us=used[1] / counted * 1e6 if bench.broker else None,
    )


# Latency

LATENCY_LUA = """
local samples = {}

function handle(payload)
  local msg = queue.message()
  local sent = msg:header("sent_at")
  if sent then
    samples[#samples + 1] = time.now() - sent
    return
  end
  -- the bench asks for the samples: 10,000 to a message
  for first = 1, #samples, 10000 do
    local last = math.min(first + 9999, #samples)
    local _, err = queue.publish("bench:out", table.concat(samples, ",", first, last))
    if err then
      return nil, err
    end
  end
  samples = {}
end
"""


@dataclass(frozen=True)
class Published:
    messages: int
    seconds: float
    cpu_seconds: float  # the publisher's


def publish_at(url: str, queue: str, rate: float | None, seconds: float) -> Published:
    """In a process of its own: publish at `rate` for `seconds` (None: as fast as the broker
    confirms, WINDOW messages unconfirmed at most), each message with the time it left in a
    `sent_at` header."""
    return uvloop.run(_publish_at(url, queue, rate, seconds))


async def _publish_at(url: str, queue: str, rate: float | None, seconds: float) -> Published:
    cpu = time.process_time()
    connection = await Connection.open(Endpoint.from_url(url))
    channel = await connection.channel()
    await channel.confirm_select()
    total = max(1, round(rate * seconds)) if rate is not None else sys.maxsize
    confirms = []
    unconfirmed = 0

    def confirmed(_: asyncio.Future[str]) -> None:
        nonlocal unconfirmed
        unconfirmed -= 1

    loop = asyncio.get_running_loop()
    started = loop.time()
    sent = 0
    while sent < total:
        elapsed = loop.time() - started
        if rate is not None:
            due = min(total, int(elapsed * rate) + 1)
        elif elapsed < seconds:
            due = sent + WINDOW - unconfirmed
        else:
            break
        for _ in range(due - sent):
            headers = {"sent_at": time.time()}
            confirm = channel.publish(BODY, queue, {**PERSISTENT, "headers": headers})
            confirm.add_done_callback(confirmed)
            confirms.append(confirm)
        unconfirmed += due - sent
        sent = due
        await asyncio.sleep(TICK)
    elapsed = loop.time() - started
    outcomes = set(await asyncio.gather(*confirms))
    await connection.close()
    if outcomes != {Confirm.ACK}:
        raise RuntimeError(f"the broker did not take every message: {outcomes}")
    return Published(sent, elapsed, time.process_time() - cpu)


@dataclass(frozen=True)
class Load:
    """A latency run: what was published, and the consumer until it had received it all."""

    published: Published
    backlog_seconds: float  # from the last publish to the last message received
    consumer_cpu_seconds: float
    broker_cpu_seconds: float | None

    def summary(self, samples: list[float]) -> dict[str, Any]:
        ordered = sorted(samples)

        def rank(share: float) -> float:
            return round(ordered[math.ceil(share * len(ordered)) - 1] * 1000, 2)

        published = self.published
        cpu = {
            "publisher": published.cpu_seconds,
            "broker": self.broker_cpu_seconds,
            "consumer": self.consumer_cpu_seconds,
        }
        busy = sum(seconds or 0 for seconds in cpu.values())
        return {
            "published": published.messages,
            "publish_rate": round(published.messages / published.seconds),
            "p50_ms": rank(0.50),
            "p99_ms": rank(0.99),
            "max_ms": rank(1.0),
            "backlog_s": round(self.backlog_seconds, 2),
            "end_to_end_rate": round(
                published.messages / (published.seconds + self.backlog_seconds)
            ),
            "cpu_us_per_msg": {
                who: None if seconds is None else round(seconds / published.messages * 1e6, 1)
                for who, seconds in cpu.items()
            },
            "cores_busy": round(busy / (published.seconds + self.backlog_seconds), 2),
        }


Publish = Callable[[], Awaitable[Published]]


async def under_load(
    what: str, bench: Bench, publish: Publish, received: Callable[[], int]
) -> Load:
    """Publish, and wait until the consumer has received it all; the CPU time meanwhile of the
    publisher, the broker and this process (the consumer's)."""
    self = [psutil.Process()]
    cpu = cpu_seconds(self), cpu_seconds(bench.broker)
    published = await publish()
    last = time.perf_counter()
    await progress(what, received, lambda n: n >= published.messages)
    return Load(
        published,
        time.perf_counter() - last,
        cpu_seconds(self) - cpu[0],
        cpu_seconds(bench.broker) - cpu[1] if bench.broker else None,
    )


async def latency(
    bench: Bench,
    peer: str,
    rate: float | None,
    seconds: float,
    publisher: concurrent.futures.Executor,
) -> dict[str, Any]:
    """A latency run of `peer` at `rate`; None: as fast as publisher, broker and luaq go."""
    queues = Queues.new(f"latency-{peer}", "consume")
    await fill(bench.url, queues.inbox, 0)
    await fill(bench.url, queues.outbox, 0)
    loop = asyncio.get_running_loop()

    def publish() -> Awaitable[Published]:
        return loop.run_in_executor(publisher, publish_at, bench.url, queues.inbox, rate, seconds)

    try:
        if peer == "luaq":
            return await luaq_latency(bench, queues, publish)
        return await aio_pika_latency(bench, queues, publish)
    finally:
        await delete(bench.url, queues.inbox, queues.outbox)


async def luaq_latency(bench: Bench, queues: Queues, publish: Publish) -> dict[str, Any]:
    async with luaq_worker(bench, queues, LATENCY_LUA, ("queue", "time")) as worker:
        stats = worker.consumers[0].stats
        load = await under_load("luaq latency", bench, publish, lambda: stats.acked)
        await worker.host.publish("bench", "in", "report", {})
        samples: list[float] = []
        connection = await aio_pika.connect(bench.url)
        try:
            channel = await connection.channel()
            report = await channel.declare_queue(queues.outbox, durable=True)
            async with asyncio.timeout(STALL), report.iterator() as messages:
                async for message in messages:
                    await message.ack()
                    samples.extend(float(value) for value in json.loads(message.body).split(","))
                    if len(samples) >= load.published.messages:
                        break
        finally:
            await connection.close()
    return load.summary(samples)


async def aio_pika_latency(bench: Bench, queues: Queues, publish: Publish) -> dict[str, Any]:
    samples: list[float] = []
    connection = await aio_pika.connect_robust(bench.url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=bench.prefetch)
        queue = await channel.declare_queue(queues.inbox, durable=True)

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            async with message.process():
                samples.append(time.time() - float(message.headers["sent_at"]))

        await queue.consume(on_message)
        load = await under_load("aio-pika latency", bench, publish, lambda: len(samples))
    finally:
        await connection.close()
    return load.summary(samples)


# Where the time goes


class PySpyFailed(RuntimeError):
    pass


@contextlib.contextmanager
def profiled(output: Path) -> Iterator[None]:
    """py-spy samples this process while the block runs: on-CPU time only, and without pausing
    it (--nonblocking), so that the profile shows a run like the others."""
    spy = subprocess.Popen(
        [str(BIN / "py-spy"), "record", "--pid", str(os.getpid()), "--format", "raw",
         "--output", str(output), "--rate", "250", "--nonblocking"],
        stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
    )  # fmt: skip
    assert spy.stdout is not None
    started = spy.stdout.readline()  # "py-spy> Sampling process 250 times a second..."
    if "Sampling" not in started:
        spy.kill()
        raise PySpyFailed(f"py-spy did not start: {started}{spy.stdout.read()}".strip())
    try:
        yield
    finally:
        spy.send_signal(signal.SIGINT)
        spy.communicate(timeout=30)


def hot_spots(raw: str, top: int = 12) -> dict[str, Any]:
    """py-spy's raw output (one `frame;frame;... count` line per stack) as the share of samples
    whose innermost frame is in each function, and in each file."""
    functions: Counter[str] = Counter()
    files: Counter[str] = Counter()
    for line in raw.splitlines():
        stack, _, count = line.rpartition(" ")
        if not count.isdigit():  # a line py-spy cut short when it stopped
            continue
        leaf = stack.rsplit(";", 1)[-1]
        function, _, where = leaf.partition(" (")
        path = where.rstrip(")").rsplit(":", 1)[0]
        short = path.split("site-packages/")[-1].removeprefix(f"{HERE.parent}/")
        functions[f"{function} ({short})"] += int(count)
        files[short] += int(count)
    samples = sum(files.values())

    def shares(counter: Counter[str]) -> dict[str, float]:
        return {name: round(100 * n / samples, 1) for name, n in counter.most_common(top)}

    return {"samples": samples, "self_percent_by_function": shares(functions),
            "self_percent_by_file": shares(files)}  # fmt: skip


# The run


@contextlib.contextmanager
def vhost(url: str) -> Iterator[str]:
    """A vhost of the run's own, the URL's user allowed in; deleted (queues and all) after."""
    name = f"luaq-bench-{uuid.uuid4().hex[:8]}"
    parts = urlsplit(url)
    rabbitmqctl("add_vhost", name)
    try:
        rabbitmqctl("set_permissions", "-p", name, parts.username or "guest", ".*", ".*", ".*")
        yield urlunsplit(parts._replace(path="/" + quote(name, safe="")))
    finally:
        rabbitmqctl("delete_vhost", name)


def rabbitmqctl(*args: str) -> str:
    try:
        result = subprocess.run(["rabbitmqctl", "-q", *args], capture_output=True, text=True,
                                timeout=60, check=False)  # fmt: skip
    except FileNotFoundError:
        sys.exit("peers.py needs rabbitmqctl (it creates a vhost of its own): run it on the "
                 "broker's machine")  # fmt: skip
    if result.returncode != 0:
        sys.exit(f"rabbitmqctl {' '.join(args)}: {result.stderr.strip()}")
    return result.stdout.strip()


def machine(url: str) -> dict[str, Any]:
    model = next(
        (line.split(":", 1)[1].strip() for line in Path("/proc/cpuinfo").read_text().splitlines()
         if line.startswith("model name")), platform.processor(),
    )  # fmt: skip
    return {
        "cpu": model,
        "cpus": CPUS,
        "memory_gib": round(psutil.virtual_memory().total / 2**30),
        "os": platform.platform(),
        "python": platform.python_version(),
        "rabbitmq": uvloop.run(broker_version(url)),
        "luaq": importlib.metadata.version("luaq"),
        "load_average_at_start": [round(load, 2) for load in os.getloadavg()],
    }


async def broker_version(url: str) -> Any:
    connection = await aiormq.connect(url)
    await connection.close()
    return connection.server_properties.get("version")


def arguments() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.split("\n\n")[0], formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=__doc__.split("\n\n", 2)[2],
    )  # fmt: skip
    add = parser.add_argument
    add("--messages", type=int, default=20_000, help="per run (20000)")
    add("--rounds", type=int, default=3, help="medians over them (3)")
    add(
        "--prefetch",
        type=int,
        default=200,
        help="of luaq, the minimal consumer, aio-pika and FastStream (200)",
    )
    add(
        "--concurrency",
        type=int,
        help="luaq's handlers at once (the prefetch, up to 1000: as many as messages in flight, "
        "as the minimal consumer and aio-pika have)",
    )
    add(
        "--latency-seconds", type=float, default=20.0, help="how long the latency runs publish (20)"
    )
    add(
        "--latency-rate",
        type=float,
        help="messages per second of the latency runs (half luaq_end_to_end_max)",
    )
    add(
        "--peers",
        default=",".join(PEERS),
        help=f"which to run, luaq always among them ({','.join(PEERS)})",
    )
    add(
        "--profile",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="run luaq once more on each workload under py-spy (on)",
    )
    add(
        "--url",
        default="amqp://guest:guest@127.0.0.1:5672/",
        help="the broker; the run uses a vhost of its own on it",
    )
    args = parser.parse_args()
    args.peers = ["luaq", *(name for name in args.peers.split(",") if name != "luaq")]
    args.concurrency = args.concurrency or min(args.prefetch, 1000)  # (luaq's most)
    if unknown := set(args.peers) - set(PEERS):
        parser.error(f"--peers: no {', '.join(sorted(unknown))} among {', '.join(PEERS)}")
    if min(args.messages, args.rounds, args.latency_seconds, args.latency_rate or 1) <= 0:
        parser.error("--messages, --rounds, --latency-seconds and --latency-rate must be above 0")
    return args


def throughput(bench: Bench, peers: list[str], rounds: int) -> dict[str, dict[str, list[Run]]]:
    runs: dict[str, dict[str, list[Run]]] = {w: {name: [] for name in peers} for w in WORKLOADS}
    for number in range(1, rounds + 1):
        for workload in WORKLOADS:
            for name in peers if number % 2 else peers[::-1]:
                # each on a fresh loop: nothing a framework leaves behind runs in the next
                result = uvloop.run(measure(bench, PEERS[name], workload))
                runs[workload][name].append(result)
                say(f"round {number}: {workload} {name} {result.rate:,.0f} msg/s")
    return runs


def latencies(bench: Bench, rate: float | None, seconds: float) -> dict[str, Any]:
    report: dict[str, Any] = {
        "seconds": seconds,
        "method": "a process of its own publishes at `rate` for `seconds`, each message with a "
        "sent_at header (time.time()); on receipt, luaq's Lua handler takes time.now() - sent_at "
        "(time.now() is time.time()), aio-pika's callback time.time() - sent_at",
    }
    spawn = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(1, mp_context=spawn) as publisher:
        if rate is None:
            # luaq's most on this very load, the publisher and the broker on the same machine
            flat_out = uvloop.run(latency(bench, "luaq", None, seconds, publisher))
            report["luaq_end_to_end_max"] = flat_out["end_to_end_rate"]
            report["rate_from"] = (
                "half luaq_end_to_end_max: the publisher as fast as the broker confirms "
                f"({WINDOW} unconfirmed) for `seconds`, messages over the time until luaq had "
                "them all"
            )
            rate = flat_out["end_to_end_rate"] / 2
        report["rate"] = round(rate)
        for peer in ("luaq", "aio_pika"):
            report[peer] = uvloop.run(latency(bench, peer, rate, seconds, publisher))
            say(f"latency {peer}: {report[peer]}")
    return report


def missed(rates: dict[str, dict[str, float]], p99_ms: float) -> dict[str, float]:
    """The targets this run missed, each with luaq's ratio over its peer."""
    found = {}
    for workload, by_peer in rates.items():
        limit = by_peer.get("minimal")
        for peer, target in TARGETS.items():
            if peer not in by_peer:
                continue
            needed = target * by_peer[peer]
            if limit is not None and peer != "minimal":
                needed = min(needed, MINIMAL_SHARE * limit)
            if by_peer["luaq"] < needed:
                found[f"{workload} luaq/{peer}"] = round(by_peer["luaq"] / by_peer[peer], 2)
    if p99_ms >= P99_TARGET_MS:
        found["latency luaq p99_ms"] = p99_ms
    return found


def say(line: str) -> None:
    print(line, file=sys.stderr, flush=True)


def profile(bench: Bench) -> dict[str, Any]:
    """luaq on each workload once more, under py-spy; what stops py-spy (no permission to trace
    this process, say) is reported, not fatal: the figures are in by now."""
    found: dict[str, Any] = {}
    for workload in WORKLOADS:
        output = bench.workdir / f"luaq-{workload}.txt"
        try:
            uvloop.run(measure(bench, PEERS["luaq"], workload, partial(profiled, output)))
        except PySpyFailed as exc:
            return {"error": str(exc)}
        found[f"luaq {workload}"] = hot_spots(output.read_text())
    return found


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(128 + signal.SIGTERM))  # clean up as on ^C
    args = arguments()
    peers: list[str] = args.peers
    broker = [p for p in psutil.process_iter(["name"]) if p.info["name"] == "beam.smp"]
    with vhost(args.url) as url, tempfile.TemporaryDirectory(prefix="luaq-bench-") as tmp:
        bench = Bench(url, args.messages, args.prefetch, args.concurrency, Path(tmp), broker)
        report: dict[str, Any] = {
            "benchmark": "peers",
            "command": " ".join(["python bench/peers.py", *sys.argv[1:]]),
            "machine": machine(url),
            "messages": args.messages,
            "rounds": args.rounds,
            "settings": {name: PEERS[name].settings(bench) for name in peers},
        }
        runs = throughput(bench, peers, args.rounds)
        rates = {w: {name: statistics.median(r.rate for r in runs[w][name]) for name in peers}
                 for w in WORKLOADS}  # fmt: skip
        report["msg_per_s"] = {w: {name: round(rate) for name, rate in rates[w].items()}
                               for w in WORKLOADS}  # fmt: skip
        report["ratios"] = {
            w: {f"luaq/{name}": round(rates[w]["luaq"] / rates[w][name], 2) for name in peers[1:]}
            for w in WORKLOADS
        }
        report["msg_per_s_by_round"] = {
            w: {name: [round(r.rate) for r in runs[w][name]] for name in peers} for w in WORKLOADS
        }
        report["cpu_us_per_msg"] = {
            w: {name: {"consumer": round(statistics.median(r.consumer_cpu_us for r in rs), 1),
                       "broker": round(statistics.median(r.broker_cpu_us or 0 for r in rs), 1)
                       if broker else None}
                for name, rs in runs[w].items()}
            for w in WORKLOADS
        }  # fmt: skip
        report["latency"] = latencies(bench, args.latency_rate, args.latency_seconds)
        report["targets"] = {
            **{f"{w} luaq/minimal": f">= {MINIMAL_SHARE}" for w in WORKLOADS},
            **{
                f"{w} luaq/{peer}": f">= {target}, or luaq >= {MINIMAL_SHARE} x minimal"
                for w in WORKLOADS
                for peer, target in TARGETS.items()
                if peer != "minimal"
            },
            "latency luaq p99_ms": f"< {P99_TARGET_MS}",
        }
        report["missed"] = missed(rates, report["latency"]["luaq"]["p99_ms"])
        if args.profile:
            report["profile"] = profile(bench)
        report["machine"]["load_average_at_end"] = [round(load, 2) for load in os.getloadavg()]
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
