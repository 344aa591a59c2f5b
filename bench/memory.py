"""End-to-end throughput on the memory driver, Lua handlers beside Python ones, in one run.

    python bench/memory.py [--messages 50000] [--rounds 3] [--concurrency 8] [--prefetch 100]

Each scenario pre-publishes N small JSON messages, starts one consumer and times it until the
queue is drained and settled. The Python scenarios run the very same pipeline (driver, codec,
consumer pool, settlement) with a Python coroutine in place of the Lua invocation, so the ratio
lua/python is the cost of the Lua bridge. Rounds interleave the scenarios; the median is kept.
Prints one JSON object.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import platform
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import yaml
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.codecs import decoder
from luaq.runtime.consumer import Consumer
from luaq.runtime.drivers import Delivery
from luaq.runtime.lua import ACKED, Invoke, Outcome
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker
from scraped import scraped

LUA = {
    "noop": "function handle(payload) end",
    "publish": 'function handle(payload) return queue.publish("app:out", payload) end',
}


def entries_file(directory: Path, lua: str, messages: int, concurrency: int, prefetch: int) -> Path:
    (directory / "handler.lua").write_text(lua)
    queue_options = {"memory": {"max_length": messages}}
    document = {
        "version": "1.0",
        "namespace": "app",
        "entries": [
            {"name": "broker", "kind": "queue.driver.memory"},
            {"name": "in", "kind": "queue.queue", "driver": "broker",
             "driver_options": queue_options},
            {"name": "out", "kind": "queue.queue", "driver": "broker",
             "driver_options": queue_options},
            {"name": "handler", "kind": "function.lua", "source": "file://handler.lua",
             "method": "handle"},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "func": "handler",
             "concurrency": concurrency, "prefetch": prefetch},
        ],
    }  # fmt: skip
    path = directory / "app.yaml"
    path.write_text(yaml.safe_dump(document))
    return path


def python_invoke(worker: Worker, scenario: str) -> Invoke:
    if scenario == "noop":

        async def noop(payload: Any, delivery: Delivery, *_: Any) -> Outcome:
            return ACKED

        return noop

    async def publish(payload: Any, delivery: Delivery, *_: Any) -> Outcome:
        await worker.host.publish("app", "out", payload, {})
        return ACKED

    return publish


async def measure(path: Path, scenario: str, language: str, messages: int) -> float:
    """`language`: lua, python, or lua_metrics (lua, metrics served and scraped)."""
    loaded = load(entries.load([path]), Settings())
    if language != "lua_metrics":
        return await _measure(build(loaded), scenario, language, messages)
    with scraped(loaded) as worker:
        return await _measure(worker, scenario, language, messages)


async def _measure(worker: Worker, scenario: str, language: str, messages: int) -> float:
    pool = worker.consumers  # the worker's pool, empty while the queue fills
    if language == "python":
        consumer = pool[0]
        pool[0] = Consumer(
            consumer.entry,
            consumer.queue,
            consumer.driver,
            python_invoke(worker, scenario),
            decoder(consumer.queue.codec),
        )
    consumers = pool[:]
    pool.clear()
    await worker.start()
    payload = {"to": "ada@example.com", "template": "welcome", "user_id": 456}
    for _ in range(messages):
        await worker.host.publish("app", "in", payload, {})
    pool[:] = consumers
    started = time.perf_counter()
    await consumers[0].start()
    await worker.wait_idle(poll=0.002)
    elapsed = time.perf_counter() - started
    processed = consumers[0].stats.processed
    await worker.stop(1.0)
    if processed != messages:
        raise RuntimeError(f"{scenario}/{language}: processed {processed} of {messages}")
    return messages / elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=50_000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--concurrency", type=int, default=8)
    parser.add_argument("--prefetch", type=int, default=100)
    args = parser.parse_args()
    results: dict[str, list[float]] = {}
    progress: Callable[[str], Any] = sys.stderr.write
    with tempfile.TemporaryDirectory() as tmp:
        for round_number in range(1, args.rounds + 1):
            for scenario, lua in LUA.items():
                directory = Path(tmp) / scenario
                directory.mkdir(exist_ok=True)
                path = entries_file(directory, lua, args.messages, args.concurrency, args.prefetch)
                for language in ("lua", "python", "lua_metrics"):
                    rate = asyncio.run(measure(path, scenario, language, args.messages))
                    results.setdefault(f"{language}_{scenario}", []).append(rate)
                    progress(f"round {round_number}: {language}_{scenario} {rate:,.0f} msg/s\n")
    rates = {name: round(statistics.median(values)) for name, values in results.items()}
    report = {
        "benchmark": "memory",
        "messages": args.messages,
        "rounds": args.rounds,
        "concurrency": args.concurrency,
        "prefetch": args.prefetch,
        "python": platform.python_version(),
        "msg_per_s": rates,
        "ratios": {
            "lua_noop/python_noop": round(rates["lua_noop"] / rates["python_noop"], 3),
            "lua_publish/python_publish": round(rates["lua_publish"] / rates["python_publish"], 3),
            "lua_metrics_noop/lua_noop": round(rates["lua_metrics_noop"] / rates["lua_noop"], 3),
            "lua_metrics_publish/lua_publish": round(
                rates["lua_metrics_publish"] / rates["lua_publish"], 3
            ),
        },
        "targets": {
            "lua_noop": ">= 20000",
            "lua_noop/python_noop": ">= 0.6",
            "lua_metrics_noop/lua_noop": ">= 0.9",
            "lua_metrics_publish/lua_publish": ">= 0.9",
        },
    }
    print(json.dumps(report, indent=2))


if __name__ == "__main__":
    main()
