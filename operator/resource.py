"""What the user declared: the QueueConsumer resource (luaq.dev/v1alpha1).

The spec is a `queue.consumer` entry plus what a pod needs. Every part that exists in an entries
file is typed with the entries file's own models (runtime/entries.py), so the CRD generated from
these classes (crd.py) accepts exactly what `luaq check` accepts. Fields are snake_case here
and camelCase in the API; `to_snake` and `camel` translate, guided by the schema.
"""

from __future__ import annotations

import copy
import json
import re
from collections.abc import Mapping
from typing import Annotated, Any, Literal

from luaq.runtime.entries import (
    MANY,
    NAME_RE,
    SHORT,
    Actor,
    AmqpDriverEntry,
    ConsumerDriverOptions,
    ConsumerEntry,
    DeadLetter,
    Duration,
    Module,
    PolicyRule,
    QueueDriverOptions,
    QueueEntry,
    Ref,
    Retry,
    Short,
    TlsOptions,
    _Model,
)
from pydantic import ConfigDict, Field, StringConstraints, ValidationError, model_validator

GROUP = "luaq.dev"
CRD_VERSION = "v1alpha1"  # the QueueConsumer API version this operator serves
KIND = "QueueConsumer"
PLURAL = "queueconsumers"
API_VERSION = f"{GROUP}/{CRD_VERSION}"


def _like(model: type[_Model], name: str, **changes: Any) -> Any:
    """The field `name` of an entries model (default, range, strictness), reused as it is."""
    field = copy.copy(model.model_fields[name])
    for key, value in changes.items():
        setattr(field, key, value)
    return field


# What the API server accepts as a ConfigMap's, Secret's or ServiceAccount's name (a DNS-1123
# subdomain) and as a key of their data: a name given here can only ever be a name, never a
# path into another namespace.
ObjectName = Annotated[
    str,
    StringConstraints(
        min_length=1,
        max_length=253,
        pattern=r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$",
    ),
]
DataKey = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z0-9]+$")
]
# A Kubernetes quantity (100m, 128Mi, 1.5Gi, 2), as resource requests and limits take it.
QUANTITY = re.compile(
    r"^(\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))"
    r"(([KMGTPE]i)|[numkMGTPE]|([eE](\+|-)?(([0-9]+(\.[0-9]*)?)|(\.[0-9]+))))?$"
)
Quantity = (
    Annotated[int, Field(ge=0)]
    | Annotated[str, StringConstraints(max_length=64, pattern=QUANTITY.pattern)]
)
LabelValue = Annotated[str, StringConstraints(max_length=63)]
# An inline Lua source; a bigger one lives in a ConfigMap of its own (`sourceRef`).
SOURCE_LENGTH = 256 * 1024


class SecretKeyRef(_Model):
    """A key of a Secret in the QueueConsumer's namespace."""

    name: ObjectName
    key: DataKey


class LocalObjectReference(_Model):
    """An object in the QueueConsumer's namespace, by name."""

    name: ObjectName


class ConfigMapKeyRef(_Model):
    """A key of a ConfigMap in the QueueConsumer's namespace."""

    config_map_name: ObjectName
    key: DataKey


class BrokerTls(_Model):
    """TLS to the broker; PEM material comes from Secrets (a `queue.driver.amqp` entry's tls)."""

    enabled: bool = _like(TlsOptions, "enabled")
    server_name: Short | None = _like(TlsOptions, "server_name")
    insecure_skip_verify: bool = _like(TlsOptions, "insecure_skip_verify")
    ca_secret_ref: SecretKeyRef | None = None
    cert_secret_ref: SecretKeyRef | None = None
    key_secret_ref: SecretKeyRef | None = None


class Broker(_Model):
    """The AMQP broker (a `queue.driver.amqp` entry); its URL, with the password, comes from a
    Secret and reaches the pod as an environment variable."""

    @model_validator(mode="before")
    @classmethod
    def _no_environment(cls, data: Any) -> Any:
        """A driver entry expands `${env:NAME}` in its strings, and the pod's environment holds
        the broker's Secrets (the operator's backlog reader has them too): a spec may not
        name one, or a vhost could carry the TLS key into an error message."""
        strings = [data] if isinstance(data, str) else []
        if isinstance(data, dict):
            strings = [v for v in data.values() if isinstance(v, str)]
            strings += [v for v in (data.get("tls") or {}).values() if isinstance(v, str)]
        if any("${" in text for text in strings):
            raise ValueError("${...} is not expanded in a QueueConsumer's broker fields")
        return data

    url_secret_ref: SecretKeyRef
    vhost: Short | None = _like(AmqpDriverEntry, "vhost")
    connection_name: Short | None = _like(AmqpDriverEntry, "connection_name")
    heartbeat: Duration | None = _like(AmqpDriverEntry, "heartbeat")
    connection_timeout: Duration = _like(AmqpDriverEntry, "connection_timeout")
    reconnect_delay: Duration = _like(AmqpDriverEntry, "reconnect_delay")
    reconnect_max_delay: Duration = _like(AmqpDriverEntry, "reconnect_max_delay")
    default_message_ttl: Duration | None = _like(AmqpDriverEntry, "default_message_ttl")
    default_queue_expiry: Duration | None = _like(AmqpDriverEntry, "default_queue_expiry")
    prefetch_count: int | None = _like(AmqpDriverEntry, "prefetch_count")
    max_message_size: int = _like(AmqpDriverEntry, "max_message_size")
    tls: BrokerTls = BrokerTls()


