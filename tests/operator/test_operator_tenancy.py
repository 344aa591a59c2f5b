"""A cluster shared by teams: a QueueConsumer's author is a tenant of one namespace. Through the
real operator: nothing it names reaches another namespace or the operator's own secrets, the
admin's policy bounds what its pods may be, what the API server refuses is told in its status
at once, and nothing churns or leaves hand edits in place."""

from __future__ import annotations

import asyncio
import base64
import os
import signal
import subprocess
from dataclasses import replace
from pathlib import Path
from typing import Any

import pytest
from conftest import eventually
from kube_fixtures import TEST_SETTINGS, Cluster, apply, example, namespace, reconciles, running
from luaq.operator.handlers import Operator
from luaq.operator.kube import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    QUEUE_CONSUMERS,
    SECRETS,
    SERVICES,
    ApiResource,
)
from luaq.operator.reconcile import MESSAGE_MOST
from luaq.operator.settings import Policy
from processes import answers, free_port
from test_operator import (
    NAME,
    condition,
    deployment,
    edit,
    email_worker,
    mounted,
    resource,
    rolled_out,
    settled,
    versions,
)
from test_operator_cli import OPERATOR
from test_operator_crd import changed

EMAIL = next(doc for doc in example("email-worker.yaml") if doc["kind"] == "QueueConsumer")


def consumer(name: str, **spec: Any) -> dict[str, Any]:
    """The email worker under another name, with `spec` changed (None removes a field)."""
    return {**changed(**spec), "metadata": {"name": name}}


def operator_requests_in(cluster: Cluster, ns: str) -> set[tuple[str | None, str, str, str]]:
    return {used for used in cluster.scoped_permissions() if used[0] == ns}


async def degraded(cluster: Cluster, ns: str, name: str) -> dict[str, Any]:
    await eventually(lambda: condition(cluster, ns, "Degraded", name).get("status") == "True", 20)
    return condition(cluster, ns, "Degraded", name)


