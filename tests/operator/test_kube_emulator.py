"""The emulator subclass behaves as the API server does where the operator tests rely on it."""

from __future__ import annotations

import asyncio
import base64
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
from kube_emulator import matches_labels
from kube_fixtures import EXAMPLES, Cluster, kubectl
from kubernetes.client.exceptions import ApiException
from luaq.operator.kube import CONFIG_MAPS, DEPLOYMENTS, QUEUE_CONSUMERS

DEPLOYMENT = {
    "metadata": {"name": "web", "labels": {"app": "web"}},
    "spec": {
        "replicas": 1,
        "selector": {"matchLabels": {"app": "web"}},
        "template": {
            "spec": {"containers": [{"name": "a", "image": "a:1"}, {"name": "b", "image": "b:1"}]}
        },
    },
}


async def call(
    cluster: Cluster,
    method: str,
    path: str,
    body: Any = None,
    content_type: str = "application/json",
) -> dict[str, Any]:
    result: dict[str, Any] = await cluster.call(
        cluster.kube.request, method, path, body, content_type
    )
    return result


async def test_created_objects_get_identity_versions_and_generated_names(cluster: Cluster) -> None:
    first = await cluster.create(
        CONFIG_MAPS, "ns", {"metadata": {"generateName": "cm-"}, "data": {}}
    )
    second = await cluster.create(
        CONFIG_MAPS, "ns", {"metadata": {"generateName": "cm-"}, "data": {}}
    )
    assert first["metadata"]["name"].startswith("cm-")
    assert first["metadata"]["name"] != second["metadata"]["name"]
    assert first["metadata"]["uid"] != second["metadata"]["uid"]
    assert int(second["metadata"]["resourceVersion"]) > int(first["metadata"]["resourceVersion"])
    assert first["metadata"]["creationTimestamp"].endswith("Z")
    assert first["kind"] == "ConfigMap"
    with pytest.raises(ApiException) as conflict:
        await cluster.create(CONFIG_MAPS, "ns", {"metadata": {"name": first["metadata"]["name"]}})
    assert conflict.value.status == 409
    listed = await call(cluster, "GET", CONFIG_MAPS.path("ns"))
    assert listed["kind"] == "ConfigMapList"
    assert listed["metadata"]["resourceVersion"] == second["metadata"]["resourceVersion"]


async def test_patches_merge_as_the_api_server_merges(cluster: Cluster) -> None:
    await cluster.create(DEPLOYMENTS, "ns", DEPLOYMENT)
    path = DEPLOYMENTS.path("ns", "web")
    strategic = {"spec": {"template": {"spec": {"containers": [{"name": "b", "image": "b:2"}]}}}}
    patched = await call(
        cluster, "PATCH", path, strategic, "application/strategic-merge-patch+json"
    )
    assert [c["image"] for c in patched["spec"]["template"]["spec"]["containers"]] == ["a:1", "b:2"]
    patched = await call(cluster, "PATCH", path, strategic, "application/merge-patch+json")
    assert [c["image"] for c in patched["spec"]["template"]["spec"]["containers"]] == ["b:2"]
    assert patched["metadata"]["generation"] == 3
    operations = [
        {"op": "test", "path": "/spec/replicas", "value": 1},
        {"op": "replace", "path": "/spec/replicas", "value": 2},
    ]
    patched = await call(cluster, "PATCH", path, operations, "application/json-patch+json")
    assert patched["spec"]["replicas"] == 2
    with pytest.raises(ApiException) as failed:
        await call(cluster, "PATCH", path, operations, "application/json-patch+json")
    assert failed.value.status == 409
    same = await call(
        cluster, "PATCH", path, {"spec": {"replicas": 2}}, "application/merge-patch+json"
    )
    assert same["metadata"]["resourceVersion"] == patched["metadata"]["resourceVersion"]


async def test_put_checks_the_resource_version(cluster: Cluster) -> None:
    created = await cluster.create(
        CONFIG_MAPS, "ns", {"metadata": {"name": "c"}, "data": {"a": "1"}}
    )
    replaced = await call(
        cluster, "PUT", CONFIG_MAPS.path("ns", "c"), {**created, "data": {"b": "2"}}
    )
    assert replaced["data"] == {"b": "2"}
    with pytest.raises(ApiException) as stale:
        await call(cluster, "PUT", CONFIG_MAPS.path("ns", "c"), created)
    assert stale.value.status == 409


async def test_status_and_scale_subresources(cluster: Cluster) -> None:
    await cluster.create(DEPLOYMENTS, "ns", {**DEPLOYMENT, "status": {"replicas": 7}})
    found = cluster.get("deployments", "ns", "web")
    assert found is not None
    assert "status" not in found  # ignored on create
    await cluster.patch(
        DEPLOYMENTS, "ns", "web", {"spec": {"replicas": 3}, "status": {"replicas": 9}}
    )
    status = await cluster.patch(
        DEPLOYMENTS, "ns", "web", {"spec": {"replicas": 5}, "status": {"replicas": 3}}, "status"
    )
    assert status["spec"]["replicas"] == 3  # the status subresource changes only the status
    assert status["status"] == {"replicas": 3}
    assert status["metadata"]["generation"] == 2
    scale = await call(cluster, "GET", DEPLOYMENTS.path("ns", "web", "scale"))
    assert scale["spec"] == {"replicas": 3}
    assert scale["status"] == {"replicas": 3, "selector": "app=web"}
    await call(
        cluster,
        "PATCH",
        DEPLOYMENTS.path("ns", "web", "scale"),
        {"spec": {"replicas": 6}},
        "application/merge-patch+json",
    )
    found = cluster.get("deployments", "ns", "web")
    assert found is not None
    assert found["spec"]["replicas"] == 6


