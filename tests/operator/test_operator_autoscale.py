"""The autoscaler follows a real RabbitMQ queue's depth (in the test's own vhost): up with the
backlog, and down to zero after the cooldown."""

from __future__ import annotations

import asyncio
import copy
import json
import time
import urllib.request
from dataclasses import replace
from typing import Any

import aiormq
from broker import AMQP_URL
from conftest import eventually
from kube_fixtures import TEST_SETTINGS, Cluster, example, running
from luaq.operator import autoscale
from luaq.operator.handlers import Operator
from luaq.operator.kube import QUEUE_CONSUMERS, SECRETS
from luaq.operator.resource import Autoscaling
from processes import free_port
from prometheus_client.parser import text_string_to_metric_families

NAME = "receipt-worker"


def replicas(cluster: Cluster, ns: str) -> int | None:
    found = cluster.get("deployments", ns, NAME)
    return None if found is None else int(found["spec"]["replicas"])


def status(cluster: Cluster, ns: str) -> dict[str, Any]:
    return dict((cluster.get("queueconsumers", ns, NAME) or {}).get("status") or {})


async def autoscaled(cluster: Cluster, ns: str, url: str) -> None:
    """The receipt-worker example, autoscaled from zero on the broker at `url`."""
    secret = {"metadata": {"name": "rabbitmq"}, "stringData": {"url": url}}
    await cluster.create(SECRETS, ns, secret)
    source, qc = example("receipt-worker.yaml")
    qc = copy.deepcopy(qc)
    qc["spec"].pop("sourceRef")
    qc["spec"]["source"] = source["data"]["receipts.lua"]
    qc["spec"]["autoscaling"] = {
        "minReplicas": 0, "maxReplicas": 3, "backlogPerReplica": 10, "cooldownSeconds": 1,
    }  # fmt: skip
    await cluster.create(QUEUE_CONSUMERS, ns, qc)
    await eventually(lambda: replicas(cluster, ns) == 0, 20)  # declared, empty: no pods


async def publish(channel: aiormq.abc.AbstractChannel, count: int, **to: int) -> None:
    """`count` receipts (and as many as `to` says to other queues) in one transaction: the
    backlog goes from 0 to `count` at once, so the operator cannot read it half-way (and scale
    0 -> 2 -> 3) on a busy machine."""
    await channel.tx_select()
    for queue, number in [*to.items(), ("receipts", count)]:
        for n in range(number):
            body = json.dumps({"to": f"user{n}@example.com"}).encode()
            await channel.basic_publish(body, routing_key=queue)
    await channel.tx_commit()


async def test_replicas_follow_the_backlog_up_and_down_to_zero(
    cluster: Cluster, operator: Operator, ns: str, vhost: str
) -> None:
    url = f"{AMQP_URL}{vhost}"
    await autoscaled(cluster, ns, url)
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=False)  # (for a transaction)
        await publish(channel, 25)
        await eventually(lambda: replicas(cluster, ns) == 3, 20)  # ceil(25 / 10)
        await eventually(lambda: status(cluster, ns).get("backlog") == 25, 20)
        assert status(cluster, ns)["desiredReplicas"] == 3
        await channel.queue_purge("receipts")
        await eventually(lambda: replicas(cluster, ns) == 0, 20)
    finally:
        await connection.close()
    both = {"0 -> 3 replicas (backlog 25)", "3 -> 0 replicas (backlog 0)"}
    await eventually(lambda: cluster.messages(ns, "Scaled") >= both, 20)


async def test_messages_waiting_out_a_retry_are_no_backlog_to_scale_for(
    cluster: Cluster, operator: Operator, ns: str, vhost: str
) -> None:
    """What waits in a delay queue (the default retry's first, 1 s) is no work for a replica
    yet: it comes back ready when its delay is over, and counts then."""
    url = f"{AMQP_URL}{vhost}"
    delay_queue = "receipts.delay.1000ms"
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=False)
        await channel.queue_declare(delay_queue, durable=True)  # (no TTL: they stay there)
        await publish(channel, 0, **{delay_queue: 25})
        await autoscaled(cluster, ns, url)  # at zero: nothing is ready
        await publish(channel, 5)
        await eventually(lambda: status(cluster, ns).get("backlog") == 5, 20)
        assert status(cluster, ns)["desiredReplicas"] == 1  # ceil(5 / 10), not ceil(30 / 10)
    finally:
        await connection.close()