async def test_nothing_a_queueconsumer_names_reaches_another_namespace(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """Names are Kubernetes names, read in the QueueConsumer's own namespace; a broker field
    cannot pull the pod's Secrets into an error message."""
    victim = namespace()
    await apply(cluster, victim, "broker-secret.yaml")
    await cluster.create(
        CONFIG_MAPS, victim, {"metadata": {"name": "lua"}, "data": {"x.lua": "-- victim's code"}}
    )
    await apply(cluster, ns, "broker-secret.yaml")
    url = {"name": "rabbitmq", "key": "url"}
    closed = f"amqp://guest:guest@127.0.0.1:{free_port()}/"
    await cluster.create(
        SECRETS, ns, {"metadata": {"name": "closed"}, "stringData": {"url": closed}}
    )
    hostile = {
        "secret-path": consumer(
            "secret-path",
            broker={"urlSecretRef": {"name": f"../../{victim}/secrets/rabbitmq", "key": "url"}},
        ),
        "source-path": consumer(
            "source-path",
            source=None,
            sourceRef={"configMapName": f"../../{victim}/configmaps/lua", "key": "x.lua"},
        ),
        "env-in-vhost": consumer(
            "env-in-vhost",
            broker={"urlSecretRef": {**url, "name": "closed"}, "vhost": "${env:LUAQ_BROKER_URL}"},
            autoscaling={"maxReplicas": 2},
        ),
        # the pods' flags (past the admin's policy, and another broker than the one checked)
        "env-over-flags": consumer(
            "env-over-flags",
            env=[
                {"name": "LUAQ_LOG_LEVEL", "value": "debug"},
                {"name": "LUAQ_PROCESSES", "value": "64"},
                {"name": "LUAQ_BROKER_URL", "value": closed},
                {"name": "PYTHONPATH", "value": "/etc/tenant"},
            ],
        ),
    }
    for body in hostile.values():
        await cluster.create(QUEUE_CONSUMERS, ns, body)
    for name in hostile:
        found = await degraded(cluster, ns, name)
        assert found["reason"] == "InvalidSpec", found
        assert deployment(cluster, ns, name) is None
    assert "should match pattern" in condition(cluster, ns, "Degraded", "secret-path")["message"]
    assert "not expanded" in condition(cluster, ns, "Degraded", "env-in-vhost")["message"]
    refused = condition(cluster, ns, "Degraded", "env-over-flags")["message"]
    for index in (1, 2, 3):
        assert f"spec.env[{index}].name: LUAQ_* (but LUAQ_LOG_LEVEL" in refused, refused
    assert "spec.env[0]" not in refused
    assert operator_requests_in(cluster, victim) == set()
    assert cluster.events(ns, "BacklogUnavailable") == []  # it never connected
    told = str(cluster.events(ns)) + str(cluster.emulator.read_all("queueconsumers", ns))
    assert "victim's code" not in told
    assert "change-me" not in told  # the password in the Secrets
    with pytest.raises(ValueError, match="not a Kubernetes name"):
        SECRETS.path(ns, "../../x")  # the last line: a path is never built from a non-name


async def test_the_admin_policy_bounds_what_a_queueconsumer_may_ask_for(
    cluster: Cluster, ns: str
) -> None:
    policy = Policy(
        images=("registry.example/luaq:*",),
        service_accounts=("default", "mailer"),
        secret_env=False,
        max_replicas=3,
        max_memory="1Gi",
    )
    settings = replace(TEST_SETTINGS, image="registry.example/luaq:1", policy=policy)
    async with running(settings):
        await apply(cluster, ns, "broker-secret.yaml")
        token = {"valueFrom": {"secretKeyRef": {"name": "rabbitmq", "key": "url"}}}
        greedy = consumer(
            NAME,
            image="evil.example/miner:1",
            serviceAccountName="cluster-admin",
            env=[{"name": "TOKEN", **token}],
            replicas=5,
            resources={"limits": {"memory": "2Gi"}},
        )
        await cluster.create(QUEUE_CONSUMERS, ns, greedy)
        found = await degraded(cluster, ns, NAME)
        assert found["reason"] == "NotAllowed"
        for problem in (
            "spec.image: evil.example/miner:1 is not among the allowed images",
            "spec.serviceAccountName: cluster-admin is not an allowed service account",
            "spec.env[0].valueFrom: Secrets are not allowed in env",
            "spec.replicas: 5 is over the allowed 3",
            "spec.resources.limits.memory: 2Gi is over the allowed 1Gi",
        ):
            assert problem in found["message"]
        assert versions(cluster, ns) == {}
        assert condition(cluster, ns, "Progressing")["reason"] == "NotCreated"
        await edit(
            cluster,
            ns,
            {"image": None, "serviceAccountName": "mailer", "env": None, "replicas": 2,
             "resources": {"limits": {"memory": "512Mi"}}},
        )  # fmt: skip
        await eventually(lambda: deployment(cluster, ns) is not None, 20)
        found_deployment = deployment(cluster, ns)
        assert found_deployment is not None
        pod = found_deployment["spec"]["template"]["spec"]
        assert pod["containers"][0]["image"] == "registry.example/luaq:1"
        assert pod["serviceAccountName"] == "mailer"


async def test_what_the_api_server_refuses_is_degraded_at_once_and_runs_on_as_before(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """A source ConfigMap that fits in its 1 MiB, but not with the entries file beside it: the
    new ConfigMap is refused, the running Deployment keeps the one it mounts, and the status
    says why, for this generation."""
    await apply(cluster, ns, "broker-secret.yaml")
    source = {"metadata": {"name": "lua"}, "data": {"w.lua": EMAIL["spec"]["source"]}}
    await cluster.create(CONFIG_MAPS, ns, source)
    ref = {"configMapName": "lua", "key": "w.lua"}
    await cluster.create(QUEUE_CONSUMERS, ns, consumer(NAME, source=None, sourceRef=ref))
    await eventually(lambda: len(versions(cluster, ns)) == 3, 20)
    before = versions(cluster, ns)
    filler = "-- " + "x" * (2**20 - len(EMAIL["spec"]["source"]) - 100) + "\n"
    grown = {"data": {"w.lua": filler + EMAIL["spec"]["source"]}}
    await cluster.patch(CONFIG_MAPS, ns, "lua", grown)
    await edit(cluster, ns, {"replicas": 3})  # sourceRef ConfigMaps are not all watched
    generation = resource(cluster, ns)["metadata"]["generation"]
    await eventually(
        lambda: condition(cluster, ns, "Degraded").get("observedGeneration") == generation, 20
    )
    found = condition(cluster, ns, "Degraded")
    assert found["reason"] == "ApplyFailed"
    assert "must have at most 1048576 bytes" in found["message"]
    assert resource(cluster, ns)["status"]["observedGeneration"] == generation
    assert versions(cluster, ns) == before


async def test_a_condition_quotes_no_more_than_people_read(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """Every bad podLabels key was quoted: 20 keys of 2,000 characters made a message of 40 KB,
    and 60 of 12,000 one over the 32,768 the CRD allows, which an API server refuses: the
    status would never have said why."""
    keys = {f"Bad_{index}_" + "x" * 2000: "v" for index in range(20)}
    await cluster.create(QUEUE_CONSUMERS, ns, consumer(NAME, podLabels=keys))
    found = await degraded(cluster, ns, NAME)
    assert found["reason"] == "InvalidSpec"
    assert len(found["message"]) <= MESSAGE_MOST
    assert found["message"].startswith("spec.podLabels: ")
    assert found["message"].endswith(" more characters)")


async def test_a_secret_that_is_not_text_is_said_so(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    binary = {
        "metadata": {"name": "rabbitmq"},
        "data": {"url": base64.b64encode(b"\xff\xfe").decode()},
    }
    await cluster.create(SECRETS, ns, binary)
    await cluster.create(QUEUE_CONSUMERS, ns, consumer(NAME))
    found = await degraded(cluster, ns, NAME)
    assert found["reason"] == "BrokerSecretInvalid"
    assert found["message"] == "Secret rabbitmq key url is not UTF-8 text"


async def test_tls_material_from_a_secret_is_never_a_path_of_the_operators(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """A TLS Secret value that is no PEM was taken as a path: the operator loaded a file of
    its own (its service account's token, say) as the CA or client key of a tenant's broker,
    as it checked the entries and read the backlog."""
    await apply(cluster, ns, "broker-secret.yaml")
    token = "file:///var/run/secrets/kubernetes.io/serviceaccount/token"
    await cluster.create(SECRETS, ns, {"metadata": {"name": "tls"}, "stringData": {"ca": token}})
    tls = {"enabled": True, "caSecretRef": {"name": "tls", "key": "ca"}}
    await cluster.create(
        QUEUE_CONSUMERS, ns, consumer(NAME, broker={**EMAIL["spec"]["broker"], "tls": tls})
    )
    found = await degraded(cluster, ns, NAME)
    assert found["reason"] == "BrokerSecretInvalid"
    assert found["message"].startswith("Secret tls key ca is not PEM")
    assert "serviceaccount" not in found["message"]
    assert deployment(cluster, ns) is None


async def test_conditions_follow_the_deployment_a_stuck_rollout_is_degraded(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    found = deployment(cluster, ns)
    assert found is not None
    stuck = {
        "observedGeneration": found["metadata"]["generation"],
        "replicas": 2,
        "updatedReplicas": 1,
        "conditions": [
            {
                "type": "Progressing",
                "status": "False",
                "reason": "ProgressDeadlineExceeded",
                "message": 'ReplicaSet "email-worker-5d" has timed out progressing.',
            },
        ],
    }
    await cluster.patch(DEPLOYMENTS, ns, NAME, {"status": stuck}, "status")
    failed = await degraded(cluster, ns, NAME)
    assert failed["reason"] == "RolloutFailed"
    assert "timed out progressing" in failed["message"]
    progressing = condition(cluster, ns, "Progressing")
    assert (progressing["status"], progressing["reason"]) == ("False", "RolloutFailed")
    await rolled_out(cluster, ns)
    await eventually(lambda: condition(cluster, ns, "Degraded")["status"] == "False", 20)
    assert condition(cluster, ns, "Progressing")["reason"] == "UpToDate"


async def passes(cluster: Cluster, operator: Operator, ns: str, count: int) -> None:
    """Make the operator look again `count` times (a label edit wakes it, changes nothing)."""
    for n in range(count):
        before = reconciles(operator)
        await cluster.patch(QUEUE_CONSUMERS, ns, NAME, {"metadata": {"labels": {"pass": str(n)}}})
        await eventually(lambda before=before: reconciles(operator) > before, 20)


async def test_what_the_api_server_stores_differently_is_no_drift(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """A real API server drops an empty env value and writes quantities canonically (0.5 as
    500m, 1.5Gi as 1536Mi, 1000m as 1): none of it is a change to restore."""
    await apply(cluster, ns, "broker-secret.yaml")
    sizes = {"requests": {"cpu": "0.5", "memory": "1.5Gi"}, "limits": {"cpu": "1000m"}}
    await cluster.create(
        QUEUE_CONSUMERS, ns, consumer(NAME, env=[{"name": "EMPTY", "value": ""}], resources=sizes)
    )
    await eventually(lambda: len(versions(cluster, ns)) == 3, 20)
    await settled(cluster, ns)
    stored = deployment(cluster, ns)
    assert stored is not None
    container = stored["spec"]["template"]["spec"]["containers"][0]
    assert container["resources"]["requests"] == {"cpu": "500m", "memory": "1536Mi"}
    assert {"name": "EMPTY"} in container["env"]
    before = versions(cluster, ns)
    await passes(cluster, operator, ns, 3)
    assert versions(cluster, ns) == before
    assert cluster.events(ns, "Restored") == []


async def test_fields_added_by_hand_go_and_each_restore_is_told_once(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    await email_worker(cluster, ns)
    added = {"serviceAccountName": "intruder", "nodeSelector": {"pool": "theirs"}}
    await cluster.patch(DEPLOYMENTS, ns, NAME, {"spec": {"template": {"spec": added}}})
    selector = {"extra": "key"}
    await cluster.patch(SERVICES, ns, f"{NAME}-metrics", {"spec": {"selector": selector}})

    def restored() -> bool:
        pod = (deployment(cluster, ns) or {})["spec"]["template"]["spec"]
        service = cluster.get("services", ns, f"{NAME}-metrics") or {}
        return not (set(added) & set(pod)) and "extra" not in service["spec"]["selector"]

    await eventually(restored, 20)
    await eventually(lambda: len(cluster.events(ns, "Restored")) == 2, 20)
    await passes(cluster, operator, ns, 2)
    assert len(cluster.events(ns, "Restored")) == 2


async def test_a_new_configuration_reaches_pods_only_through_the_rollout(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """The running pods' ConfigMap never changes under them: a new one is made, the Deployment
    switches to it, and the old one goes when no pod mounts it any more."""
    await email_worker(cluster, ns)
    old = mounted(cluster, ns)
    assert old is not None
    await edit(cluster, ns, {"source": EMAIL["spec"]["source"] + "\n-- v2\n"})
    await eventually(
        lambda: (mounted(cluster, ns) or old)["metadata"]["name"] != old["metadata"]["name"], 20
    )
    kept = cluster.get("configmaps", ns, old["metadata"]["name"])
    assert kept is not None
    assert kept["data"] == old["data"]  # what the running pods read, unchanged
    await passes(cluster, operator, ns, 1)
    assert cluster.get("configmaps", ns, old["metadata"]["name"]) is not None  # still rolling
    await rolled_out(cluster, ns)
    await eventually(lambda: cluster.get("configmaps", ns, old["metadata"]["name"]) is None, 20)


async def test_an_unreachable_broker_is_one_warning_that_tells_no_port_scan(
    cluster: Cluster, operator: Operator, ns: str
) -> None:
    """Autoscaled consumers whose broker is a closed port and an open port that is no broker:
    the same words for both (only host and port differ), one Event each, however many reads."""
    emulator_port = cluster.kube.api.configuration.host.rsplit(":", 1)[1]
    brokers = {"closed": str(free_port()), "open": emulator_port.strip("/")}
    for name, port in brokers.items():
        url = f"amqp://guest:guest@127.0.0.1:{port}/"
        await cluster.create(SECRETS, ns, {"metadata": {"name": name}, "stringData": {"url": url}})
        await cluster.create(
            QUEUE_CONSUMERS,
            ns,
            consumer(
                name,
                broker={"urlSecretRef": {"name": name, "key": "url"}, "connectionTimeout": "1s"},
                autoscaling={"maxReplicas": 2},
            ),
        )
    await eventually(lambda: len(cluster.events(ns, "BacklogUnavailable")) == 2, 30)
    before = reconciles(operator, "error")  # a pass that cannot read the backlog
    await eventually(lambda: reconciles(operator, "error") >= before + 6, 30)  # every 0.3 s
    events = cluster.events(ns, "BacklogUnavailable")
    assert len(events) == 2
    said = {event["message"].replace(brokers["closed"], "PORT").replace(brokers["open"], "PORT")
            for event in events}  # fmt: skip
    assert said == {"cannot read the backlog of app:emails from the broker at 127.0.0.1:PORT"}


async def test_a_burst_of_hungry_lua_sources_costs_the_operator_nothing(
    cluster: Cluster, ns: str, tmp_path: Path
) -> None:
    """Each check loads a tenant's module: here 8 at once, each taking about 60 MiB at its top
    level (a 30 MiB string, built and copied). They run in child processes, 2 at a time: the
    operator's own memory stays put."""
    hungry = "local kept = string.rep(string.rep('x', 2^20), 30)\n" + EMAIL["spec"]["source"]
    health, log_path = free_port(), tmp_path / "operator.log"
    env = {**os.environ, "KUBECONFIG": str(cluster.kubeconfig), "POD_NAME": "luaq-operator-0"}
    with log_path.open("wb") as log:
        process = await asyncio.create_subprocess_exec(
            OPERATOR, "--namespace", ns, "--health-port", str(health), "--metrics-port", "0",
            "--lease-namespace", ns, "--check-concurrency", "2",
            env=env, stdout=log, stderr=subprocess.STDOUT,
        )  # fmt: skip
        try:
            await eventually(lambda: answers(f"http://127.0.0.1:{health}/healthz"), 20)
            idle = peak_rss(process.pid)
            await apply(cluster, ns, "broker-secret.yaml")
            names = [f"hungry-{n}" for n in range(8)]
            for name in names:
                await cluster.create(QUEUE_CONSUMERS, ns, consumer(name, source=hungry))
            await eventually(lambda: all(deployment(cluster, ns, n) for n in names), 60)
            grown = peak_rss(process.pid) - idle
        finally:
            process.send_signal(signal.SIGTERM)
            await asyncio.wait_for(process.wait(), 60)
    assert grown < 64 * 2**20, f"{grown / 2**20:.0f} MiB more at the peak"


def peak_rss(pid: int) -> int:
    """The process's peak resident memory, in bytes."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) * 1024
    raise AssertionError("no VmHWM")


def test_names_are_never_paths() -> None:
    for bad in ("../b", "a/b", "A", "", "x" * 254, "..", "a..b"):
        with pytest.raises(ValueError, match="not a Kubernetes name"):
            ApiResource("v1", "secrets").path("ns", bad)
    assert ApiResource("v1", "secrets").path("ns", "a.b-c") == "/api/v1/namespaces/ns/secrets/a.b-c"
