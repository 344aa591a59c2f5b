"""QueueConsumer in, manifests out: pure functions, no cluster access.

A QueueConsumer becomes a ConfigMap holding exactly what `luaq run` reads (the entries file and
the Lua source), a Deployment running `luaq run` on it, a Service for the workers' metrics, and
a PodDisruptionBudget while it keeps more than one pod.
The ConfigMap is immutable and named by its content: a new configuration is a new ConfigMap, and
the Deployment's switch to it is the rollout, so running pods never see new code early.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import yaml
from luaq.runtime.entries import ENTRIES_FORMAT
from luaq.runtime.settings import Settings as RuntimeSettings
from pydantic import BaseModel

from .resource import API_VERSION, KIND, NAME_LABEL, TMP_DIR, QueueConsumerSpec, SecretKeyRef
from .resource import CHECKSUM_ANNOTATION as CHECKSUM_ANNOTATION
from .resource import CONFIG_DIR as CONFIG_DIR
from .resource import OWNER_LABEL as OWNER_LABEL
from .settings import OperatorSettings

ENTRIES_FILE = "entries.yaml"
SOURCE_FILE = "handler.lua"
BROKER_ID = "broker"
MANAGED_BY = "luaq-operator"
URL_ENV = "LUAQ_BROKER_URL"
TLS_ENV = {"ca": "LUAQ_BROKER_TLS_CA", "cert": "LUAQ_BROKER_TLS_CERT", "key": "LUAQ_BROKER_TLS_KEY"}
SHUTDOWN_TIMEOUT = RuntimeSettings.shutdown_timeout


@dataclass(frozen=True)
class Names:
    """The objects one QueueConsumer owns, by name."""

    consumer: str

    @property
    def config_map_prefix(self) -> str:
        return f"{self.consumer}-luaq-"

    def config_map(self, data: Mapping[str, str]) -> str:
        return self.config_map_prefix + checksum(data)[:10]

    @property
    def deployment(self) -> str:
        return self.consumer

    @property
    def service(self) -> str:
        return f"{self.consumer}-metrics"

    @property
    def pod_disruption_budget(self) -> str:
        return self.consumer


@dataclass(frozen=True)
class Desired:
    """Everything one QueueConsumer should have, as manifests, and what it should not."""

    config_map: dict[str, Any]
    deployment: dict[str, Any]
    service: dict[str, Any]
    pod_disruption_budget: dict[str, Any] | None

    @property
    def manifests(self) -> list[dict[str, Any]]:
        """In the order they are applied: the ConfigMap exists before a pod mounts it."""
        optional = [self.pod_disruption_budget] if self.pod_disruption_budget else []
        return [self.config_map, self.deployment, self.service, *optional]

    @property
    def unwanted(self) -> list[tuple[str, str]]:
        """(kind, name) of the objects it owns only at times, and should not have now."""
        if self.pod_disruption_budget is not None:
            return []
        name = self.deployment["metadata"]["name"]
        return [("PodDisruptionBudget", Names(name).pod_disruption_budget)]


def desired(
    owner: Mapping[str, Any],
    spec: QueueConsumerSpec,
    settings: OperatorSettings,
    source: str,
    secrets: Mapping[str, str],
    replicas: int,
) -> Desired:
    """The whole desired state of a QueueConsumer: its Lua `source`, the values of the Secrets
    its pods' environment takes (hashed into the pod template, so a rotated password rolls the
    pods), and the replicas it runs."""
    data = config_data(owner["metadata"]["name"], spec, source)
    made = config_map(owner, data)
    pods = checksum(data, secrets)
    return Desired(
        made,
        deployment(owner, spec, settings, made["metadata"]["name"], pods, replicas),
        service(owner, settings),
        pod_disruption_budget(owner) if budgeted(spec) else None,
    )


def selector_labels(name: str) -> dict[str, str]:
    return {NAME_LABEL: "luaq-worker", OWNER_LABEL: name}


def selector(name: str) -> str:
    """The pods' label selector as text (the scale subresource's status.selector)."""
    return ",".join(f"{key}={value}" for key, value in selector_labels(name).items())


def labels(name: str) -> dict[str, str]:
    return {
        **selector_labels(name),
        "app.kubernetes.io/instance": name,
        "app.kubernetes.io/component": "worker",
        "app.kubernetes.io/part-of": "luaq",
        "app.kubernetes.io/managed-by": MANAGED_BY,
    }


def _metadata(owner: Mapping[str, Any], name: str) -> dict[str, Any]:
    meta = owner["metadata"]
    return {
        "name": name,
        "namespace": meta["namespace"],
        "labels": labels(meta["name"]),
        "ownerReferences": [
            {
                "apiVersion": API_VERSION,
                "kind": KIND,
                "name": meta["name"],
                "uid": meta["uid"],
                "controller": True,
                "blockOwnerDeletion": True,
            }
        ],
    }


def _tls_refs(spec: QueueConsumerSpec) -> dict[str, SecretKeyRef]:
    tls = spec.broker.tls
    refs = {"ca": tls.ca_secret_ref, "cert": tls.cert_secret_ref, "key": tls.key_secret_ref}
    return {part: ref for part, ref in refs.items() if ref is not None}


def secret_refs(spec: QueueConsumerSpec) -> dict[str, SecretKeyRef]:
    """Environment variable -> the Secret key it comes from (the broker URL, TLS material)."""
    refs = {URL_ENV: spec.broker.url_secret_ref}
    refs.update({TLS_ENV[part]: ref for part, ref in _tls_refs(spec).items()})
    return refs


# The QueueConsumer's own entries (its consumer and policies) have ids in a namespace of their
# own: a QueueConsumer may then bear the name of the queue it reads (`emails` on `app:emails`).
OWN_NAMESPACE = "qc"


def _policies(name: str, spec: QueueConsumerSpec) -> list[dict[str, Any]]:
    """The QueueConsumer's policies; without any, it may publish to the queues it declares."""
    if spec.policies:
        rules = [rule.model_dump(mode="json", exclude_unset=True) for rule in spec.policies]
        return [
            {"id": f"{OWN_NAMESPACE}:{name}.policy-{index}", "kind": "security.policy"}
            | {"policy": rule}
            for index, rule in enumerate(rules)
        ]
    declared = [queue.name for queue in spec.queues]
    return [
        {
            "id": f"{OWN_NAMESPACE}:{name}.publish",
            "kind": "security.policy",
            "policy": {"actions": ["queue.publish"], "resources": ["*"], "effect": "allow"},
        },
        {
            "id": f"{OWN_NAMESPACE}:{name}.publish-declared",
            "kind": "security.policy",
            "policy": {
                "actions": ["queue.publish.queue"],
                "resources": declared,
                "effect": "allow",
            },
        },
    ]


