"""Leader election through network faults: a TCP proxy (tests/support/tcp_proxy.py) between the
leader replica (in this process) and the API server, while a follower (`luaq-operator`, its own
process) talks to it directly.

Whatever the leader's network does, two replicas never act at once (their
luaq_operator_leader gauges, sampled all along, are never both 1, and a QueueConsumer's Events
come from one replica at a time, in the order they led); a follower takes a Lease its holder
can no longer renew; and the leader's election survives the fault and releases the Lease when
it stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import http.client
import json
import os
import signal
import subprocess
import sys
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from dataclasses import dataclass, field, replace
from pathlib import Path

import pytest
from conftest import eventually
from kube_emulator import kubeconfig
from kube_fixtures import TEST_SETTINGS, Cluster, apply, reconciles, running
from luaq.operator.handlers import Operator
from luaq.operator.kube import QUEUE_CONSUMERS
from processes import answers, free_port
from tcp_proxy import TcpProxy

OPERATOR = Path(sys.executable).with_name("luaq-operator")
LEASE = TEST_SETTINGS.lease_seconds  # 3 s: the holder stops after 2 s without renewing
LEADER, FOLLOWER = "replica-leader", "replica-follower"


def leader_gauge(operator: Operator) -> bool:
    return operator.metrics.registry.get_sample_value("luaq_operator_leader") == 1


async def scraped_leader(port: int) -> bool:
    """What a replica's /metrics says of its leadership (False when it does not answer)."""

    def get() -> bool:
        try:
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=2) as response:
                return "luaq_operator_leader 1.0" in response.read().decode()
        except (OSError, http.client.HTTPException):  # URLError included: stopped, stopping
            return False

    return await asyncio.to_thread(get)


@dataclass
class Leaders:
    """Samples every replica's leader gauge, over and over: who led, in which order, and
    whether two ever led at once."""

    gauges: dict[str, Callable[[], Awaitable[bool]]]
    states: list[frozenset[str]] = field(default_factory=list)  # who led, each change once
    samples: int = 0
    both: list[frozenset[str]] = field(default_factory=list)

    async def run(self) -> None:
        while True:
            leading = frozenset({name for name, gauge in self.gauges.items() if await gauge()})
            self.samples += 1
            if len(leading) > 1:
                self.both.append(leading)
            if not self.states or self.states[-1] != leading:
                self.states.append(leading)
            # the sampling period: far below how long an overlap would last (the old leader
            # would act until it notices, a round at least), and light on the replicas
            await asyncio.sleep(0.05)

    def leads(self, name: str) -> bool:
        """Whether `name` led at the last sample."""
        return bool(self.states) and name in self.states[-1]

    @property
    def order(self) -> list[str]:
        """The replicas that led, in order, each term once."""
        names: list[str] = []
        for state in self.states:
            for name in state:
                if not names or names[-1] != name:
                    names.append(name)
        return names

    def one_at_a_time(self) -> bool:
        assert not self.both, f"two replicas led at once: {self.both[:3]}"
        return True

    @asynccontextmanager
    async def sampling(self) -> AsyncIterator[Leaders]:
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task


def reporters(cluster: Cluster, ns: str) -> list[str]:
    """Who posted the QueueConsumer's Events, in the order the API server got them, each run of
    Events from one replica counted once."""
    events = [
        e
        for e in cluster.events(ns)
        if (e.get("involvedObject") or {}).get("name") == "email-worker"
    ]
    events.sort(key=lambda e: int(e["metadata"]["resourceVersion"]))
    runs: list[str] = []
    for event in events:
        if not runs or runs[-1] != event.get("reportingInstance"):
            runs.append(str(event.get("reportingInstance")))
    return runs


def in_order(runs: list[str], order: list[str]) -> bool:
    """Whether `runs` is a subsequence of `order`."""
    remaining = iter(order)
    return all(name in remaining for name in runs)


@dataclass
class Follower:
    process: asyncio.subprocess.Process
    metrics: int
    log: Path

    async def leading(self) -> bool:
        return await scraped_leader(self.metrics)

    async def stop(self) -> None:
        if self.process.returncode is None:
            self.process.send_signal(signal.SIGTERM)
        code = await asyncio.wait_for(self.process.wait(), 60)
        assert code == 0, self.log.read_text()[-3000:]


@asynccontextmanager
async def follower(cluster: Cluster, ns: str, tmp_path: Path) -> AsyncIterator[Follower]:
    """`luaq-operator` in a process of its own, straight to the API server."""
    metrics = free_port()
    log_path = tmp_path / "follower.log"
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            OPERATOR, "--namespace", ns, "--lease-namespace", ns,
            "--lease-seconds", str(LEASE), "--image", TEST_SETTINGS.image,
            "--resync-seconds", str(TEST_SETTINGS.resync_seconds),
            "--metrics-port", str(metrics), "--health-port", "0",
            env={**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "POD_NAME": FOLLOWER},
            stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        replica = Follower(process, metrics, log_path)
        try:
            yield replica
        finally:
            await replica.stop()


def total_reconciles(operator: Operator) -> float:
    return sum(reconciles(operator, outcome) for outcome in ("ok", "invalid", "error"))


