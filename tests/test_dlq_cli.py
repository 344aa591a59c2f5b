"""`luaq dlq list|replay|purge` on a real RabbitMQ, after a worker dead-lettered messages."""

from __future__ import annotations

import asyncio
import json
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from broker import AMQP_URL, delete_queues, queue_depth
from luaq.runtime.cli import main
from processes import write_app, write_jsonl


def depth(name: str) -> int:
    return asyncio.run(queue_depth(name))[0]


@pytest.fixture
def app(tmp_path: Path) -> Iterator[tuple[Path, str, str]]:
    """Three messages that failed once each now sit in the dead-letter queue."""
    jobs, dead = f"luaq-test-jobs-{uuid.uuid4().hex[:8]}", f"luaq-test-dlq-{uuid.uuid4().hex[:8]}"
    path = write_app(
        tmp_path / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.amqp", "url": AMQP_URL},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker", "queue_name": jobs,
             "dead_letter": {"queue": "dlq", "max_attempts": 1}},
            {"name": "dlq", "kind": "queue.queue", "driver": "broker", "queue_name": dead},
            {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
             "source": 'function handle(p) return nil, "refused " .. p.n end'},
        ],
    )  # fmt: skip
    inputs = write_jsonl(
        tmp_path / "in.jsonl", [{"queue": "jobs", "data": {"n": n}} for n in range(3)]
    )
    assert main(["run", str(path), "--input", str(inputs), "--until-idle"]) == 0
    yield path, jobs, dead
    asyncio.run(delete_queues(jobs, dead))


def test_list_shows_reason_and_attempts_and_keeps_the_messages(
    app: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, dead = app
    capsys.readouterr()

    assert main(["dlq", "list", "app:dlq", "--entries", str(path)]) == 0

    listed = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert len(listed) == 3
    assert {item["reason"] for item in listed} == {"max_attempts"}
    assert {item["attempts"] for item in listed} == {1}
    assert {item["queue"] for item in listed} == {"app:jobs"}
    assert sorted(item["error"] for item in listed) == ["refused 0", "refused 1", "refused 2"]
    assert depth(dead) == 3


def test_replay_moves_messages_back_to_their_queue(
    app: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, jobs, dead = app
    capsys.readouterr()

    assert main(["dlq", "replay", "app:dlq", "--entries", str(path)]) == 0

    assert "replayed 3 of 3 message(s)" in capsys.readouterr().out
    assert depth(dead) == 0
    assert depth(jobs) == 3


def test_purge_asks_first_and_deletes_with_yes(
    app: tuple[Path, str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    path, _, dead = app
    capsys.readouterr()

    assert main(["dlq", "purge", "app:dlq", "--entries", str(path)]) == 0
    assert "refusing to delete 3 message(s) of app:dlq without --yes" in capsys.readouterr().err
    assert depth(dead) == 3

    assert main(["dlq", "purge", "app:dlq", "--entries", str(path), "--yes"]) == 0
    assert "purged 3 message(s)" in capsys.readouterr().out
    assert depth(dead) == 0


def test_memory_queues_cannot_be_inspected_from_outside(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = write_app(
        tmp_path / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.memory"},
            {"name": "dlq", "kind": "queue.queue", "driver": "broker"},
        ],
    )

    assert main(["dlq", "list", "app:dlq", "--entries", str(path)]) == 1

    assert "in-memory driver" in capsys.readouterr().err
