"""Two operator replicas: only the Lease holder acts; when it stops, the other takes over.
Each serves its own Prometheus metrics. Losing the Lease cancels the pass in flight, and a
replica that leads again starts from fresh state. (Network faults: test_operator_partition.)"""

from __future__ import annotations

import asyncio
import urllib.request
from contextlib import AsyncExitStack
from dataclasses import replace
from datetime import UTC, datetime
from typing import Any

import pytest
from conftest import eventually
from kube_fixtures import TEST_SETTINGS, Cluster, apply, reconciles, running
from kubernetes.client.exceptions import ApiException
from luaq.operator.handlers import Operator
from luaq.operator.kube import DEPLOYMENTS, LEASES, QUEUE_CONSUMERS
from luaq.operator.leader import LeadershipLost
from processes import free_port


async def scrape(port: int) -> str:
    def get() -> str:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
            return str(response.read().decode())

    return await asyncio.to_thread(get)


def reporters(cluster: Cluster, ns: str) -> set[str]:
    """Which replicas posted the Events of the namespace: those that acted."""
    return {str(event.get("reportingInstance")) for event in cluster.events(ns)}


async def test_only_the_lease_holder_acts_and_the_other_takes_over(
    cluster: Cluster, ns: str
) -> None:
    ports = free_port(), free_port()
    settings = [
        replace(TEST_SETTINGS, identity=f"replica-{n}", metrics_port=port)
        for n, port in enumerate(ports)
    ]
    async with AsyncExitStack() as stack:
        first = await stack.enter_async_context(running(settings[0]))
        await eventually(lambda: first.leading, 20)
        async with running(settings[1]) as second:
            await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
            await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 20)
            await eventually(lambda: reconciles(first) > 0, 20)
            metrics = await scrape(ports[0])
            assert "luaq_operator_leader 1.0" in metrics
            assert "luaq_operator_queueconsumers 1.0" in metrics
            consumer = f'namespace="{ns}",queueconsumer="email-worker"'
            assert (
                f'luaq_operator_reconciles_total{{namespace="{ns}",outcome="ok",'
                'queueconsumer="email-worker"}' in metrics
            )
            assert f"luaq_operator_desired_replicas{{{consumer}}} 2.0" in metrics
            assert "luaq_operator_leader 0.0" in await scrape(ports[1])
            assert reporters(cluster, ns) == {"replica-0"}
            await stack.aclose()  # the leader stops and hands the Lease over
            await eventually(lambda: second.leading, 20)
            await cluster.patch(QUEUE_CONSUMERS, ns, "email-worker", {"spec": {"replicas": 4}})
            await eventually(
                lambda: (
                    (cluster.get("deployments", ns, "email-worker") or {})["spec"]["replicas"] == 4
                ),
                20,
            )
            await eventually(lambda: reporters(cluster, ns) == {"replica-0", "replica-1"}, 20)


async def test_the_follower_never_acts(cluster: Cluster, ns: str) -> None:
    async with running(replace(TEST_SETTINGS, identity="leader")) as leader:
        await eventually(lambda: leader.leading, 20)
        async with running(replace(TEST_SETTINGS, identity="follower")) as follower:
            await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
            await eventually(lambda: (ns, "email-worker") in follower.triggers, 20)
            await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 20)
            await cluster.patch(QUEUE_CONSUMERS, ns, "email-worker", {"spec": {"replicas": 3}})
            await eventually(
                lambda: (
                    (cluster.get("deployments", ns, "email-worker") or {})["spec"]["replicas"] == 3
                ),
                20,
            )
            await eventually(lambda: reporters(cluster, ns) == {"leader"}, 20)
            assert not follower.leading
            assert reconciles(follower) == 0


async def hand_lease(cluster: Cluster, holder: str) -> None:
    """Write the Lease as another replica would: taken by `holder` for a minute, or released
    (again when the operator renewed it in between: 409)."""
    namespace, name = TEST_SETTINGS.lease_namespace, TEST_SETTINGS.lease_name
    while True:
        lease = cluster.get("leases", namespace, name)
        assert lease is not None
        now = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")
        lease["spec"].update(holderIdentity=holder, renewTime=now, leaseDurationSeconds=60)
        try:
            await cluster.call(cluster.kube.replace, LEASES, namespace, name, lease)
            return
        except ApiException as exc:
            if exc.status != 409:
                raise


async def test_losing_the_lease_cancels_the_pass_in_flight(cluster: Cluster) -> None:
    """A pass still running when another replica takes the Lease is cancelled at once (it
    starts no further write), no pass starts until the Lease is back, and then a new term
    begins (the daemons start it from fresh state)."""
    operator = Operator(replace(TEST_SETTINGS, identity="replica"))
    await operator.start()
    try:
        await eventually(lambda: operator.leading, 10)
        term = operator.epoch
        started = asyncio.Event()

        async def a_pass() -> str:  # waiting on the network, say
            started.set()
            await asyncio.Event().wait()
            return "ok"

        in_flight = asyncio.create_task(operator.as_leader(a_pass()))
        await started.wait()
        await hand_lease(cluster, "another-replica")
        with pytest.raises(LeadershipLost):
            await asyncio.wait_for(in_flight, 5)
        assert not operator.leading
        with pytest.raises(LeadershipLost):
            await operator.as_leader(a_pass())
        await hand_lease(cluster, "")
        await eventually(lambda: operator.leading, 5)
        assert operator.epoch == term + 1
    finally:
        await operator.stop()


def status(cluster: Cluster, ns: str) -> dict[str, Any]:
    found = cluster.get("queueconsumers", ns, "email-worker") or {}
    return dict(found.get("status") or {})


async def test_a_replica_that_leads_again_forgets_what_it_wrote_before(
    cluster: Cluster, ns: str
) -> None:
    """While another replica led, the QueueConsumer's status changed; the replica that leads
    again compares with the status as it is, not with what it wrote itself a term ago."""
    async with running(TEST_SETTINGS) as operator:
        await eventually(lambda: operator.leading, 20)
        await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
        await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 20)
        deployment = cluster.get("deployments", ns, "email-worker")
        assert deployment is not None
        ready = {
            "observedGeneration": deployment["metadata"]["generation"],
            "replicas": 2,
            "updatedReplicas": 2,
            "readyReplicas": 2,
        }
        await cluster.patch(DEPLOYMENTS, ns, "email-worker", {"status": ready}, "status")
        await eventually(lambda: status(cluster, ns).get("readyReplicas") == 2, 20)
        await hand_lease(cluster, "another-replica")
        await eventually(lambda: not operator.leading, 5)
        # what the other leader wrote, from what it saw then
        await cluster.patch(
            QUEUE_CONSUMERS, ns, "email-worker", {"status": {"readyReplicas": 1}}, "status"
        )
        seen = operator.bodies[(ns, "email-worker")]  # kopf's live view of the resource
        await eventually(lambda: (seen.get("status") or {}).get("readyReplicas") == 1, 5)
        await hand_lease(cluster, "")
        await eventually(lambda: operator.leading, 5)
        await eventually(lambda: status(cluster, ns).get("readyReplicas") == 2, 10)
