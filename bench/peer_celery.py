"""The Celery side of bench/peers.py, run by Celery's own worker command:

    celery -A peer_celery worker --queues IN ...

configured by the environment the bench sets: BENCH_URL (the broker), BENCH_OUT (where `relay`
sends), BENCH_DONE (a file that gets one byte per task done, which the bench counts).
"""

from __future__ import annotations

import os
from typing import Any

from celery import Celery

app = Celery("peer_celery", broker=os.environ["BENCH_URL"])
app.conf.update(
    # late ack, as luaq and the other peers settle: after the handler ran
    task_acks_late=True,
    task_ignore_result=True,
    task_routes={"forward": {"queue": os.environ["BENCH_OUT"]}},
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
)
DONE = os.open(os.environ["BENCH_DONE"], os.O_WRONLY | os.O_APPEND)


@app.task(name="noop")
def noop(payload: dict[str, Any]) -> None:
    os.write(DONE, b".")


@app.task(name="forward")
def forward(payload: dict[str, Any]) -> None:
    """Where `relay` sends its message; nothing consumes its queue."""


@app.task(name="relay")
def relay(payload: dict[str, Any]) -> None:
    forward.delay(payload)
    os.write(DONE, b".")