def entries_document(name: str, spec: QueueConsumerSpec) -> dict[str, Any]:
    """The entries file the pod runs; the broker's secrets stay `${env:...}` references."""
    broker = spec.broker
    driver: dict[str, Any] = {
        "name": BROKER_ID,
        "kind": "queue.driver.amqp",
        "url": f"${{env:{URL_ENV}}}",
        **broker.model_dump(mode="json", exclude_unset=True, exclude={"url_secret_ref", "tls"}),
    }
    if "tls" in broker.model_fields_set:
        tls = broker.tls.model_dump(
            mode="json",
            exclude_unset=True,
            exclude={"ca_secret_ref", "cert_secret_ref", "key_secret_ref"},
        )
        tls.update({part: f"${{env:{TLS_ENV[part]}}}" for part in _tls_refs(spec)})
        driver["tls"] = tls
    queues = [
        {
            "id": queue.name,
            "kind": "queue.queue",
            "driver": BROKER_ID,
            **queue.model_dump(mode="json", exclude_unset=True, exclude={"name"}),
        }
        for queue in spec.queues
    ]
    policies = _policies(name, spec)
    handler: dict[str, Any] = {
        "source": f"file://{SOURCE_FILE}",
        "method": spec.method,
        **spec.model_dump(mode="json", exclude_unset=True, include={"modules"}),
    }
    consumer: dict[str, Any] = {
        "id": f"{OWN_NAMESPACE}:{name}",
        "kind": "queue.consumer",
        "queue": spec.queue,
        **spec.model_dump(
            mode="json",
            exclude_unset=True,
            include={"concurrency", "prefetch", "auto_ack", "retry", "driver_options"},
        ),
        "security": {
            "policies": [policy["id"] for policy in policies],
            **spec.model_dump(mode="json", exclude_unset=True, include={"actor"}),
        },
    }
    functions: list[dict[str, Any]] = []
    if spec.func is not None:
        functions.append({"id": spec.func, "kind": "function.lua", **handler})
        consumer["func"] = spec.func
    else:
        consumer.update(handler)
    return {
        "version": ENTRIES_FORMAT,
        "namespace": spec.id_namespace,
        "entries": [driver, *queues, *functions, *policies, consumer],
    }


