"""Dead letters made fast, for the `luaq dlq` tests: published straight into a queue with the
headers luaq's dead-lettering gives them, through luaq's own AMQP client (pipelined confirms:
12,000 take about a second), rather than by running a worker that fails them one by one."""

from __future__ import annotations

import asyncio
import json
from typing import Any

from luaq.runtime.drivers.amqp.client import Confirm, Connection, Endpoint

BATCH = 500  # publishes awaiting their confirms at once


def dead_letter_id(n: int) -> str:
    return f"dead-{n:06d}"


async def put_dead_letters(
    url: str, queue: str, count: int, original: str = "app:jobs", pad: int = 0, first: int = 0
) -> None:
    """`count` persistent messages in the durable `queue` (declared as luaq declares a
    queue.queue), from `original`: ids dead-<first> and on, bodies {"n": n, "pad": "x" * pad}."""
    connection = await Connection.open(Endpoint.from_url(url))
    try:
        channel = await connection.channel()
        await channel.confirm_select()
        await channel.queue_declare(queue, durable=True, arguments={})
        filler = "x" * pad
        waiting: list[asyncio.Future[str]] = []
        for n in range(first, first + count):
            properties: dict[str, Any] = {
                "content_type": "application/json",
                "delivery_mode": 2,
                "message_id": dead_letter_id(n),
                "headers": {
                    "x_dead_letter_reason": "max_attempts",
                    "x_original_queue": original,
                    "x_attempts": 2,
                    "x_last_error": f"refused {n}",
                    "x_failed_at": "2024-01-01T00:00:00.000+00:00",
                },
            }
            body = json.dumps({"n": n, "pad": filler}).encode()
            waiting.append(channel.publish(body, queue, properties))
            if len(waiting) >= BATCH:
                assert set(await asyncio.gather(*waiting)) == {Confirm.ACK}
                waiting.clear()
                await connection.drained()
        assert set(await asyncio.gather(*waiting)) <= {Confirm.ACK}
    finally:
        await connection.close()


async def ready(url: str, queue: str) -> int:
    """Ready messages in `queue`, by a passive declare."""
    connection = await Connection.open(Endpoint.from_url(url))
    try:
        channel = await connection.channel()
        return (await channel.queue_declare(queue, passive=True)).message_count or 0
    finally:
        await connection.close()


async def taken_ids(url: str, queue: str, count: int) -> list[str]:
    """The ids of the first `count` messages of `queue`, in order, taken (acked) from it."""
    connection = await Connection.open(Endpoint.from_url(url))
    got: list[str] = []
    done = asyncio.get_running_loop().create_future()
    try:
        channel = await connection.channel()
        await channel.qos(1000)

        def on_message(tag: int, _redelivered: bool, properties: Any, _body: bytes) -> None:
            if len(got) < count:  # later ones are given back when the connection closes
                channel.ack(tag)
                got.append(properties.get("message_id"))
                if len(got) == count and not done.done():
                    done.set_result(None)

        await channel.consume(queue, on_message, "luaq-test-reader")
        async with asyncio.timeout(30):
            await done
        return got
    finally:
        await connection.close()
