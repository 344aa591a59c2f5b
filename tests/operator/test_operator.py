"""The real operator (kopf, in its own thread) against the emulated API server: QueueConsumers
become a ConfigMap, a Deployment and a Service, kept as declared; their status tells how it
goes. The emulator runs no controllers: tests play the Deployment controller where needed."""

from __future__ import annotations

import copy
import gc
import json
from typing import Any

from conftest import eventually
from kube_fixtures import Cluster, apply, example, reconciles
from luaq.operator import rbac, render
from luaq.operator.handlers import Operator
from luaq.operator.kube import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    POD_DISRUPTION_BUDGETS,
    QUEUE_CONSUMERS,
    SECRETS,
    SERVICES,
)
from luaq.operator.reconcile import ConsumerState

NAME = "email-worker"


async def email_worker(cluster: Cluster, ns: str) -> None:
    """The email worker example applied, its objects created and its status reported."""
    await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
    await eventually(lambda: len(versions(cluster, ns)) == 3, 20)
    await settled(cluster, ns)


def resource(cluster: Cluster, ns: str, name: str = NAME) -> dict[str, Any]:
    found = cluster.get("queueconsumers", ns, name)
    assert found is not None
    return found


def condition(cluster: Cluster, ns: str, kind: str, name: str = NAME) -> dict[str, Any]:
    conditions = (resource(cluster, ns, name).get("status") or {}).get("conditions") or []
    return next((c for c in conditions if c["type"] == kind), {})


def deployment(cluster: Cluster, ns: str, name: str = NAME) -> dict[str, Any] | None:
    return cluster.get("deployments", ns, name)


def mounted(cluster: Cluster, ns: str, name: str = NAME) -> dict[str, Any] | None:
    """The ConfigMap the Deployment's pods mount (named by its content)."""
    found = deployment(cluster, ns, name)
    if found is None:
        return None
    volumes = found["spec"]["template"]["spec"]["volumes"]
    config = next(volume["configMap"]["name"] for volume in volumes if volume["name"] == "config")
    return cluster.get("configmaps", ns, config)


def checksum(found: dict[str, Any] | None) -> str | None:
    if found is None:
        return None
    return found["spec"]["template"]["metadata"]["annotations"][render.CHECKSUM_ANNOTATION]


def versions(cluster: Cluster, ns: str) -> dict[str, str]:
    """resourceVersion of each owned object: unchanged means nothing was written."""
    found = {
        "configmap": mounted(cluster, ns),
        "deployment": deployment(cluster, ns),
        "service": cluster.get("services", ns, f"{NAME}-metrics"),
    }
    return {key: obj["metadata"]["resourceVersion"] for key, obj in found.items() if obj}


async def settled(cluster: Cluster, ns: str, name: str = NAME) -> dict[str, Any]:
    """Wait until the operator reported on the current generation."""

    def done() -> bool:
        found = resource(cluster, ns, name)
        observed = (found.get("status") or {}).get("observedGeneration")
        return bool(observed == found["metadata"]["generation"])

    await eventually(done, 20)
    return resource(cluster, ns, name)


async def edit(cluster: Cluster, ns: str, spec: dict[str, Any], name: str = NAME) -> None:
    await cluster.patch(QUEUE_CONSUMERS, ns, name, {"spec": spec})