def config_data(name: str, spec: QueueConsumerSpec, source: str) -> dict[str, str]:
    """The files of the ConfigMap: what `luaq run` reads, and nothing secret."""
    document = yaml.safe_dump(entries_document(name, spec), sort_keys=False)
    return {ENTRIES_FILE: document, SOURCE_FILE: source}


def checksum(data: Mapping[str, str], secrets: Mapping[str, str] | None = None) -> str:
    """Of what the pods read: the ConfigMap's files and, when given, the Secret values their
    environment takes (hashed with the rest, as Helm's `checksum/secret` convention does)."""
    everything: dict[str, Any] = dict(data)
    if secrets:
        everything["secrets"] = dict(secrets)
    return hashlib.sha256(json.dumps(everything, sort_keys=True).encode()).hexdigest()


def config_map(owner: Mapping[str, Any], data: Mapping[str, str]) -> dict[str, Any]:
    return {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": _metadata(owner, Names(owner["metadata"]["name"]).config_map(data)),
        "immutable": True,
        "data": dict(data),
    }


def pod_env(spec: QueueConsumerSpec, settings: OperatorSettings) -> list[dict[str, Any]]:
    env: list[dict[str, Any]] = [
        {"name": "LUAQ_METRICS_PORT", "value": str(settings.worker_metrics_port)},
        {"name": "LUAQ_PROCESSES", "value": str(spec.processes)},
        {"name": "LUAQ_SHUTDOWN_TIMEOUT", "value": str(SHUTDOWN_TIMEOUT)},
    ]
    env += [
        {"name": variable, "valueFrom": {"secretKeyRef": {"name": ref.name, "key": ref.key}}}
        for variable, ref in secret_refs(spec).items()
    ]
    # as the API server stores them: an empty value is no value (the variable is set, empty)
    for variable in spec.env:
        fields = variable.model_dump(mode="json", by_alias=True, exclude_none=True)
        if fields.get("value") == "":
            del fields["value"]
        env.append(fields)
    return env


_RESTRICTED = {
    "allowPrivilegeEscalation": False,
    "readOnlyRootFilesystem": True,
    "runAsNonRoot": True,
    "capabilities": {"drop": ["ALL"]},
    "seccompProfile": {"type": "RuntimeDefault"},
}


def deployment(
    owner: Mapping[str, Any],
    spec: QueueConsumerSpec,
    settings: OperatorSettings,
    config: str,
    config_checksum: str,
    replicas: int,
) -> dict[str, Any]:
    """The worker Deployment, mounting ConfigMap `config`; `config_checksum` on the pod
    template says what the pods read (the ConfigMap and the Secret values of their env)."""
    name = owner["metadata"]["name"]
    names = Names(name)
    container: dict[str, Any] = {
        "name": "worker",
        "image": spec.image or settings.image,
        "imagePullPolicy": "IfNotPresent",
        "command": ["luaq", "run", f"{CONFIG_DIR}/{ENTRIES_FILE}"],
        "env": pod_env(spec, settings),
        "ports": [
            {"name": "metrics", "containerPort": settings.worker_metrics_port, "protocol": "TCP"}
        ],
        "livenessProbe": {
            "httpGet": {"path": "/healthz", "port": "metrics"},
            "periodSeconds": 10,
            "failureThreshold": 3,
        },
        "readinessProbe": {
            "httpGet": {"path": "/readyz", "port": "metrics"},
            "periodSeconds": 5,
            "failureThreshold": 2,
        },
        "securityContext": _RESTRICTED,
        "volumeMounts": [
            {"name": "config", "mountPath": CONFIG_DIR, "readOnly": True},
            {"name": "tmp", "mountPath": TMP_DIR},
            *_dumped(spec.volume_mounts),
        ],
    }
    if spec.resources is not None:
        container["resources"] = spec.resources.model_dump(mode="json", exclude_unset=True)
    pod: dict[str, Any] = {
        "automountServiceAccountToken": False,
        "terminationGracePeriodSeconds": int(SHUTDOWN_TIMEOUT) + 15,
        "securityContext": {"runAsNonRoot": True, "seccompProfile": {"type": "RuntimeDefault"}},
        "containers": [container],
        "volumes": [
            {"name": "config", "configMap": {"name": config}},
            {"name": "tmp", "emptyDir": {}},
            *_dumped(spec.volumes),
        ],
    }
    if spec.service_account_name:
        pod["serviceAccountName"] = spec.service_account_name
    if spec.image_pull_secrets:
        pod["imagePullSecrets"] = [{"name": secret.name} for secret in spec.image_pull_secrets]
    if spec.node_selector:
        pod["nodeSelector"] = dict(spec.node_selector)
    if spec.tolerations:
        pod["tolerations"] = [
            toleration.model_dump(mode="json", by_alias=True, exclude_none=True)
            for toleration in spec.tolerations
        ]
    if spec.affinity and (
        affinity := spec.affinity.model_dump(mode="json", by_alias=True, exclude_unset=True)
    ):
        pod["affinity"] = affinity
    if spec.priority_class_name:
        pod["priorityClassName"] = spec.priority_class_name
    if spread := topology_spread(name, spec):
        pod["topologySpreadConstraints"] = spread
    return {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "metadata": _metadata(owner, names.deployment),
        "spec": {
            "replicas": replicas,
            "selector": {"matchLabels": selector_labels(name)},
            "template": {
                "metadata": {
                    "labels": {**labels(name), **spec.pod_labels},
                    "annotations": {**spec.pod_annotations, CHECKSUM_ANNOTATION: config_checksum},
                },
                "spec": pod,
            },
        },
    }


