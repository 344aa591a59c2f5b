"""A consumer kept consuming when the broker ends it but not its connection: a consume channel
the broker closes (consumer_timeout), and a consumer cancelled with its queue while the queue
cannot be declared again at once. On RabbitMQ nodes of the tests' own (a consumer_timeout
node, the suite's own_node for a vhost limit), reconfigured as the fault needs; luaq runs as
a child process, its readiness read from /readyz."""

from __future__ import annotations

import asyncio
import json
import logging
import signal
from pathlib import Path
from uuid import uuid4

import aiormq
import pytest
from broker import consumer_entry, delete_queues, driver_entry, queue_depth, queue_entry
from conftest import eventually
from luaq.runtime.drivers import Delivery
from luaq.runtime.drivers.amqp import AmqpDriver
from luaq.runtime.entries import QueueEntry
from processes import Spawner, free_port, summary, wait_until
from rabbit_node import RabbitNode, rabbit_node
from test_faults import depth, fill
from test_metrics import get
from test_reliability import Outputs, amqp_app, logged

NOT_ATTACHED = (503, "consumer app:worker not attached\n")


# how often a channel checks its consumer_timeout: every minute unless told otherwise
TICK_EVERY_500_MS = "[{rabbit, [{channel_tick_interval, 500}]}]."

HOLD_ONE_ONCE = """
local held = false
function handle(p)
  if p.n == 0 and not held then
    held = true
    logger:info("holding")
    time.sleep(5)
  end
  return queue.publish("app:out", {n = p.n})
end
"""


def test_a_consume_channel_the_broker_closes_is_opened_again(
    tmp_path: Path, spawn: Spawner
) -> None:
    """RabbitMQ's consumer_timeout (2 s; this node checks every 500 ms rather than every
    minute) closes the consume channel of a handler that holds a message longer: 406
    PRECONDITION_FAILED, while the connection lives on. luaq consumes again on a new channel
    after reconnect_delay, not ready meanwhile; the broker delivers the held message again,
    and the held copy's late ack is stale, never sent on the new channel."""
    with rabbit_node("consumer_timeout = 2000", TICK_EVERY_500_MS) as node:
        url = node.url
        asyncio.run(fill(url, "jobs", 10))
        port = free_port()
        app = amqp_app(tmp_path / "app.yaml", url, HOLD_ONE_ONCE, broker={"reconnect_delay": "1s"},
                       concurrency=2, prefetch=10)  # fmt: skip
        process = spawn("run", app, "--metrics-port", str(port), "--shutdown-timeout", "10")

        wait_until(lambda: bool(logged(process, "holding")), 20, "the held message")
        wait_until(lambda: get(port, "/readyz")[0::2] == NOT_ATTACHED, 10,
                   "not ready once the broker closed the channel")  # fmt: skip
        assert get(port, "/healthz")[0] == 200
        wait_until(lambda: get(port, "/readyz")[0] == 200, 10, "ready again")
        outputs = Outputs(url)
        wait_until(lambda: set(outputs()) == set(range(10)), 10, "every message handled")
        assert depth(url, "jobs") == (0, 1), "the queue has its consumer again"

        process.popen.send_signal(signal.SIGTERM)  # the held handler finishes first
        assert process.wait(20) == 0, process.stderr
        assert depth(url, "jobs") == (0, 0), "nothing left unacknowledged"

    [lost] = logged(process, "consumer lost, restoring it")  # the broker's reason, once
    assert "PRECONDITION_FAILED - delivery acknowledgement on channel" in lost["error"], lost
    assert lost["consumer"] == "app:worker"
    assert logged(process, "consumer restored")
    assert not logged(process, "connection lost, reconnecting"), "the connection lived on"
    worker = summary(process.stdout)["app:worker"]
    assert (worker["processed"], worker["acked"], worker["stale"]) == (11, 10, 1), worker


