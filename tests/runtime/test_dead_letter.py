"""Dead letters: attempts counted across redeliveries, then the dead-letter queue.

Parametrized over the memory driver and a real RabbitMQ: on AMQP a broker requeue only says
"redelivered", so the count must survive the driver's retry-by-republish.
"""

from __future__ import annotations

import asyncio
import logging
import textwrap
import uuid
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any
from urllib.parse import quote

import pytest
import yaml
from broker import AMQP_URL
from conftest import eventually
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.cli import main
from luaq.runtime.codecs import CODECS
from luaq.runtime.drivers import Delivery
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker

FAILING = """
function handle(p)
  if p.ok then return true end
  return nil, errors.new({message = "cannot handle " .. tostring(p.n), kind = errors.UNAVAILABLE})
end
"""


FLAKY = """
local tries = {}
function handle(p)
  tries[p.n] = (tries[p.n] or 0) + 1
  logger:info("attempt", {n = p.n, attempt = tries[p.n], at = time.now()})
  if p.n == 1 and tries[p.n] < 3 then return nil, "not yet" end
end
"""


def app_file(
    tmp_path: Path,
    driver: str,
    dead_letter: dict[str, Any],
    retry: dict[str, Any] | None = None,
    handler: str = FAILING,
    url: str = AMQP_URL,
) -> Path:
    suffix = uuid.uuid4().hex[:10]
    broker: dict[str, Any] = {"name": "broker", "kind": f"queue.driver.{driver}"}
    if driver == "amqp":
        broker["url"] = url
    (tmp_path / "handler.lua").write_text(textwrap.dedent(handler))
    document = {
        "version": "1.0",
        "namespace": "app",
        "entries": [
            broker,
            {"name": "jobs", "kind": "queue.queue", "driver": "broker",
             "queue_name": f"luaq-test-jobs-{suffix}", "dead_letter": dead_letter},
            {"name": "dlq", "kind": "queue.queue", "driver": "broker",
             "queue_name": f"luaq-test-dlq-{suffix}"},
            {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
             "source": "file://handler.lua", "concurrency": 2,
             "modules": ["queue", "logger", "json", "time"]},
        ],
    }  # fmt: skip
    # quick retries unless the test is about them (test_reliability covers the default backoff)
    document["entries"][1]["retry"] = retry or {"delay": "10ms"}
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


@pytest.fixture(params=["memory", "amqp"])
async def make_worker(request: pytest.FixtureRequest, tmp_path: Path) -> AsyncIterator[Any]:
    """On AMQP, in a vhost of the test's own: its queues, delay queues included, go with it."""
    workers: list[Worker] = []
    url = AMQP_URL
    if request.param == "amqp":
        url += quote(request.getfixturevalue("vhost"), safe="")

    async def make(dead_letter: dict[str, Any], **options: Any) -> Worker:
        worker = build(
            load(
                entries.load([app_file(tmp_path, request.param, dead_letter, url=url, **options)]),
                Settings(shutdown_timeout=2.0),
            )
        )
        await worker.start()
        workers.append(worker)
        return worker

    yield make
    for worker in workers:
        await worker.stop(1.0)


async def take(worker: Worker, queue_id: str, count: int) -> list[Delivery]:
    """Consume `count` messages from a queue no consumer reads (the test's sink)."""
    queue = worker.host.queue("app", queue_id)
    got: list[Delivery] = []
    consumer = entries.ConsumerEntry.model_validate(
        {"id": "app:sink", "kind": "queue.consumer", "file": Path("x.yaml")}
        | {"queue": queue.id, "func": "app:none", "prefetch": 100},
        context={"namespace": "app", "base_dir": Path(".")},
    )
    subscription = await worker.drivers[queue.driver].consume(queue, consumer, got.append)
    await eventually(lambda: len(got) >= count, timeout=10)
    for delivery in got:
        await delivery.ack()
    await subscription.close()
    return got


async def test_exhausted_message_moves_to_the_dead_letter_queue(make_worker: Any) -> None:
    worker = await make_worker({"queue": "app:dlq", "max_attempts": 3})
    await worker.host.publish(
        "app", "jobs", {"n": 7}, {"correlation_id": "req-7", "tenant": "acme"}
    )
    await worker.host.publish("app", "jobs", {"ok": True}, {})
    stats = worker.consumers[0].stats

    await eventually(lambda: stats.dead_lettered == 1, timeout=10)
    [dead] = await take(worker, "dlq", 1)

    assert CODECS["json/plain"].decode(dead.body) == {"n": 7}
    headers = dict(dead.headers)
    assert headers["correlation_id"] == "req-7"
    assert headers["tenant"] == "acme"
    assert headers["x_dead_letter_reason"] == "max_attempts"
    assert headers["x_original_queue"] == "app:jobs"
    assert headers["x_attempts"] == 3
    assert headers["x_last_error"] == "cannot handle 7"
    assert headers["x_failed_at"].endswith("+00:00")
    assert (stats.failed, stats.acked, stats.dead_lettered) == (3, 1, 1)
    assert (await worker.host.info("app", "jobs"))[0] == 0


