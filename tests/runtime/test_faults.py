"""Nothing lost under faults: 20,000 messages through a worker that publishes one
message per input, while the broker drops every connection, then restarts its application.

Every input must reach the sink at least once (at-least-once: duplicates are counted and
reported, never a loss), and the worker must reconnect by itself.
"""

from __future__ import annotations

import asyncio
import json
import signal
import time
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import aiormq
from broker import queue_depth, queue_totals, rabbitmqctl
from pamqp.commands import Basic
from processes import Process, Spawner, summary, write_app
from rabbit_node import RabbitNode

MESSAGES = 20_000
HANDLER = 'function handle(p) return queue.publish("app:out", {n = p.n}) end'


async def fill(url: str, queue: str, count: int = MESSAGES) -> None:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.queue_declare(queue, durable=True)
    properties = Basic.Properties(content_type="application/json", delivery_mode=2)
    for start in range(0, count, 1000):
        await asyncio.gather(
            *(
                channel.basic_publish(
                    json.dumps({"n": n}).encode(), routing_key=queue, properties=properties
                )
                for n in range(start, min(start + 1000, count))
            )
        )
    await connection.close()


def depth(url: str, queue: str) -> tuple[int, int]:
    """(ready, consumers); (-1, -1) while the broker is down."""
    try:
        return asyncio.run(queue_depth(queue, url))
    except (aiormq.exceptions.AMQPError, OSError):
        return -1, -1


def drained(vhost: str, ctl: Callable[..., str] = rabbitmqctl) -> bool:
    """No message in any queue but `out`, the retry queues of `in` included."""
    totals = queue_totals(vhost, ctl)
    return not any(sum(counts) for name, counts in totals.items() if name != "out")


def wait(check: Callable[[], bool], seconds: float, what: str, process: Process) -> None:
    deadline = time.monotonic() + seconds
    while not check():
        assert process.popen.poll() is None, f"luaq exited:\n{process.stderr[-3000:]}"
        assert time.monotonic() < deadline, f"{what} not reached:\n{process.stderr[-3000:]}"
        time.sleep(0.5)


async def drain(url: str, queue: str) -> list[int]:
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    seen: list[int] = []
    while True:
        message = await channel.basic_get(queue, no_ack=True)
        if message.delivery is None or isinstance(message.delivery, Basic.GetEmpty):
            break
        seen.append(json.loads(message.body)["n"])
    await connection.close()
    return seen


def test_nothing_is_lost_when_connections_drop_and_the_broker_restarts(
    tmp_path: Path, own_node_vhost: tuple[RabbitNode, str]
) -> None:
    """On the suite's own node, in a vhost of its own: restarting the shared one would fail
    every other test's calls."""
    restarted(tmp_path, *own_node_vhost)


def restarted(tmp_path: Path, node: RabbitNode, vhost: str) -> None:
    url = node.vhost_url(vhost)
    asyncio.run(fill(url, "in"))
    app = write_app(
        tmp_path / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.amqp", "url": url,
             "reconnect_delay": "200ms", "reconnect_max_delay": "2s",
             "connection_timeout": "20s"},
            {"name": "in", "kind": "queue.queue", "driver": "broker"},
            {"name": "out", "kind": "queue.queue", "driver": "broker"},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle",
             "source": HANDLER, "concurrency": 32, "prefetch": 200},
        ],
    )  # fmt: skip
    spawner = Spawner(tmp_path)
    try:
        process = spawner("run", app, "--shutdown-timeout", "10")

        wait(lambda: depth(url, "out")[0] >= 3_000, 60, "3,000 outputs", process)
        node.ctl("close_all_connections", "--vhost", vhost, "fault test: connections")
        wait(lambda: depth(url, "out")[0] >= 9_000, 60, "9,000 outputs", process)
        node.ctl("stop_app")
        node.ctl("start_app")
        node.ctl("await_startup")
        # drained: nothing left in `in` or waiting in its retry queues, ready or unacked, and
        # the worker consuming again
        wait(lambda: depth(url, "in")[1] == 1 and drained(vhost, node.ctl), 120,
             "the input drained", process)  # fmt: skip
        wait(lambda: depth(url, "out")[0] >= MESSAGES, 60, "every output", process)

        process.popen.send_signal(signal.SIGTERM)
        assert process.wait(30) == 0, process.stderr[-3000:]
    finally:
        spawner.stop_all()

    outputs = asyncio.run(drain(url, "out"))
    distinct = set(outputs)
    lost = set(range(MESSAGES)) - distinct
    duplicates = len(outputs) - len(distinct)
    processed = summary(process.stdout)["app:worker"]["processed"]
    print(
        f"published {MESSAGES}, processed {processed:.0f}, outputs {len(outputs)}, "
        f"distinct {len(distinct)}, duplicates {duplicates}, lost {len(lost)}"
    )
    assert not lost, f"{len(lost)} inputs never reached the sink, e.g. {sorted(lost)[:10]}"
    messages = [line.get("msg") for line in process.logs()]
    assert messages.count("connection lost, reconnecting") >= 2, messages
    assert messages.count("connection restored") >= 2, messages
    assert summary(process.stdout)["app:worker"]["acked"] >= MESSAGES - duplicates


SLOW_HANDLER = """
function handle(p)
  time.sleep(0.2)
  return queue.publish("app:out", {n = p.n})
end
"""


def test_a_killed_workers_unacked_messages_go_to_the_next_worker(
    tmp_path: Path, vhost: str
) -> None:
    url = f"amqp://guest:guest@127.0.0.1:5672/{quote(vhost, safe='')}"
    total = 200
    asyncio.run(fill(url, "in", total))
    app = write_app(
        tmp_path / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.amqp", "url": url},
            {"name": "in", "kind": "queue.queue", "driver": "broker"},
            {"name": "out", "kind": "queue.queue", "driver": "broker"},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle",
             "source": SLOW_HANDLER, "modules": ["queue", "time"], "concurrency": 10,
             "prefetch": 50},
        ],
    )  # fmt: skip
    spawner = Spawner(tmp_path)
    try:
        first = spawner("run", app)
        wait(lambda: depth(url, "out")[0] >= 20, 30, "the first outputs", first)
        first.popen.kill()  # SIGKILL: no shutdown, its 50 prefetched deliveries unacked
        assert first.wait(10) == -signal.SIGKILL

        second = spawner("run", app, "--until-idle")
        assert second.wait(120) == 0, second.stderr[-3000:]
    finally:
        spawner.stop_all()

    outputs = asyncio.run(drain(url, "out"))
    assert set(outputs) == set(range(total)), "every input handled by one worker or the other"
    # the first worker handles ~50 messages/s and is killed after its first ~20: the second
    # takes over the unacked deliveries and the rest
    assert summary(second.stdout)["app:worker"]["acked"] >= total / 2
