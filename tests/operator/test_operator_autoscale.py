"""The autoscaler follows a real RabbitMQ queue's depth (in the test's own vhost): up with the
backlog, and down to zero after the cooldown."""

from __future__ import annotations

import copy
import json
from typing import Any

import aiormq
from broker import AMQP_URL
from conftest import eventually
from kube_fixtures import Cluster, example
from luaq.operator import autoscale
from luaq.operator.handlers import Operator
from luaq.operator.kube import QUEUE_CONSUMERS, SECRETS
from luaq.operator.resource import Autoscaling

NAME = "receipt-worker"


def replicas(cluster: Cluster, ns: str) -> int | None:
    found = cluster.get("deployments", ns, NAME)
    return None if found is None else int(found["spec"]["replicas"])


def status(cluster: Cluster, ns: str) -> dict[str, Any]:
    return dict((cluster.get("queueconsumers", ns, NAME) or {}).get("status") or {})


async def test_replicas_follow_the_backlog_up_and_down_to_zero(
    cluster: Cluster, operator: Operator, ns: str, vhost: str
) -> None:
    url = f"{AMQP_URL}{vhost}"
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

    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel(publisher_confirms=False)  # (for a transaction)
        # one transaction: the backlog goes from 0 to 25 at once, so the operator cannot read
        # it half-way (and scale 0 -> 2 -> 3) on a busy machine
        await channel.tx_select()
        for number in range(25):
            body = json.dumps({"to": f"user{number}@example.com"}).encode()
            await channel.basic_publish(body, routing_key="receipts")
        await channel.tx_commit()
        await eventually(lambda: replicas(cluster, ns) == 3, 20)  # ceil(25 / 10)
        await eventually(lambda: status(cluster, ns).get("backlog") == 25, 20)
        assert status(cluster, ns)["desiredReplicas"] == 3
        await channel.queue_purge("receipts")
        await eventually(lambda: replicas(cluster, ns) == 0, 20)
    finally:
        await connection.close()
    both = {"0 -> 3 replicas (backlog 25)", "3 -> 0 replicas (backlog 0)"}
    await eventually(lambda: cluster.messages(ns, "Scaled") >= both, 20)


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