def _dumped(parts: tuple[BaseModel, ...]) -> list[dict[str, Any]]:
    """Parts of the pods' spec as the API server stores them: a field left at its default
    (false, empty, unset) is not written, as Go's omitempty leaves it out."""
    return [part.model_dump(mode="json", by_alias=True, exclude_defaults=True) for part in parts]


# Without a word from the spec: spread over zones, then nodes, as far as the scheduler can
# (ScheduleAnyway), counting only the pods of the current rollout (pod-template-hash).
_SPREAD_KEYS = ("topology.kubernetes.io/zone", "kubernetes.io/hostname")


def topology_spread(name: str, spec: QueueConsumerSpec) -> list[dict[str, Any]]:
    """The spec's constraints (without a labelSelector, one counts this QueueConsumer's pods),
    or else a spread by zone and node unless autoscaling keeps it to one pod. It does not
    follow `replicas`: a scale (kubectl scale, an HPA, KEDA) must not change the pod template,
    which would roll the pods."""
    own = {"matchLabels": selector_labels(name)}
    if spec.topology_spread_constraints is not None:
        return [
            {"labelSelector": own, **constraint}
            for constraint in _dumped(spec.topology_spread_constraints)
        ]
    if spec.autoscaling is not None and spec.autoscaling.max_replicas <= 1:
        return []
    return [
        {
            "maxSkew": 1,
            "topologyKey": key,
            "whenUnsatisfiable": "ScheduleAnyway",
            "labelSelector": own,
            "matchLabelKeys": ["pod-template-hash"],
        }
        for key in _SPREAD_KEYS
    ]


def budgeted(spec: QueueConsumerSpec) -> bool:
    """Whether it keeps more than one pod, which a PodDisruptionBudget then keeps from being
    evicted all at once (a node drain)."""
    least = spec.autoscaling.min_replicas if spec.autoscaling else spec.replicas
    return least > 1


def pod_disruption_budget(owner: Mapping[str, Any]) -> dict[str, Any]:
    """One pod evicted at a time; an unhealthy one whenever (AlwaysAllow: workers that cannot
    reach their broker, all unready, must not block a node drain)."""
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "policy/v1",
        "kind": "PodDisruptionBudget",
        "metadata": _metadata(owner, Names(name).pod_disruption_budget),
        "spec": {
            "maxUnavailable": 1,
            "selector": {"matchLabels": selector_labels(name)},
            "unhealthyPodEvictionPolicy": "AlwaysAllow",
        },
    }


def service(owner: Mapping[str, Any], settings: OperatorSettings) -> dict[str, Any]:
    name = owner["metadata"]["name"]
    return {
        "apiVersion": "v1",
        "kind": "Service",
        "metadata": _metadata(owner, Names(name).service),
        "spec": {
            "selector": selector_labels(name),
            "ports": [
                {
                    "name": "metrics",
                    "port": settings.worker_metrics_port,
                    "targetPort": "metrics",
                    "protocol": "TCP",
                }
            ],
        },
    }
