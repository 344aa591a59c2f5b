"""The Dramatiq side of bench/peers.py, run by Dramatiq's own worker command:

    dramatiq peer_dramatiq --queues IN ...

configured by the environment the bench sets: BENCH_URL (the broker), BENCH_IN (the queue of
`noop` and `relay`), BENCH_OUT (the queue of `forward`), BENCH_DONE (a file that gets one byte
per message done, which the bench counts).
"""

from __future__ import annotations

import os
from typing import Any

import dramatiq
from dramatiq.brokers.rabbitmq import RabbitmqBroker

dramatiq.set_broker(RabbitmqBroker(url=os.environ["BENCH_URL"]))
DONE = os.open(os.environ["BENCH_DONE"], os.O_WRONLY | os.O_APPEND)


@dramatiq.actor(queue_name=os.environ["BENCH_IN"])
def noop(payload: dict[str, Any]) -> None:
    os.write(DONE, b".")


@dramatiq.actor(queue_name=os.environ["BENCH_OUT"])
def forward(payload: dict[str, Any]) -> None:
    """Where `relay` sends its message; nothing consumes its queue."""


@dramatiq.actor(queue_name=os.environ["BENCH_IN"])
def relay(payload: dict[str, Any]) -> None:
    forward.send(payload)
    os.write(DONE, b".")