class QueueSpec(_Model):
    """A queue the consumer declares (a `queue.queue` entry on the broker)."""

    name: Ref
    queue_name: str | None = _like(QueueEntry, "queue_name")
    codec: Literal["json/plain", "application/msgpack"] = _like(QueueEntry, "codec")
    dead_letter: DeadLetter | None = None
    retry: Retry | None = None
    driver_options: QueueDriverOptions = _like(QueueEntry, "driver_options")


class Autoscaling(_Model):
    """Replicas follow the backlog of the consumed queue: ceil(backlog / backlogPerReplica)
    within [minReplicas, maxReplicas]; 0 while the backlog is at or below activationBacklog."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "self.minReplicas <= self.maxReplicas",
                    "message": "minReplicas must not be more than maxReplicas",
                }
            ]
        }
    )

    min_replicas: int = Field(0, ge=0, le=1000)
    max_replicas: int = Field(ge=1, le=1000)
    backlog_per_replica: int = Field(100, ge=1, le=2**31 - 1)
    activation_backlog: int = Field(0, ge=0, le=2**31 - 1)
    cooldown_seconds: int = Field(300, ge=0, description="wait this long before scaling down")

    @model_validator(mode="after")
    def _bounds(self) -> Autoscaling:
        if self.min_replicas > self.max_replicas:
            raise ValueError("minReplicas must not be more than maxReplicas")
        return self


class Resources(_Model):
    """The container's resource requests and limits (quantities like 100m, 128Mi)."""

    requests: dict[str, Quantity] = Field(default_factory=dict, max_length=16)
    limits: dict[str, Quantity] = Field(default_factory=dict, max_length=16)


class EnvVar(_Model):
    """An environment variable of the worker container (`valueFrom` as in a pod)."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = Field(None, max_length=32768)
    value_from: dict[str, Any] | None = Field(None, max_length=4)


class Toleration(_Model):
    key: str | None = Field(None, max_length=317)  # a label key: prefix/name
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


_ID_NAMESPACE = (
    "the namespace of luaq ids (`app` in `app:receipts`), as an entries file's `namespace:`; "
    "bare queue names here and in the Lua source resolve in it. Not the Kubernetes namespace."
)


class QueueConsumerSpec(_Model):
    """Workers running a Lua handler on a queue: a `queue.consumer` entry plus its pods."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": "has(self.source) != has(self.sourceRef)",
                    "message": "give exactly one of source (inline Lua) or sourceRef",
                }
            ]
        }
    )

    # the consumer, as in an entries file
    id_namespace: str = Field(
        "app", pattern=NAME_RE.pattern, max_length=SHORT, description=_ID_NAMESPACE
    )
    queue: Ref = Field(description="the queue to consume, one of `queues`")
    method: str = Field(
        min_length=1, max_length=SHORT, description="the Lua function that handles a message"
    )
    func: Ref | None = Field(
        None, description="id of the function entry (keeps the id the entries file gave it)"
    )
    modules: tuple[Module, ...] = _like(ConsumerEntry, "modules")
    concurrency: int = _like(ConsumerEntry, "concurrency")
    prefetch: int = _like(ConsumerEntry, "prefetch")
    auto_ack: bool = _like(ConsumerEntry, "auto_ack")
    retry: Retry | None = None
    driver_options: ConsumerDriverOptions = _like(ConsumerEntry, "driver_options")
    source: str | None = Field(
        None, min_length=1, max_length=SOURCE_LENGTH, description="the Lua source, inline"
    )
    source_ref: ConfigMapKeyRef | None = Field(None, description="the Lua source, from a ConfigMap")
    broker: Broker
    queues: tuple[QueueSpec, ...] = Field(
        min_length=1,
        max_length=MANY,
        description="the queues it declares; the only ones it may publish to",
    )
    policies: tuple[PolicyRule, ...] = Field(
        (),
        max_length=MANY,
        description="security.policy rules; when given, they alone decide what it may publish",
    )
    actor: Actor | None = Field(None, description="who its handler acts as (default: itself)")
    # the pods
    replicas: int = Field(1, ge=0, le=1000, description="pods, unless autoscaling is set")
    processes: int = Field(1, ge=1, le=64, description="worker processes per pod")
    autoscaling: Autoscaling | None = None
    image: str | None = Field(
        None, min_length=1, max_length=512, description="default: the operator's"
    )
    resources: Resources | None = None
    env: tuple[EnvVar, ...] = Field((), max_length=128)
    node_selector: dict[str, LabelValue] = Field(default_factory=dict, max_length=64)
    tolerations: tuple[Toleration, ...] = Field((), max_length=64)
    affinity: dict[str, Any] | None = Field(None, max_length=3)
    service_account_name: ObjectName | None = None
    image_pull_secrets: tuple[LocalObjectReference, ...] = Field(
        (), max_length=16, description="Secrets in this namespace to pull the image with"
    )

    @model_validator(mode="after")
    def _one_source(self) -> QueueConsumerSpec:
        if (self.source is None) == (self.source_ref is None):
            raise ValueError("give exactly one of source (inline Lua) or sourceRef")
        return self