async def test_a_queueconsumer_becomes_its_configmap_deployment_and_service(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    owner = resource(cluster, ns)
    config_map = mounted(cluster, ns)
    found = deployment(cluster, ns)
    service = cluster.get("services", ns, f"{NAME}-metrics")
    assert config_map is not None
    assert found is not None
    assert service is not None
    for child in (config_map, found, service):
        (reference,) = child["metadata"]["ownerReferences"]
        assert reference["uid"] == owner["metadata"]["uid"]
        assert reference["controller"]
        assert child["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "luaq-operator"
    assert config_map["data"][render.SOURCE_FILE] == owner["spec"]["source"]
    assert config_map["immutable"]
    assert config_map["metadata"]["name"].startswith(f"{NAME}-luaq-")
    assert "${env:LUAQ_BROKER_URL}" in config_map["data"][render.ENTRIES_FILE]
    url = example("broker-secret.yaml")[0]["stringData"]["url"]
    assert checksum(found) == render.checksum(config_map["data"], {render.URL_ENV: url})
    assert found["spec"]["replicas"] == 2
    (container,) = found["spec"]["template"]["spec"]["containers"]
    assert container["image"] == "luaq:test"
    assert container["command"] == ["luaq", "run", "/etc/luaq/entries.yaml"]
    env = {e["name"]: e for e in container["env"]}
    assert env["LUAQ_METRICS_PORT"]["value"] == "9090"
    assert env["LUAQ_BROKER_URL"]["valueFrom"]["secretKeyRef"] == {"name": "rabbitmq", "key": "url"}
    assert service["spec"]["selector"] == found["spec"]["selector"]["matchLabels"]
    status = (await settled(cluster, ns))["status"]
    assert status["selector"] == render.selector(NAME)
    assert condition(cluster, ns, "Degraded")["status"] == "False"
    assert condition(cluster, ns, "Ready")["status"] == "False"  # no pod is ready yet
    wanted = {f"created Deployment {NAME}", f"created ConfigMap {config_map['metadata']['name']}"}
    await eventually(lambda: cluster.messages(ns, "Created") >= wanted, 20)


async def test_reconciling_again_changes_nothing(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    await eventually(lambda: reconciles(operator) >= 2, 20)
    writes = len(cluster.writes(ns))
    passes = reconciles(operator)
    # a change that is not in the spec makes the operator look again, twice
    await cluster.patch(QUEUE_CONSUMERS, ns, NAME, {"metadata": {"labels": {"team": "mail"}}})
    await eventually(lambda: reconciles(operator) > passes, 20)
    await cluster.patch(QUEUE_CONSUMERS, ns, NAME, {"metadata": {"labels": {"team": "post"}}})
    await eventually(lambda: reconciles(operator) > passes + 1, 20)
    assert (
        cluster.writes(ns)[writes:]
        == [f"PATCH /apis/luaq.dev/v1alpha1/namespaces/{ns}/queueconsumers/{NAME}"] * 2
    )


async def test_spec_changes_update_the_deployment_and_a_code_change_rolls_the_pods(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
    await eventually(lambda: deployment(cluster, ns) is not None, 20)
    first = checksum(deployment(cluster, ns))
    source = resource(cluster, ns)["spec"]["source"]
    await edit(cluster, ns, {"source": source + "\n-- v2\n"})
    await eventually(lambda: checksum(deployment(cluster, ns)) not in (first, None), 20)
    second = checksum(deployment(cluster, ns))
    config_map = mounted(cluster, ns)
    assert config_map is not None
    assert config_map["data"][render.SOURCE_FILE].endswith("-- v2\n")
    await edit(cluster, ns, {"concurrency": 9})
    await eventually(lambda: checksum(deployment(cluster, ns)) not in (second, None), 20)
    config_map = mounted(cluster, ns)
    assert config_map is not None
    assert "concurrency: 9" in config_map["data"][render.ENTRIES_FILE]
    third = checksum(deployment(cluster, ns))
    await edit(cluster, ns, {"replicas": 5})
    await eventually(lambda: (deployment(cluster, ns) or {})["spec"]["replicas"] == 5, 20)
    assert checksum(deployment(cluster, ns)) == third  # scaling rolls nothing
    owner = await settled(cluster, ns)
    assert owner["status"]["desiredReplicas"] == 5
    await eventually(lambda: f"updated Deployment {NAME}" in cluster.messages(ns, "Updated"), 20)


async def test_an_invalid_source_leaves_the_running_deployment_alone_and_says_why(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    before = versions(cluster, ns)
    await edit(cluster, ns, {"source": "function handle_email(\n  oops"})
    await settled(cluster, ns)
    degraded = condition(cluster, ns, "Degraded")
    assert degraded["status"] == "True"
    assert degraded["reason"] == "InvalidSource"
    assert "source:" in degraded["message"]
    assert "handler.lua" in degraded["message"]
    assert versions(cluster, ns) == before
    await eventually(lambda: cluster.events(ns, "InvalidSource"), 20)
    assert cluster.events(ns, "InvalidSource")[0]["type"] == "Warning"
    await edit(
        cluster, ns, {"source": example("email-worker.yaml")[0]["spec"]["source"], "method": "nope"}
    )
    await settled(cluster, ns)
    assert "nope" in condition(cluster, ns, "Degraded")["message"]
    await edit(cluster, ns, {"queue": "app:unknown", "method": "handle_email"})
    await settled(cluster, ns)
    degraded = condition(cluster, ns, "Degraded")
    assert degraded["reason"] == "InvalidSpec"
    assert "app:unknown" in degraded["message"]
    assert versions(cluster, ns) == before
    await edit(cluster, ns, {"queue": "app:emails"})
    await settled(cluster, ns)
    assert condition(cluster, ns, "Degraded")["status"] == "False"


async def test_a_missing_broker_secret_creates_nothing_until_it_exists(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await apply(cluster, ns, "email-worker.yaml")
    await settled(cluster, ns)
    degraded = condition(cluster, ns, "Degraded")
    assert degraded["reason"] == "BrokerSecretMissing"
    assert "rabbitmq" in degraded["message"]
    assert versions(cluster, ns) == {}
    await apply(cluster, ns, "broker-secret.yaml")  # the operator is not told: the resync finds it
    await edit(cluster, ns, {"replicas": 1})
    await eventually(lambda: deployment(cluster, ns) is not None, 20)


async def test_a_rotated_broker_secret_rolls_the_pods_at_the_next_pass(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """The URL reaches the pods as an env var, read when they start: a new password must roll
    them. Secrets are not watched (that would take reading every Secret of the namespaces), so
    the change is found by the next pass: the resync, or here an edit."""
    await email_worker(cluster, ns)
    first = checksum(deployment(cluster, ns))
    rotated = "amqp://luaq:rotated-pw@rabbitmq.default.svc:5672/"
    await cluster.patch(SECRETS, ns, "rabbitmq", {"stringData": {"url": rotated}})
    await edit(cluster, ns, {"replicas": 3})
    await eventually(lambda: (deployment(cluster, ns) or {})["spec"]["replicas"] == 3, 20)
    assert checksum(deployment(cluster, ns)) != first
    for written in (deployment(cluster, ns), mounted(cluster, ns)):
        assert "rotated-pw" not in json.dumps(written)
    second = checksum(deployment(cluster, ns))
    await edit(cluster, ns, {"replicas": 2})
    await eventually(lambda: (deployment(cluster, ns) or {})["spec"]["replicas"] == 2, 20)
    assert checksum(deployment(cluster, ns)) == second, "the same Secret rolls nothing"


async def test_a_source_from_a_configmap_follows_its_edits(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await apply(cluster, ns, "broker-secret.yaml")
    docs = example("receipt-worker.yaml")
    source, qc = docs
    qc = copy.deepcopy(qc)
    qc["spec"].pop("autoscaling")  # no broker here: fixed replicas
    await cluster.create(QUEUE_CONSUMERS, ns, qc)
    await settled(cluster, ns, "receipt-worker")
    assert condition(cluster, ns, "Degraded", "receipt-worker")["reason"] == "SourceMissing"
    await cluster.create(CONFIG_MAPS, ns, source)
    await eventually(lambda: deployment(cluster, ns, "receipt-worker") is not None, 20)
    first = checksum(deployment(cluster, ns, "receipt-worker"))
    text = source["data"]["receipts.lua"] + "\n-- v2\n"
    await cluster.patch(CONFIG_MAPS, ns, "receipts-lua", {"data": {"receipts.lua": text}})
    await eventually(lambda: checksum(deployment(cluster, ns, "receipt-worker")) != first, 20)


async def test_deployment_status_flows_into_the_queueconsumer_status(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await apply(cluster, ns, "broker-secret.yaml", "email-worker.yaml")
    await eventually(lambda: deployment(cluster, ns) is not None, 20)
    found = deployment(cluster, ns)
    assert found is not None
    generation = found["metadata"]["generation"]
    rolled = {"observedGeneration": generation, "replicas": 2, "updatedReplicas": 2}
    await cluster.patch(DEPLOYMENTS, ns, NAME, {"status": {**rolled, "readyReplicas": 1}}, "status")
    await eventually(
        lambda: (resource(cluster, ns).get("status") or {}).get("readyReplicas") == 1, 20
    )
    assert condition(cluster, ns, "Ready")["status"] == "False"
    assert condition(cluster, ns, "Progressing")["status"] == "False"
    await cluster.patch(DEPLOYMENTS, ns, NAME, {"status": {**rolled, "readyReplicas": 2}}, "status")
    await eventually(lambda: condition(cluster, ns, "Ready").get("status") == "True", 20)
    status = resource(cluster, ns)["status"]
    assert (status["replicas"], status["readyReplicas"]) == (2, 2)
    assert condition(cluster, ns, "Ready")["reason"] == "ReplicasReady"


async def test_objects_edited_or_deleted_by_hand_are_restored(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    container = {"name": "worker", "image": "evil:latest"}
    await cluster.patch(
        DEPLOYMENTS,
        ns,
        NAME,
        {"spec": {"replicas": 9, "template": {"spec": {"containers": [container]}}}},
    )
    await eventually(lambda: (deployment(cluster, ns) or {})["spec"]["replicas"] == 2, 20)
    found = deployment(cluster, ns)
    assert found is not None
    assert found["spec"]["template"]["spec"]["containers"][0]["image"] == "luaq:test"
    config_map = mounted(cluster, ns)
    assert config_map is not None
    await cluster.delete(CONFIG_MAPS, ns, config_map["metadata"]["name"])
    await eventually(lambda: mounted(cluster, ns) is not None, 20)
    await cluster.delete(SERVICES, ns, f"{NAME}-metrics")
    await eventually(lambda: cluster.get("services", ns, f"{NAME}-metrics") is not None, 20)
    await eventually(lambda: cluster.events(ns, "Restored"), 20)


async def rolled_out(cluster: Cluster, ns: str, name: str = NAME) -> None:
    """Play the Deployment controller: every replica runs the current template."""
    found = deployment(cluster, ns, name)
    assert found is not None
    replicas = found["spec"]["replicas"]
    status = {"observedGeneration": found["metadata"]["generation"], "replicas": replicas,
              "updatedReplicas": replicas, "readyReplicas": replicas}  # fmt: skip
    await cluster.patch(DEPLOYMENTS, ns, name, {"status": status}, "status")


async def test_deleting_a_queueconsumer_removes_its_objects(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    await cluster.delete(QUEUE_CONSUMERS, ns, NAME)
    await eventually(lambda: cluster.get("queueconsumers", ns, NAME) is None, 20)
    await eventually(lambda: versions(cluster, ns) == {}, 20)


async def test_the_operator_forgets_the_configmaps_it_collected(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """It remembered a fingerprint of every ConfigMap it ever wrote for a QueueConsumer: a
    tenant editing all day grew the operator's memory without bound."""
    await email_worker(cluster, ns)
    written = []
    for concurrency in (11, 12, 13):  # (none is the example's own)
        written.append(str((mounted(cluster, ns) or {})["metadata"]["name"]))
        await edit(cluster, ns, {"concurrency": concurrency})
        await eventually(lambda: f"concurrency: {concurrency}" in str(mounted(cluster, ns)))  # noqa: B023
        await rolled_out(cluster, ns)
    for old in written:
        await eventually(lambda: cluster.get("configmaps", ns, old) is None, 20)  # noqa: B023
    current = (mounted(cluster, ns) or {})["metadata"]["name"]

    def remembered() -> list[str]:
        (state,) = (  # (its ConfigMap's name is its content's: no other test's)
            o
            for o in gc.get_objects()
            if isinstance(o, ConsumerState) and f"ConfigMap {current}" in o.stored
        )
        return [what for what in state.stored if what.startswith("ConfigMap ")]

    await eventually(lambda: remembered() == [f"ConfigMap {current}"], 20)


async def test_the_operator_uses_exactly_the_permissions_it_declares(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    first = mounted(cluster, ns)
    assert first is not None
    await edit(cluster, ns, {"concurrency": 3})  # a new ConfigMap, the Deployment replaced
    await eventually(lambda: "concurrency: 3" in str(mounted(cluster, ns)))
    await rolled_out(cluster, ns)  # the old ConfigMap goes
    await eventually(lambda: cluster.get("configmaps", ns, first["metadata"]["name"]) is None, 20)
    selector = {render.OWNER_LABEL: "someone-else"}
    await cluster.patch(SERVICES, ns, f"{NAME}-metrics", {"spec": {"selector": selector}})
    await eventually(lambda: ("", "services", "update") in cluster.permissions(), 20)
    await cluster.delete(SERVICES, ns, f"{NAME}-metrics")
    await eventually(lambda: cluster.get("services", ns, f"{NAME}-metrics") is not None, 20)
    await eventually(lambda: ("coordination.k8s.io", "leases", "update") in cluster.permissions())
    budget = {"spec": {"maxUnavailable": 2}}  # replaced, then deleted once it keeps one pod
    await cluster.patch(POD_DISRUPTION_BUDGETS, ns, NAME, budget)
    await eventually(lambda: ("policy", "poddisruptionbudgets", "update") in cluster.permissions())
    await edit(cluster, ns, {"replicas": 1})
    await eventually(lambda: cluster.get("poddisruptionbudgets", ns, NAME) is None, 20)
    await cluster.delete(QUEUE_CONSUMERS, ns, NAME)
    await eventually(lambda: cluster.get("queueconsumers", ns, NAME) is None, 20)
    declared = {
        (group, resource, verb)
        for rule in [*rbac.RULES, *rbac.LEASE_RULES]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
    used = cluster.permissions()
    assert used <= declared, used - declared
    # not seen here: the finalizers permission is checked by an admission plugin
    assert declared - used == {("luaq.dev", "queueconsumers/finalizers", "update")}
