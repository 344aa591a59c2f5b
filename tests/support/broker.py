"""The test broker, managed from outside luaq, and entries for tests that drive a driver
directly (as if loaded from x.yaml in namespace `app`)."""

from __future__ import annotations

import subprocess
from collections.abc import Callable
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import uuid4

import aiormq
from luaq.runtime.entries import DEFAULT_RETRY, AmqpDriverEntry, ConsumerEntry, QueueEntry

CONTEXT = {"namespace": "app", "base_dir": Path(".")}


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"
    return result.stdout


AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


def vhost_url(vhost: str) -> str:
    return f"{AMQP_URL}{quote(vhost, safe='')}"


def queue_totals(vhost: str, ctl: Callable[..., str] = rabbitmqctl) -> dict[str, tuple[int, int]]:
    """(ready, unacknowledged) by queue name, as the broker counts them (`ctl`: rabbitmqctl
    for the node, the shared one by default)."""
    rows = ctl("list_queues", "-p", vhost, "name", "messages_ready",
               "messages_unacknowledged").splitlines()  # fmt: skip
    totals = {}
    for row in rows:
        name, ready, unacked = row.split("\t")
        if name != "name":
            totals[name] = (int(ready), int(unacked))
    return totals


async def queue_depth(name: str, url: str = AMQP_URL) -> tuple[int, int]:
    """(ready messages, consumers) by a passive declare: cheap, unlike rabbitmqctl, which boots
    an Erlang VM per call."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        ok = await channel.queue_declare(name, passive=True)
        return int(ok.message_count or 0), int(ok.consumer_count or 0)
    finally:
        await connection.close()


# luaq's delay queues for the default backoff and the retry delays tests use
RETRY_DELAYS_MS = sorted(
    {round(DEFAULT_RETRY.delay_after(n) * 1000) for n in range(1, 12)} | {50, 100, 200, 300, 600}
)


KINDS = ("delay", "retry")  # luaq's quorum delay queues, and its classic ones


async def delete_queues(*names: str, url: str = AMQP_URL) -> None:
    """Delete queues, whether they exist or not, and the delay queues luaq may have declared
    for them (`<name>.delay.<ms>ms`, and `<name>.retry.<ms>ms` as before or when not durable)."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for name in names:
            delays = (f"{name}.{kind}.{ms}ms" for ms in RETRY_DELAYS_MS for kind in KINDS)
            for queue in (name, *delays):
                if len(queue.encode()) > 255:  # no such queue can exist
                    continue
                if channel.is_closed:
                    channel = await connection.channel()
                await channel.queue_delete(queue)
    finally:
        await connection.close()


def driver_entry(**fields: Any) -> AmqpDriverEntry:
    """`app:broker` on the test broker; `fields` override or add."""
    return AmqpDriverEntry.model_validate(
        {"id": "app:broker", "kind": "queue.driver.amqp", "file": Path("x.yaml"),
         "url": AMQP_URL, "connection_timeout": "5s", **fields},
        context=CONTEXT,
    )  # fmt: skip


def queue_entry(name: str, **fields: Any) -> QueueEntry:
    return QueueEntry.model_validate(
        {"id": f"app:{name}", "kind": "queue.queue", "file": Path("x.yaml"),
         "driver": "app:broker", "queue_name": name, **fields},
        context=CONTEXT,
    )  # fmt: skip


def consumer_entry(queue: QueueEntry, **fields: Any) -> ConsumerEntry:
    return ConsumerEntry.model_validate(
        {"id": f"app:consumer-{uuid4().hex[:8]}", "kind": "queue.consumer",
         "file": Path("x.yaml"), "queue": queue.id, "func": "app:handler", **fields},
        context=CONTEXT,
    )  # fmt: skip