_CAMEL_RE = re.compile(r"_([a-z0-9])")


def camel(name: str) -> str:
    return _CAMEL_RE.sub(lambda m: m.group(1).upper(), name)


def to_snake(value: Any, schema: Mapping[str, Any]) -> Any:
    """camelCase keys of the API back to the models' names, following the (camelCase) CRD
    schema: free-form maps (labels, actor meta, affinity) keep their keys; unknown keys stay
    as they are, for validation to name them."""
    if isinstance(value, list):
        items = schema.get("items", {})
        return [to_snake(item, items) for item in value]
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    properties = schema["properties"]
    names = {camel_name: snake for snake, camel_name in _snake_names(properties).items()}
    return {
        names.get(key, key): to_snake(item, properties.get(key, {})) for key, item in value.items()
    }


def int_or_string(value: Any) -> Any:
    """A duration in seconds as an int-or-string field takes it: 30, or "1.5s"."""
    if isinstance(value, float):
        return int(value) if value.is_integer() else f"{value:g}s"
    return value


def to_camel(value: Any, schema: Mapping[str, Any]) -> Any:
    """The models' snake_case keys as the API's camelCase, following the CRD schema."""
    if schema.get("x-kubernetes-int-or-string"):
        return int_or_string(value)
    if isinstance(value, list | tuple):
        items = schema.get("items", {})
        return [to_camel(item, items) for item in value]
    if not isinstance(value, dict) or "properties" not in schema:
        return value
    properties = schema["properties"]
    converted = {}
    for key, item in value.items():
        name = camel(key) if camel(key) in properties else key
        converted[name] = to_camel(item, properties.get(name, {}))
    return converted


def _snake_names(properties: Mapping[str, Any]) -> dict[str, str]:
    return {_SNAKE_RE.sub(r"_\1", key).lower(): key for key in properties}


_SNAKE_RE = re.compile(r"(?<=[a-z0-9])([A-Z])")


class InvalidSpec(Exception):
    def __init__(self, problems: list[str]) -> None:
        super().__init__("; ".join(problems))
        self.problems = problems


def parse_spec(spec: Mapping[str, Any], schema: Mapping[str, Any]) -> QueueConsumerSpec:
    """Validate a QueueConsumer's spec (as the API serves it) with the entries models."""
    data = to_snake(dict(spec), schema)
    namespace = data.get("id_namespace", "app")
    if not isinstance(namespace, str) or not NAME_RE.match(namespace):
        raise InvalidSpec([f"spec.idNamespace: not a valid name: {namespace!r}"])
    try:
        # JSON validation: the API speaks JSON (arrays are tuples even in strict mode)
        return QueueConsumerSpec.model_validate_json(
            json.dumps(data), context={"namespace": namespace}
        )
    except ValidationError as exc:
        raise InvalidSpec([_problem(error) for error in exc.errors()]) from None


def _problem(error: Mapping[str, Any]) -> str:
    path = "spec"
    for part in error["loc"]:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "function-after":
            path += f".{camel(str(part))}"
    message = str(error["msg"]).removeprefix("Value error, ")
    if message == "Extra inputs are not permitted":
        message = "unknown field"
    return f"{path}: {message}"


class StatusCondition(_Model):
    type: Literal["Ready", "Progressing", "Degraded"]
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z][A-Za-z0-9_]*$", max_length=1024)
    message: str = Field("", max_length=32768)
    last_transition_time: str = Field(
        max_length=64, description="RFC 3339 time of the last status change"
    )
    observed_generation: int | None = None


class QueueConsumerStatus(_Model):
    """What the operator observed; written only by the operator."""

    observed_generation: int | None = None
    replicas: int = Field(0, description="pods of the worker Deployment")
    ready_replicas: int = 0
    desired_replicas: int | None = Field(None, description="what spec or the autoscaler asks")
    selector: str | None = Field(
        None, max_length=4096, description="label selector of the pods, for scaling"
    )
    backlog: int | None = Field(None, description="ready messages in the queue (autoscaling)")
    last_scale_time: str | None = Field(None, max_length=64)
    conditions: tuple[StatusCondition, ...] = Field(
        (),
        max_length=8,
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["type"],
        },
    )