FORWARD = 'function handle(p) return queue.publish("app:out", {n = p.n}) end'


def test_a_cancelled_consumer_is_restored_once_its_queue_can_be_declared_again(
    tmp_path: Path, spawn: Spawner, own_node_vhost: tuple[RabbitNode, str]
) -> None:
    """The consumed queue is deleted; its re-declaration is refused (a vhost queue limit)
    until the limit goes. luaq keeps trying with backoff and is not ready meanwhile, though
    the cancelled consumer's channel is still open; then the consumer is back."""
    node, vhost = own_node_vhost
    url = node.vhost_url(vhost)
    port = free_port()
    broker = {"reconnect_delay": "100ms", "reconnect_max_delay": "400ms"}
    app = amqp_app(tmp_path / "app.yaml", url, FORWARD, broker=broker)
    process = spawn("run", app, "--metrics-port", str(port))
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "ready")
    listed = node.ctl("list_queues", "-p", vhost, "name").split()
    queues = [name for name in listed if name != "name"]
    assert "jobs" in queues, queues
    # room for the queues there are, less the one deleted next: it cannot come back
    node.ctl("set_vhost_limits", "-p", vhost, json.dumps({"max-queues": len(queues) - 1}))

    asyncio.run(delete_queues("jobs", url=url))
    wait_until(lambda: get(port, "/readyz")[0::2] == NOT_ATTACHED, 10,
               "not ready while the consumer is gone")  # fmt: skip
    wait_until(lambda: len(logged(process, "consumer not restored, retrying")) >= 3, 10,
               "the re-declaration refused, and tried again")  # fmt: skip
    assert get(port, "/readyz")[0::2] == NOT_ATTACHED
    refused = logged(process, "consumer not restored, retrying")[0]
    assert "queue limit in vhost" in refused["error"], refused

    node.ctl("clear_vhost_limits", "-p", vhost)
    wait_until(lambda: get(port, "/readyz")[0] == 200, 10, "ready again")
    assert depth(url, "jobs") == (0, 1)
    asyncio.run(fill(url, "jobs", 3))
    outputs = Outputs(url)
    wait_until(lambda: sorted(outputs()) == [0, 1, 2], 10, "messages handled again")
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0, process.stderr

    assert logged(process, "consumer lost, restoring it")
    assert logged(process, "consumer restored")


async def test_the_recovery_outlives_an_error_no_one_foresaw(
    caplog: pytest.LogCaptureFixture, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Whatever a recovery attempt raises (here a RuntimeError from the re-declaration, once)
    is logged, and the next attempt comes after the backoff."""
    name = f"luaq-test-{uuid4().hex[:12]}"
    queue = queue_entry(name)
    driver = AmqpDriver(driver_entry(reconnect_delay="50ms"))
    await driver.start()
    try:
        await driver.declare(queue)
        got: list[Delivery] = []
        subscription = await driver.consume(queue, consumer_entry(queue), got.append)
        declare, failures = driver.declare, [RuntimeError("unforeseen")]

        async def failing_once(entry: QueueEntry) -> None:
            if failures:
                raise failures.pop()
            await declare(entry)

        monkeypatch.setattr(driver, "declare", failing_once)
        caplog.set_level(logging.WARNING, "luaq.amqp")

        await delete_queues(name)  # RabbitMQ cancels the consumer
        await eventually(lambda: "the broker cancelled consumer" in caplog.text)
        await eventually(lambda: consumed(name), 10)
        assert not failures, "the re-declaration failed once"
        assert subscription.attached
        await driver.publish(queue, b"{}", {"message_id": "after"}, "application/json")
        await eventually(lambda: [d.id for d in got] == ["after"])
    finally:
        await driver.close()
        await delete_queues(name)


async def consumed(name: str) -> bool:
    """The queue exists and has a consumer."""
    try:
        return (await queue_depth(name))[1] == 1
    except aiormq.exceptions.AMQPError:
        return False
