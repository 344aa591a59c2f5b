"""Watches that go silent: the operator's connections to the API server, through a TCP proxy
(tests/support/tcp_proxy.py), stop carrying bytes without being closed, as when a NAT or a load
balancer forgets them. The operator replaces its watches within its watch timeouts (1 s asked
of the server here, 2 s at most on its side), and its liveness probe fails while no watch can
be re-established."""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from dataclasses import replace
from pathlib import Path

import kopf
import pytest
from conftest import eventually
from kube_emulator import kubeconfig
from kube_fixtures import TEST_SETTINGS, Cluster, apply, running
from luaq.operator.handlers import Operator
from processes import free_port
from tcp_proxy import TcpProxy

SETTINGS = replace(TEST_SETTINGS, watch_seconds=1, watch_connect_seconds=1.0)
STREAMS = 5  # QueueConsumers, and luaq's Deployments, Services, PodDisruptionBudgets, ConfigMaps


def api_address(cluster: Cluster) -> tuple[str, int]:
    server = json.loads(cluster.kubeconfig.read_text())["clusters"][0]["cluster"]["server"]
    url = urllib.parse.urlsplit(server)
    assert url.hostname is not None
    assert url.port is not None
    return url.hostname, url.port


@asynccontextmanager
async def proxied(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, *args: str
) -> AsyncIterator[tuple[TcpProxy, Operator]]:
    """The operator, all its connections through the proxy, its watches established."""
    async with TcpProxy(*api_address(cluster)) as proxy:
        path = tmp_path / "proxied-kubeconfig"
        path.write_text(kubeconfig(proxy.url))
        monkeypatch.setenv("KUBECONFIG", str(path))
        async with running(SETTINGS, "--all-namespaces", *args) as operator:
            await eventually(lambda: len(operator.watches.established) == STREAMS, 20)
            try:
                yield proxy, operator
            finally:
                proxy.resume()  # it stops on a working network


async def test_a_queueconsumer_created_after_the_watches_went_silent_gets_its_deployment(
    cluster: Cluster, ns: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with proxied(cluster, tmp_path, monkeypatch) as (proxy, operator):
        await eventually(lambda: operator.leading, 20)
        proxy.stall(new=False)  # the open connections are dead; new ones work
        await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
        await eventually(lambda: cluster.get("deployments", ns, "email-worker") is not None, 10)


def stale(operator: Operator) -> bool:
    try:
        operator.watches.ages()
    except kopf.PermanentError:
        return True
    return False


async def health(url: str) -> tuple[int, dict[str, object]]:
    def get() -> tuple[int, dict[str, object]]:
        try:
            with urllib.request.urlopen(url, timeout=5) as response:
                return int(response.status), json.loads(response.read())
        except urllib.error.HTTPError as exc:
            return exc.code, {}

    return await asyncio.to_thread(get)


async def test_liveness_fails_while_no_watch_is_re_established(
    cluster: Cluster, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    port = free_port()
    url = f"http://127.0.0.1:{port}/healthz"
    async with proxied(cluster, tmp_path, monkeypatch, f"--liveness={url}") as (proxy, operator):
        proxy.stall()  # a dead network: no watch can start again
        # three periods of the longest a watch lasts (1 s + 1 s)
        await eventually(lambda: stale(operator), 3 * 2 + 2)
        assert (await health(url))[0] == 500  # kopf's liveness endpoint: the probe raised
        proxy.resume()
        await eventually(lambda: not stale(operator), 10)
        status, probes = await health(url)
        assert status == 200
        ages = probes["watches"]
        assert isinstance(ages, dict)
        assert len(ages) == STREAMS
        assert all(age < 3 * 2 for age in ages.values())