@asynccontextmanager
async def two_replicas(
    cluster: Cluster, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> AsyncIterator[tuple[TcpProxy, Operator, Follower, Leaders]]:
    """The leader, through the proxy, leading; the follower, following; a QueueConsumer that
    the leader has created the objects of; and the leaders' sampler, sampling."""
    async with TcpProxy(*api_address(cluster)) as proxy:
        proxied = tmp_path / "proxied-kubeconfig"
        proxied.write_text(kubeconfig(proxy.url))
        monkeypatch.setenv("KUBECONFIG", str(proxied))  # this process's replica only
        settings = replace(TEST_SETTINGS, identity=LEADER, lease_namespace=ns)
        async with running(settings) as leader:
            await eventually(lambda: leader.leading, 20)
            async with follower(cluster, ns, tmp_path) as other:
                await eventually(lambda: answers(f"http://127.0.0.1:{other.metrics}/metrics"), 20)
                await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
                await eventually(lambda: total_reconciles(leader) > 0, 20)  # a first pass
                leaders = Leaders({LEADER: _gauge(leader), FOLLOWER: other.leading})
                async with leaders.sampling():
                    try:
                        yield proxy, leader, other, leaders
                    finally:  # the replicas stop on a working network
                        proxy.resume()
                        proxy.accept()


def api_address(cluster: Cluster) -> tuple[str, int]:
    server = json.loads(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    url = urllib.parse.urlsplit(server)
    assert url.hostname is not None
    assert url.port is not None
    return url.hostname, url.port


def _gauge(operator: Operator) -> Callable[[], Awaitable[bool]]:
    async def gauge() -> bool:
        return leader_gauge(operator)

    return gauge


def replicas(cluster: Cluster, ns: str) -> int:
    return int((cluster.get("deployments", ns, "email-worker") or {})["spec"]["replicas"])


def holder(cluster: Cluster, ns: str) -> tuple[str, str]:
    spec = (cluster.get("leases", ns, "luaq-operator") or {}).get("spec") or {}
    return str(spec.get("holderIdentity")), str(spec.get("renewTime"))


@pytest.mark.parametrize("blip", ["stall", "refuse"])
async def test_a_blip_on_the_leader_never_makes_two_actors(
    cluster: Cluster, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, blip: str
) -> None:
    """(a) 2.5 s of a dead network (stall) or of refused connections (the errors urllib3 raises
    as MaxRetryError) on the leader; then (c) its election is still running: it takes over when
    the follower stops, renews, and releases the Lease when it stops itself."""
    async with two_replicas(cluster, ns, tmp_path, monkeypatch) as (proxy, leader, other, leaders):
        if blip == "stall":
            proxy.stall()
        else:
            proxy.refuse()
            proxy.cut()
        await cluster.patch(QUEUE_CONSUMERS, ns, "email-worker", {"spec": {"replicas": 3}})
        await asyncio.sleep(2.5)  # the blip's length, not a synchronisation
        proxy.resume()
        proxy.accept()
        # longer than the renew deadline: the leader stopped acting for a while
        assert leaders.states[0] == {LEADER}
        assert frozenset() in leaders.states, leaders.states
        await eventually(lambda: leaders.one_at_a_time() and replicas(cluster, ns) == 3, 20)
        await cluster.patch(QUEUE_CONSUMERS, ns, "email-worker", {"spec": {"replicas": 4}})
        await eventually(lambda: leaders.one_at_a_time() and replicas(cluster, ns) == 4, 20)
        await other.stop()  # releases the Lease if it took it
        await eventually(lambda: leaders.one_at_a_time() and leader.leading, 10)
        renewed = holder(cluster, ns)
        assert renewed[0] == LEADER
        await eventually(lambda: holder(cluster, ns)[1] != renewed[1], 5)  # it renews
        assert holder(cluster, ns)[0] == LEADER
        leaders.one_at_a_time()
        assert in_order(reporters(cluster, ns), leaders.order), (
            reporters(cluster, ns),
            leaders.order,
        )
    assert holder(cluster, ns)[0] == ""  # released on the way out


async def test_a_follower_takes_the_lease_of_a_leader_cut_off_and_the_leader_keeps_out(
    cluster: Cluster, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """(b) The leader's network dead for longer than the Lease: it stops acting at its renew
    deadline, the follower takes the Lease once it has expired, and when the network comes
    back the old leader neither leads nor acts; its election still runs (it takes over when
    the follower stops)."""
    async with two_replicas(cluster, ns, tmp_path, monkeypatch) as (proxy, leader, other, leaders):
        loop = asyncio.get_running_loop()
        start = loop.time()
        proxy.stall()
        await eventually(lambda: not leader.leading, LEASE * 2 / 3 + 0.5)  # its renew deadline
        acted = total_reconciles(leader)  # passes in flight were cancelled, not counted
        consumer = {"namespace": ns, "queueconsumer": "email-worker"}
        desired = "luaq_operator_desired_replicas"
        # what it said of the QueueConsumer is the next leader's to say, not a stale rival's
        await eventually(
            lambda: leader.metrics.registry.get_sample_value(desired, consumer) is None
        )
        # the follower sees the Lease expire a Lease after the last renewal it saw
        await eventually(lambda: leaders.one_at_a_time() and leaders.leads(FOLLOWER), LEASE + 1.5)
        await cluster.patch(QUEUE_CONSUMERS, ns, "email-worker", {"spec": {"replicas": 5}})
        await eventually(lambda: leaders.one_at_a_time() and replicas(cluster, ns) == 5, 10)
        await asyncio.sleep(max(0.0, start + LEASE + 1 - loop.time()))  # the fault's length
        proxy.resume()
        key = (ns, "email-worker")
        await eventually(lambda: leader.bodies[key]["spec"]["replicas"] == 5, 10)  # seen, then
        assert not leader.leading
        assert total_reconciles(leader) == acted  # no pass since it lost the Lease
        assert holder(cluster, ns)[0] == FOLLOWER
        await eventually(lambda: reporters(cluster, ns) == [LEADER, FOLLOWER], 10)
        await other.stop()
        await eventually(lambda: leaders.one_at_a_time() and leader.leading, 10)
        leaders.one_at_a_time()
    assert holder(cluster, ns)[0] == ""
