"""Two operator replicas: only the Lease holder acts; when it stops, the other takes over.
Each serves its own Prometheus metrics."""

from __future__ import annotations

import asyncio
import urllib.request
from contextlib import AsyncExitStack
from dataclasses import replace

from conftest import eventually
from kube_fixtures import TEST_SETTINGS, Cluster, apply, reconciles, running
from luaq.operator.kube import QUEUE_CONSUMERS
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
            assert 'luaq_operator_reconciles_total{outcome="ok"}' in metrics
            assert (
                f'luaq_operator_desired_replicas{{name="email-worker",namespace="{ns}"}} 2.0'
                in metrics
            )
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
