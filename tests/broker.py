"""The test broker, managed from outside luaq."""

from __future__ import annotations

import subprocess

import aiormq


def rabbitmqctl(*args: str) -> str:
    result = subprocess.run(
        ["rabbitmqctl", "-q", *args], capture_output=True, text=True, timeout=30, check=False
    )
    assert result.returncode == 0, f"rabbitmqctl {' '.join(args)}: {result.stderr}"
    return result.stdout


AMQP_URL = "amqp://guest:guest@127.0.0.1:5672/"


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


async def delete_queues(*names: str, url: str = AMQP_URL) -> None:
    """Delete queues, whether they exist or not."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        for name in names:
            if channel.is_closed:
                channel = await connection.channel()
            await channel.queue_delete(name)
    finally:
        await connection.close()