async def test_dead_lettered_message_keeps_its_id(make_worker: Any) -> None:
    worker = await make_worker({"queue": "app:dlq", "max_attempts": 2})
    message_id = await worker.host.publish("app", "jobs", {"n": 1}, {})

    [dead] = await take(worker, "dlq", 1)

    assert dead.id == message_id


async def test_poison_goes_to_the_dead_letter_queue_at_once(make_worker: Any) -> None:
    worker = await make_worker({"queue": "app:dlq", "max_attempts": 5})
    queue = worker.host.queue("app", "jobs")
    await worker.drivers[queue.driver].publish(queue, b"{not json", {}, "application/json")

    [dead] = await take(worker, "dlq", 1)

    assert dead.body == b"{not json"
    assert dead.headers["x_dead_letter_reason"] == "poison"
    assert dead.headers["x_attempts"] == 1
    stats = worker.consumers[0].stats
    assert (stats.processed, stats.dead_lettered) == (0, 1)


async def test_without_a_dead_letter_queue_exhausted_messages_are_rejected(
    make_worker: Any,
) -> None:
    worker = await make_worker({"max_attempts": 2})
    await worker.host.publish("app", "jobs", {"n": 3}, {})
    stats = worker.consumers[0].stats

    await eventually(lambda: stats.rejected == 1, timeout=10)
    await worker.host.publish("app", "jobs", {"ok": True}, {})
    await eventually(lambda: stats.acked == 1, timeout=10)

    assert stats.failed == 2
    assert (await worker.host.info("app", "jobs"))[0] == 0
    assert (await worker.host.info("app", "dlq"))[0] == 0


def test_dead_letter_queue_must_be_another_declared_queue(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = app_file(tmp_path, "memory", {"queue": "app:nowhere"})
    document = yaml.safe_load(path.read_text())
    document["entries"][2]["dead_letter"] = {"queue": "app:dlq"}  # the dlq onto itself
    path.write_text(yaml.safe_dump(document))

    assert main(["check", str(path)]) == 2

    err = capsys.readouterr().err
    assert f"{path}: app:jobs: dead_letter.queue: app:nowhere is not another declared" in err
    assert f"{path}: app:dlq: dead_letter.queue: app:dlq is not another declared" in err


async def test_return_false_is_never_dead_lettered(tmp_path: Path) -> None:
    (tmp_path / "h.lua").write_text(
        "local seen = 0\nfunction handle(p) seen = seen + 1\n return seen > 3 end\n"
    )
    document = {
        "version": "1.0",
        "namespace": "app",
        "entries": [
            {"name": "broker", "kind": "queue.driver.memory"},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker",
             "dead_letter": {"queue": "dlq", "max_attempts": 1}, "retry": {"delay": "5ms"}},
            {"name": "dlq", "kind": "queue.queue", "driver": "broker"},
            {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
             "source": "file://h.lua"},
        ],
    }  # fmt: skip
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(document))
    worker = build(load(entries.load([path]), Settings()))
    await worker.start()
    try:
        await worker.host.publish("app", "jobs", {"n": 1}, {})
        await asyncio.wait_for(worker.wait_idle(), 10)
        stats = worker.consumers[0].stats
        assert (stats.retried, stats.acked, stats.dead_lettered) == (3, 1, 0)
        assert (await worker.host.info("app", "dlq"))[0] == 0
    finally:
        await worker.stop(1.0)


async def test_retry_waits_between_attempts_without_blocking_the_consumer(
    make_worker: Any, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="luaq.lua")
    worker = await make_worker(
        {"max_attempts": 5}, retry={"delay": "300ms", "multiplier": 2}, handler=FLAKY
    )
    await worker.host.publish("app", "jobs", {"n": 1}, {})
    await worker.host.publish("app", "jobs", {"n": 2}, {})
    stats = worker.consumers[0].stats

    await eventually(lambda: stats.acked == 2, timeout=15)

    attempts = [r.fields for r in caplog.records if r.getMessage() == "attempt"]  # type: ignore[attr-defined]
    first = sorted((a["attempt"], a["at"]) for a in attempts if a["n"] == 1)
    assert [attempt for attempt, _ in first] == [1, 2, 3]
    assert first[1][1] - first[0][1] >= 0.3 - 0.01, "waited the delay"
    assert first[2][1] - first[1][1] >= 0.6 - 0.01, "and twice the delay the next time"
    second = [a["at"] for a in attempts if a["n"] == 2]
    assert len(second) == 1
    assert second[0] < first[1][1], "the other message did not wait for the retry"
    assert (stats.failed, stats.dead_lettered) == (2, 0)
