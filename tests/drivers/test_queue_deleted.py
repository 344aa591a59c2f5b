"""Queues deleted on the broker behind a running worker's back: a publish the
broker returns as unroutable declares the queue again and goes once more, so a dead letter, a
handler's publish or a retry lands, and nothing goes round for ever. On the test broker, in a
vhost of each test's own."""

from __future__ import annotations

import textwrap
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import aiormq
import pytest
import yaml
from broker import queue_totals, vhost_url
from conftest import eventually
from dead_letters import ready
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker

ALWAYS_FAILS = 'function handle(p) return nil, "refused " .. p.n end'
PUBLISHES = 'function handle(p) return queue.publish("app:out", p) end'


@pytest.fixture
async def worker(tmp_path: Path, vhost: str) -> AsyncIterator[Any]:
    """Starts a worker on `jobs` (dead letters to `dlq` after 2 attempts, retried after 50 ms
    through a delay queue), `out` and `dlq`, running `source`."""
    started: list[Worker] = []

    async def start(source: str) -> Worker:
        (tmp_path / "handler.lua").write_text(textwrap.dedent(source))
        document = {
            "version": "1.0",
            "namespace": "app",
            "entries": [
                {"name": "broker", "kind": "queue.driver.amqp", "url": vhost_url(vhost),
                 "publish_timeout": "5s"},
                {"name": "jobs", "kind": "queue.queue", "driver": "broker",
                 "dead_letter": {"queue": "dlq", "max_attempts": 2},
                 "retry": {"delay": "50ms", "max_delay": "50ms"}},
                {"name": "dlq", "kind": "queue.queue", "driver": "broker"},
                {"name": "out", "kind": "queue.queue", "driver": "broker"},
                {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
                 "source": "file://handler.lua", "modules": ["queue"]},
            ],
        }  # fmt: skip
        path = tmp_path / "app.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        running = build(load(entries.load([path]), Settings(shutdown_timeout=2.0)))
        await running.start()
        started.append(running)
        return running

    yield start
    for running in started:
        await running.stop(1.0)


async def delete(vhost: str, *names: str) -> None:
    connection = await aiormq.connect(vhost_url(vhost))
    try:
        channel = await connection.channel()
        for name in names:
            await channel.queue_delete(name)
    finally:
        await connection.close()


async def test_a_deleted_dead_letter_queue_is_declared_again_and_takes_the_dead_letter(
    worker: Any, vhost: str
) -> None:
    """The dead-letter queue and the delay queue of the retries are deleted while the worker
    runs: the next message's retry and dead letter declare them again, and the handler runs it
    max_attempts (2) times, not over and over."""
    running = await worker(ALWAYS_FAILS)
    stats = running.consumers[0].stats
    url = vhost_url(vhost)
    await running.host.publish("app", "jobs", {"n": 1}, {})
    await eventually(lambda: stats.dead_lettered == 1, timeout=10)
    assert stats.failed == 2
    delay_queues = [name for name in queue_totals(vhost) if name.startswith("jobs.")]
    assert delay_queues  # the retry went through one

    await delete(vhost, "dlq", *delay_queues)
    await running.host.publish("app", "jobs", {"n": 2}, {})

    await eventually(lambda: stats.dead_lettered == 2, timeout=10)
    assert await ready(url, "dlq") == 1
    assert stats.failed == 4, stats
    assert stats.dead_lettered == 2
    assert set(queue_totals(vhost)) >= {"dlq", *delay_queues}


async def test_a_deleted_output_queue_is_declared_again_and_takes_the_publish(
    worker: Any, vhost: str
) -> None:
    running = await worker(PUBLISHES)
    stats = running.consumers[0].stats
    url = vhost_url(vhost)
    await running.host.publish("app", "jobs", {"n": 1}, {})
    await eventually(lambda: stats.acked == 1, timeout=10)

    await delete(vhost, "out")
    await running.host.publish("app", "jobs", {"n": 2}, {})

    await eventually(lambda: stats.acked == 2, timeout=10)
    assert stats.failed == 0, stats.errors
    assert await ready(url, "out") == 1  # the second: the first went with the deleted queue
