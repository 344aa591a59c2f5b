"""A broker that blocks publishers (a memory alarm) on a RabbitMQ node of this module's own: an
error after a message was sent says it may have been published, and
`luaq dlq replay` stops at the first such failure, says what it did, exits 1, and removes no
dead letter whose copy the broker has not confirmed. The shared node is never alarmed."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import driver_entry, queue_entry
from conftest import eventually
from dead_letters import dead_letter_id, put_dead_letters, ready
from luaq.runtime.cli import main
from luaq.runtime.drivers.amqp import AmqpDriver
from luaq.runtime.errors import ErrorKind, MaybePublished, QueueError
from processes import wait_until, write_app
from rabbit_node import RabbitNode, memory_alarm, rabbit_node

PUBLISH_TIMEOUT = 2.0


@pytest.fixture(scope="module")
def node() -> Iterator[RabbitNode]:
    with rabbit_node() as started:
        yield started


def app(path: Path, node: RabbitNode, jobs: str, dead: str) -> Path:
    return write_app(
        path,
        [
            {"name": "broker", "kind": "queue.driver.amqp", "url": node.url,
             "publish_timeout": f"{PUBLISH_TIMEOUT:g}s"},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker", "queue_name": jobs},
            {"name": "dlq", "kind": "queue.queue", "driver": "broker", "queue_name": dead},
        ],
    )  # fmt: skip


async def test_a_publish_sent_before_the_broker_blocked_may_have_been_published(
    node: RabbitNode,
) -> None:
    """The broker blocks a connection once it reads a publish from it: the first publish of a
    fresh connection is in its hands already. Its error says so, and the message does arrive
    once the alarm clears; a publish that was never sent says nothing was published."""
    driver = AmqpDriver(driver_entry(url=node.url, publish_timeout="1s"))
    jobs = queue_entry("blocked-publish")
    with memory_alarm(node):
        await driver.start()
        try:
            await driver.declare(jobs)
            with pytest.raises(MaybePublished) as sent:
                await driver.publish(jobs, b'{"n": 1}', {"message_id": "first"}, "application/json")
            with pytest.raises(QueueError) as held:
                await driver.publish(jobs, b'{"n": 2}', {}, "application/json")
        finally:
            await driver.close()
    assert sent.value.kind == ErrorKind.UNAVAILABLE
    assert sent.value.retryable
    assert "blocking publishers" in sent.value.message
    assert "message first to blocked-publish" in sent.value.message
    assert "may have been published" in sent.value.message
    assert not isinstance(held.value, MaybePublished)
    assert "blocking publishers" in held.value.message
    assert "nothing was published" in held.value.message
    await eventually(lambda: ready(node.url, "blocked-publish"), timeout=10)
    assert await ready(node.url, "blocked-publish") == 1


def test_luaq_publish_under_an_alarm_says_the_message_may_have_been_published(
    node: RabbitNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = app(tmp_path / "app.yaml", node, "cli-jobs", "cli-dlq")
    with memory_alarm(node):
        code = main(["publish", "--entries", str(path), "app:jobs", '{"n": 1}'])
    assert code == 1
    err = capsys.readouterr().err
    assert "luaq: UNAVAILABLE: the broker is blocking publishers" in err
    assert "may have been published" in err
    assert "nothing was published" not in err


def test_replay_under_an_alarm_stops_at_the_first_and_removes_nothing_unconfirmed(
    node: RabbitNode, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """4 dead letters, replayed while the broker blocks publishers: the first copy is sent and
    never confirmed, so the run stops there (not 4 publish timeouts), exits 1, says the first
    may have been replayed and the 3 others were not, and all 4 stay in the dead-letter queue.
    Once the alarm clears, that first copy arrives; a replay then moves all 4 (the first twice
    over: at-least-once, as it said)."""
    path = app(tmp_path / "app.yaml", node, "replay-jobs", "replay-dlq")
    asyncio.run(put_dead_letters(node.url, "replay-dlq", 4))
    with memory_alarm(node):
        started = time.monotonic()
        code = main(["dlq", "replay", "app:dlq", "--entries", str(path)])
        elapsed = time.monotonic() - started
        out, err = capsys.readouterr()
        assert asyncio.run(ready(node.url, "replay-dlq")) == 4

    assert code == 1, err
    first = dead_letter_id(0)
    assert out.strip() == (
        f"replayed 0 of 4 message(s); 1 may have been replayed, and stay in app:dlq as well: "
        f"{first}; stopped at the first failure: 3 not replayed, still in app:dlq"
    )
    assert f"{first}: may have been copied to app:jobs" in err
    assert err.count("may have been copied") == 1  # the others were never tried
    assert "not replayed:" not in err
    assert "luaq: stopped: the broker is blocking publishers" in err
    # one publish timeout, and the close of a connection the broker no longer reads
    assert elapsed < 2 * PUBLISH_TIMEOUT + 3, elapsed

    wait_until(lambda: asyncio.run(ready(node.url, "replay-jobs")) == 1, 30, "the first copy")
    assert asyncio.run(ready(node.url, "replay-dlq")) == 4
    assert main(["dlq", "replay", "app:dlq", "--entries", str(path)]) == 0
    assert capsys.readouterr().out.strip() == "replayed 4 of 4 message(s)"
    assert asyncio.run(ready(node.url, "replay-dlq")) == 0
    assert asyncio.run(ready(node.url, "replay-jobs")) == 5