async def test_finalizers_hold_deletion_and_owners_take_their_objects_along(
    cluster: Cluster,
) -> None:
    owner = await cluster.create(
        QUEUE_CONSUMERS, "ns", {"metadata": {"name": "q", "finalizers": ["x/y"]}, "spec": {}}
    )
    reference = {
        "apiVersion": "luaq.dev/v1alpha1",
        "kind": "QueueConsumer",
        "name": "q",
        "uid": owner["metadata"]["uid"],
    }
    await cluster.create(
        CONFIG_MAPS, "ns", {"metadata": {"name": "child", "ownerReferences": [reference]}}
    )
    await cluster.delete(QUEUE_CONSUMERS, "ns", "q")
    held = cluster.get("queueconsumers", "ns", "q")
    assert held is not None
    assert held["metadata"]["deletionTimestamp"]
    assert cluster.get("configmaps", "ns", "child") is not None
    await cluster.patch(QUEUE_CONSUMERS, "ns", "q", {"metadata": {"finalizers": None}})
    assert cluster.get("queueconsumers", "ns", "q") is None
    assert cluster.get("configmaps", "ns", "child") is None


async def watch(cluster: Cluster, query: str, count: int) -> list[dict[str, Any]]:
    """The first `count` events of a watch on ConfigMaps in namespace ns."""
    events: list[dict[str, Any]] = []
    async with cluster.emulator.get(f"{CONFIG_MAPS.path('ns')}?watch=true&{query}") as response:
        async for line in response.content:
            if line.strip():
                events.append(json.loads(line))
                if len(events) == count:
                    break
    return events


async def test_watches_start_at_their_resource_version_and_miss_nothing(cluster: Cluster) -> None:
    old = await cluster.create(
        CONFIG_MAPS, "ns", {"metadata": {"name": "old", "labels": {"a": "1"}}}
    )
    since = old["metadata"]["resourceVersion"]
    watching = asyncio.create_task(
        watch(cluster, f"resourceVersion={since}&labelSelector=a%3D1", 2)
    )
    await cluster.create(CONFIG_MAPS, "ns", {"metadata": {"name": "other", "labels": {"a": "2"}}})
    await cluster.create(CONFIG_MAPS, "ns", {"metadata": {"name": "new", "labels": {"a": "1"}}})
    await cluster.patch(CONFIG_MAPS, "ns", "old", {"data": {"k": "v"}})
    events = await asyncio.wait_for(watching, 10)
    assert [(e["type"], e["object"]["metadata"]["name"]) for e in events] == [
        ("ADDED", "new"),
        ("MODIFIED", "old"),
    ]
    initial = await asyncio.wait_for(watch(cluster, "labelSelector=a%3D1", 2), 10)
    assert {e["object"]["metadata"]["name"] for e in initial} == {"old", "new"}


@pytest.mark.parametrize(
    ("selector", "expected"),
    [("a=1", True), ("a==1,b", True), ("a!=1", False), ("!c", True), ("c", False),
     ("a in (1,2),b notin (x)", True), ("b in (x, y)", False), ("", True)],
)  # fmt: skip
def test_label_selectors(selector: str, expected: bool) -> None:
    assert matches_labels({"a": "1", "b": "2"}, selector) is expected


async def test_tables_carry_the_printer_columns(cluster: Cluster) -> None:
    await cluster.create(
        QUEUE_CONSUMERS, "ns", {"metadata": {"name": "q"}, "spec": {"queue": "app:x"}}
    )
    accept = {"Accept": "application/json;as=Table;v=v1;g=meta.k8s.io,application/json"}
    async with cluster.emulator.get(QUEUE_CONSUMERS.path("ns"), headers=accept) as response:
        table = await response.json()
    assert [c["name"] for c in table["columnDefinitions"]] == [
        "Name",
        "Queue",
        "Replicas",
        "Ready",
        "Backlog",
        "Age",
    ]
    assert table["rows"][0]["cells"][:2] == ["q", "app:x"]


async def test_kubectl_create_in_protobuf_and_apply_with_server_side_validation(
    cluster: Cluster, kubectl_binary: Path
) -> None:
    """kubectl's `create` subcommands send protobuf; `apply` reads the OpenAPI v3 documents to
    leave field validation to the server. And objects go only into namespaces that exist."""
    cluster.emulator.namespace_lifecycle = True
    refused = await asyncio.to_thread(
        subprocess.run,
        [str(kubectl_binary), "--kubeconfig", str(cluster.kubeconfig), "create", "secret",
         "generic", "s", "--namespace", "shop", "--from-literal=url=amqp://x"],
        capture_output=True, text=True, timeout=60,
    )  # fmt: skip
    assert refused.returncode == 1
    assert 'namespaces "shop" not found' in refused.stderr
    await kubectl(kubectl_binary, cluster, "create", "namespace", "shop")
    await kubectl(kubectl_binary, cluster, "create", "secret", "generic", "s", "--namespace",
                  "shop", "--from-literal=url=amqp://x", "--from-literal=empty=")  # fmt: skip
    await kubectl(kubectl_binary, cluster, "apply", "--namespace", "shop", "-f", str(EXAMPLES))
    secret = cluster.get("secrets", "shop", "s")
    assert secret is not None
    assert secret["data"] == {"url": base64.b64encode(b"amqp://x").decode(), "empty": ""}
    namespace = cluster.get("namespaces", None, "shop")
    assert namespace is not None
    assert namespace["metadata"]["name"] == "shop"
    assert cluster.get("queueconsumers", "shop", "email-worker") is not None