def test_the_decision_stays_in_bounds_and_waits_out_the_cooldown() -> None:
    scaling = Autoscaling(
        min_replicas=1, max_replicas=4, backlog_per_replica=10, activation_backlog=5,
        cooldown_seconds=60,
    )  # fmt: skip
    assert autoscale.decide(0, scaling, 1, None) == 1  # never below min
    assert autoscale.decide(5, scaling, 1, None) == 1  # at activation: min
    assert autoscale.decide(6, scaling, 1, None) == 1
    assert autoscale.decide(35, scaling, 1, 1.0) == 4  # up at once, even cooling
    assert autoscale.decide(1000, scaling, 4, None) == 4  # never above max
    assert autoscale.decide(0, scaling, 4, 30.0) == 4  # down waits for the cooldown
    assert autoscale.decide(0, scaling, 4, 61.0) == 1
    to_zero = Autoscaling(max_replicas=2, activation_backlog=3, cooldown_seconds=0)
    assert autoscale.decide(3, to_zero, 2, 0.0) == 0
    assert autoscale.decide(4, to_zero, 0, None) == 1


Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


async def scrape(port: int) -> Samples:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(await asyncio.to_thread(get))
        for sample in family.samples
    }


async def test_the_operator_exports_what_it_read_and_counts_a_failed_read_as_an_error(
    cluster: Cluster, ns: str, vhost: str
) -> None:
    """luaq_operator_backlog, _desired_replicas and _backlog_last_read_timestamp_seconds say
    what the autoscaler read and wants; a read that fails (the broker's URL now names a closed
    port) counts in _backlog_read_errors_total and makes the pass an error, not ok; deleting
    the QueueConsumer removes its series."""
    port = free_port()
    consumer = frozenset({"namespace": ns, "queueconsumer": NAME}.items())

    def of(samples: Samples, name: str, **labels: str) -> float | None:
        return samples.get((f"luaq_operator_{name}", consumer | frozenset(labels.items())))

    async with running(replace(TEST_SETTINGS, metrics_port=port)):
        url = f"{AMQP_URL}{vhost}"
        await autoscaled(cluster, ns, url)
        started = time.time()
        connection = await aiormq.connect(url)
        try:
            await publish(await connection.channel(publisher_confirms=False), 25)

            async def read() -> bool:
                samples = await scrape(port)
                return of(samples, "backlog") == 25 and of(samples, "desired_replicas") == 3

            await eventually(read, 20)
        finally:
            await connection.close()
        samples = await scrape(port)
        last_read = of(samples, "backlog_last_read_timestamp_seconds") or 0
        assert started <= last_read <= time.time()
        assert of(samples, "backlog_read_errors_total") == 0

        closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/{vhost}"
        await cluster.patch(SECRETS, ns, "rabbitmq", {"stringData": {"url": closed}})

        async def failing(reads: float) -> bool:
            return (of(await scrape(port), "backlog_read_errors_total") or 0) >= reads

        await eventually(lambda: failing(1), 20)
        samples = await scrape(port)  # a pass records its outcome and read errors at once
        ok = of(samples, "reconciles_total", outcome="ok")
        errors = of(samples, "reconciles_total", outcome="error") or 0
        reads = of(samples, "backlog_read_errors_total") or 0
        assert errors >= reads >= 1
        await eventually(lambda: failing(reads + 2), 20)  # each due read fails again
        samples = await scrape(port)
        assert of(samples, "reconciles_total", outcome="ok") == ok  # none of them was ok
        assert (of(samples, "reconciles_total", outcome="error") or 0) >= errors + 2
        assert of(samples, "backlog") == 25  # the last read stands, and says when it was
        assert of(samples, "backlog_last_read_timestamp_seconds") == last_read

        await cluster.delete(QUEUE_CONSUMERS, ns, NAME)

        async def gone() -> bool:
            return not any(labels >= consumer for _, labels in await scrape(port))

        await eventually(gone, 20)
