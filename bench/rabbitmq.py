"""luaq against aio-pika on the same RabbitMQ, in one run.

    python bench/rabbitmq.py [--messages 50000] [--prefetch 200] [--concurrency 32] [--url URL]

Scenarios, each on fresh queues with N small JSON messages pre-published:
  luaq_consume          luaq worker, no-op Lua handler, manual ack
  aio_pika_consume      aio-pika's callback consumer, no-op Python handler, `await msg.ack()`
  luaq_publish          luaq worker whose Lua handler publishes one message per input
  aio_pika_publish      aio-pika publishing N messages with confirms, pipelined
  luaq_cli_1proc        `luaq run --until-idle` consuming N (wall clock of the command, start-up
                        included)
  luaq_cli_2proc        the same with `--processes 2`
Prints one JSON object with msg/s and the ratios the issue sets targets for.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

import aio_pika
import aiormq
import yaml
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.settings import Settings
from scraped import scraped

BODY = json.dumps({"to": "ada@example.com", "template": "welcome", "user_id": 456}).encode()
LUAQ = Path(sys.executable).with_name("luaq")


async def fill(url: str, queue: str, messages: int) -> None:
    """Pre-publish with confirms, 1,000 in flight."""
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.queue_declare(queue, durable=True)
    properties = aiormq.spec.Basic.Properties(content_type="application/json", delivery_mode=2)
    for start in range(0, messages, 1000):
        batch = range(start, min(start + 1000, messages))
        await asyncio.gather(
            *(channel.basic_publish(BODY, routing_key=queue, properties=properties) for _ in batch)
        )
    await connection.close()


async def delete(url: str, *queues: str) -> None:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    for queue in queues:
        await channel.queue_delete(queue)
    await connection.close()


async def until(check: Callable[[], bool], deadline: float = 600.0) -> None:
    end = time.monotonic() + deadline
    while not check():
        if time.monotonic() > end:
            raise TimeoutError("benchmark did not finish")
        await asyncio.sleep(0.005)


def entries_file(
    directory: Path,
    url: str,
    lua: str,
    queues: dict[str, str],
    args: Any,
    modules: tuple[str, ...] = entries.DEFAULT_MODULES,
) -> Path:
    (directory / "handler.lua").write_text(lua)
    document = {
        "version": "1.0",
        "namespace": "bench",
        "entries": [
            {"name": "broker", "kind": "queue.driver.amqp", "url": url},
            *(
                {"name": name, "kind": "queue.queue", "driver": "broker", "queue_name": real}
                for name, real in queues.items()
            ),
            {"name": "handler", "kind": "function.lua", "source": "file://handler.lua",
             "method": "handle", "modules": list(modules)},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "func": "handler",
             "concurrency": args.concurrency, "prefetch": args.prefetch},
        ],
    }  # fmt: skip
    path = directory / "app.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


async def luaq(url: str, lua: str, args: Any, metrics: bool = False) -> float:
    queues = {"in": f"bench-in-{uuid.uuid4().hex[:8]}", "out": f"bench-out-{uuid.uuid4().hex[:8]}"}
    await fill(url, queues["in"], args.messages)
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = entries_file(Path(tmp), url, lua, queues, args)
            loaded = load(entries.load([path]), Settings())
            with scraped(loaded) if metrics else contextlib.nullcontext(build(loaded)) as worker:
                started = time.perf_counter()
                await worker.start()
                stats = worker.consumers[0].stats
                await until(lambda: stats.acked >= args.messages)
                elapsed = time.perf_counter() - started
                await worker.stop(5.0)
    finally:
        await delete(url, *queues.values())
    return args.messages / elapsed


async def aio_pika_consume(url: str, args: Any) -> float:
    queue_name = f"bench-pika-{uuid.uuid4().hex[:8]}"
    await fill(url, queue_name, args.messages)
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel()
        await channel.set_qos(prefetch_count=args.prefetch)
        queue = await channel.declare_queue(queue_name, durable=True)
        done = 0

        async def on_message(message: aio_pika.abc.AbstractIncomingMessage) -> None:
            nonlocal done
            await message.ack()
            done += 1

        started = time.perf_counter()
        await queue.consume(on_message)
        await until(lambda: done >= args.messages)
        elapsed = time.perf_counter() - started
    finally:
        await connection.close()
        await delete(url, queue_name)
    return args.messages / elapsed


async def aio_pika_publish(url: str, args: Any) -> float:
    queue_name = f"bench-pika-pub-{uuid.uuid4().hex[:8]}"
    connection = await aio_pika.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=True)
        await channel.declare_queue(queue_name, durable=True)
        exchange = channel.default_exchange
        window = args.concurrency
        started = time.perf_counter()
        for start in range(0, args.messages, window):
            batch = range(start, min(start + window, args.messages))
            await asyncio.gather(
                *(
                    exchange.publish(
                        aio_pika.Message(BODY, content_type="application/json", delivery_mode=2),
                        routing_key=queue_name,
                    )
                    for _ in batch
                )
            )
        elapsed = time.perf_counter() - started
    finally:
        await connection.close()
        await delete(url, queue_name)
    return args.messages / elapsed


def luaq_processes(url: str, args: Any, processes: int) -> float:
    queues = {"in": f"bench-proc-{uuid.uuid4().hex[:8]}"}
    asyncio.run(fill(url, queues["in"], args.messages))
    try:
        with tempfile.TemporaryDirectory() as tmp:
            path = entries_file(Path(tmp), url, "function handle(p) end", queues, args)
            started = time.perf_counter()
            subprocess.run(
                [str(LUAQ), "--log-level", "warning", "run", str(path), "--until-idle",
                 "--processes", str(processes)],
                check=True, stdout=subprocess.DEVNULL, env={**os.environ},
            )  # fmt: skip
            elapsed = time.perf_counter() - started
    finally:
        asyncio.run(delete(url, *queues.values()))
    return args.messages / elapsed


def run(label: str, scenario: Callable[[], Awaitable[float]], loop: str) -> float:
    runner: Callable[[Any], Any] = asyncio.run
    if loop == "uvloop":
        import uvloop

        runner = uvloop.run
    rate = float(runner(scenario()))
    sys.stderr.write(f"{label}: {rate:,.0f} msg/s\n")
    return rate


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--prefetch", type=int, default=200)
    parser.add_argument("--concurrency", type=int, default=32)
    parser.add_argument("--url", default="amqp://guest:guest@127.0.0.1:5672/")
    args = parser.parse_args()
    url = args.url
    noop, publish = (
        "function handle(p) end",
        'function handle(p) return queue.publish("bench:out", p) end',
    )
    rates = {
        "luaq_consume": run("luaq_consume", lambda: luaq(url, noop, args), "uvloop"),
        "luaq_consume_metrics": run(
            "luaq_consume_metrics", lambda: luaq(url, noop, args, metrics=True), "uvloop"
        ),
        "aio_pika_consume": run("aio_pika_consume", lambda: aio_pika_consume(url, args), "asyncio"),
        "luaq_publish": run("luaq_publish", lambda: luaq(url, publish, args), "uvloop"),
        "luaq_publish_metrics": run(
            "luaq_publish_metrics", lambda: luaq(url, publish, args, metrics=True), "uvloop"
        ),
        "aio_pika_publish": run("aio_pika_publish", lambda: aio_pika_publish(url, args), "asyncio"),
    }
    for processes in (1, 2):
        label = f"luaq_cli_{processes}proc"
        rates[label] = luaq_processes(url, args, processes)
        sys.stderr.write(f"{label}: {rates[label]:,.0f} msg/s\n")
    report = {
        "benchmark": "amqp",
        "messages": args.messages,
        "prefetch": args.prefetch,
        "concurrency": args.concurrency,
        "msg_per_s": {name: round(rate) for name, rate in rates.items()},
        "ratios": {
            "luaq_consume/aio_pika_consume": round(
                rates["luaq_consume"] / rates["aio_pika_consume"], 3
            ),
            "luaq_publish/aio_pika_publish": round(
                rates["luaq_publish"] / rates["aio_pika_publish"], 3
            ),
            "luaq_cli_2proc/luaq_cli_1proc": round(
                rates["luaq_cli_2proc"] / rates["luaq_cli_1proc"], 3
            ),
            "luaq_consume_metrics/luaq_consume": round(
                rates["luaq_consume_metrics"] / rates["luaq_consume"], 3
            ),
            "luaq_publish_metrics/luaq_publish": round(
                rates["luaq_publish_metrics"] / rates["luaq_publish"], 3
            ),
        },
        "targets": {
            "luaq_consume/aio_pika_consume": ">= 1.0",
            "luaq_publish/aio_pika_publish": ">= 0.8",
            "luaq_consume_metrics/luaq_consume": ">= 0.9",
            "luaq_publish_metrics/luaq_publish": ">= 0.9",
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
