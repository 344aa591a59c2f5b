"""`luaq dlq list|replay|purge` on a real RabbitMQ, after a worker dead-lettered messages."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from broker import AMQP_URL, delete_queues, queue_depth, vhost_url
from dead_letters import dead_letter_id, put_dead_letters, ready, taken_ids
from luaq.runtime import dlq
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
    assert "purged 3 of 3 message(s)" in capsys.readouterr().out
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


# -- any number of messages, in bounded memory ---------------------------------------------------

MANY = 12_000  # more than the 10,000 `luaq dlq` once took at most, and reported as the whole queue


def dead_letter_app(path: Path, url: str, **broker: Any) -> Path:
    return write_app(
        path,
        [
            {"name": "broker", "kind": "queue.driver.amqp", "url": url, **broker},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
            {"name": "dlq", "kind": "queue.queue", "driver": "broker"},
        ],
    )


def in_vhost(tmp_path: Path, vhost: str, count: int, **dead: Any) -> tuple[Path, str]:
    url = vhost_url(vhost)
    asyncio.run(put_dead_letters(url, "dlq", count, **dead))
    return dead_letter_app(tmp_path / "app.yaml", url), url


def test_list_goes_through_every_message_and_leaves_them_in_order(
    tmp_path: Path, vhost: str, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(dlq, "PROGRESS_EVERY", 0.0, raising=False)  # a line at every step
    path, url = in_vhost(tmp_path, vhost, MANY)
    expected = [dead_letter_id(n) for n in range(MANY)]

    assert main(["dlq", "list", "app:dlq", "--entries", str(path)]) == 0

    out, err = capsys.readouterr()
    assert f"listed {MANY} of {MANY} message(s) in app:dlq" in err, err[-3000:]
    assert [json.loads(line)["id"] for line in out.splitlines()] == expected
    assert "... listed " in err
    assert asyncio.run(ready(url, "dlq")) == MANY
    # given back in their places: listed again, they come in the same order
    assert main(["dlq", "list", "app:dlq", "--entries", str(path)]) == 0
    assert [json.loads(line)["id"] for line in capsys.readouterr().out.splitlines()] == expected


MEASURED = """
import resource, sys
from luaq.runtime.cli import main
code = main(sys.argv[1:])
sys.stdout.flush()
print("maxrss_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
sys.exit(code)
"""


def measured(*args: str) -> tuple[int, str, int]:
    """`luaq ARGS` in a process of its own: exit code, stdout, and its peak RSS in MiB."""
    done = subprocess.run(
        [sys.executable, "-c", MEASURED, *args], capture_output=True, text=True, timeout=60
    )
    peak = [line for line in done.stderr.splitlines() if line.startswith("maxrss_kib ")]
    assert peak, done.stderr
    return done.returncode, done.stdout, int(peak[-1].split()[1]) // 1024


def test_replay_goes_through_every_message_in_bounded_memory(tmp_path: Path, vhost: str) -> None:
    """96 MB of dead letters: the replay holds a window of them (dlq.WINDOW), not the lot, and
    they reach their queue in their order."""
    path, url = in_vhost(tmp_path, vhost, MANY, pad=8_000)
    code, _, baseline = measured("dlq", "purge", "app:jobs", "--entries", str(path), "--yes")
    assert code == 0  # an empty queue: what the process weighs at rest

    code, out, peak = measured("dlq", "replay", "app:dlq", "--entries", str(path))

    assert code == 0, out
    assert out.strip() == f"replayed {MANY} of {MANY} message(s)"
    assert peak - baseline < 40, f"peak RSS {peak} MiB, {baseline} MiB at rest"
    assert asyncio.run(ready(url, "dlq")) == 0
    assert asyncio.run(taken_ids(url, "jobs", MANY)) == [dead_letter_id(n) for n in range(MANY)]


def test_purge_goes_through_every_message(
    tmp_path: Path, vhost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    path, url = in_vhost(tmp_path, vhost, MANY)

    assert main(["dlq", "purge", "app:dlq", "--entries", str(path), "--yes"]) == 0

    assert f"purged {MANY} of {MANY} message(s)" in capsys.readouterr().out
    assert asyncio.run(ready(url, "dlq")) == 0


def test_replay_keeps_messages_of_queues_not_declared_here(
    tmp_path: Path, vhost: str, capsys: pytest.CaptureFixture[str]
) -> None:
    """They stay in the dead-letter queue (moved to its end, each once its copy there is
    confirmed), and the others are replayed past them."""
    path, url = in_vhost(tmp_path, vhost, 2, original="other:jobs")
    asyncio.run(put_dead_letters(url, "dlq", 3, first=2))

    assert main(["dlq", "replay", "app:dlq", "--entries", str(path)]) == 0

    out, err = capsys.readouterr()
    assert out.strip() == "replayed 3 of 5 message(s); 2 kept: their queue is not declared here"
    assert err.count("original queue 'other:jobs' is not declared here; kept") == 2
    assert asyncio.run(taken_ids(url, "jobs", 3)) == [dead_letter_id(n) for n in (2, 3, 4)]
    assert asyncio.run(taken_ids(url, "dlq", 2)) == [dead_letter_id(n) for n in (0, 1)]
