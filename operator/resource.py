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
from typing import Annotated, Any, ClassVar, Literal

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
from pydantic import (
    AfterValidator,
    AliasGenerator,
    ConfigDict,
    Field,
    StringConstraints,
    ValidationError,
    ValidationInfo,
    WithJsonSchema,
    field_validator,
    model_validator,
)

GROUP = "luaq.dev"
CRD_VERSION = "v1alpha1"  # the QueueConsumer API version this operator serves
KIND = "QueueConsumer"
PLURAL = "queueconsumers"
API_VERSION = f"{GROUP}/{CRD_VERSION}"

_CAMEL_RE = re.compile(r"_([a-z0-9])")


def camel(name: str) -> str:
    return _CAMEL_RE.sub(lambda m: m.group(1).upper(), name)


def _like(model: type[_Model], name: str, **changes: Any) -> Any:
    """The field `name` of an entries model (default, range, strictness), reused as it is."""
    field = copy.copy(model.model_fields[name])
    for key, value in changes.items():
        setattr(field, key, value)
    return field


# What the API server accepts as a ConfigMap's, Secret's or ServiceAccount's name (a DNS-1123
# subdomain) and as a key of their data: a name given here can only ever be a name, never a
# path into another namespace.
_DNS_LABEL = r"[a-z0-9]([-a-z0-9]*[a-z0-9])?"
_DNS_SUBDOMAIN = rf"{_DNS_LABEL}(\.{_DNS_LABEL})*"
ObjectName = Annotated[
    str, StringConstraints(min_length=1, max_length=253, pattern=f"^{_DNS_SUBDOMAIN}$")
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
LabelValue = Annotated[
    str, StringConstraints(max_length=63, pattern=r"^(([A-Za-z0-9][-A-Za-z0-9_.]*)?[A-Za-z0-9])?$")
]
# A label's or an annotation's key: a DNS subdomain (at most 253 characters) and '/', optional,
# then a name of at most 63.
QUALIFIED_NAME = re.compile(
    rf"^({_DNS_SUBDOMAIN}/)?[A-Za-z0-9]([-A-Za-z0-9_.]{{0,61}}[A-Za-z0-9])?$"
)
LabelKey = Annotated[str, StringConstraints(max_length=317, pattern=QUALIFIED_NAME.pattern)]
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


class _PodModel(_Model):
    """A part of the pods' spec, passed on to them as it is: dumped `by_alias`, in the API's
    camelCase (render.py)."""

    model_config = ConfigDict(alias_generator=AliasGenerator(serialization_alias=camel))


# The worker's own variables: `luaq run` reads every flag as LUAQ_<FLAG> (the operator sets some,
# the admin's policy bounds others, `luaq check` validated the broker's), and Python and the
# loader would run code the image does not hold. The logs' level and format are the tenant's.
_WORKERS_ENV = re.compile(r"LUAQ_(?!LOG_LEVEL$|LOG_FORMAT$)|PYTHON|LD_")


class EnvVar(_PodModel):
    """An environment variable of the worker container (`valueFrom` as in a pod)."""

    name: str = Field(min_length=1, max_length=253, pattern=r"^[-._a-zA-Z][-._a-zA-Z0-9]*$")
    value: str | None = Field(None, max_length=32768)
    value_from: dict[str, Any] | None = Field(None, max_length=4)

    @field_validator("name")
    @classmethod
    def _not_the_workers(cls, name: str) -> str:
        if _WORKERS_ENV.match(name):
            raise ValueError(
                "LUAQ_* (but LUAQ_LOG_LEVEL and LUAQ_LOG_FORMAT), PYTHON* and LD_* are the "
                "worker's own: set what the spec's fields allow"
            )
        return name


class Toleration(_PodModel):
    key: str | None = Field(None, max_length=317)  # a label key: prefix/name
    operator: Literal["Exists", "Equal"] | None = None
    value: LabelValue | None = None
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = None
    toleration_seconds: int | None = None


# The operator's own labels and annotation on the pods: the Deployment's selector, and what
# the pods read (render.py). A spec's podLabels and podAnnotations may not set them.
NAME_LABEL = "app.kubernetes.io/name"
OWNER_LABEL = f"{GROUP}/queueconsumer"
CHECKSUM_ANNOTATION = f"{GROUP}/config-checksum"
# The operator's own mounts in the worker container: its files, and the one writable directory
# (the root filesystem is read-only); a spec's volumeMounts keep out of both.
CONFIG_DIR = "/etc/luaq"
TMP_DIR = "/tmp"
OWN_VOLUMES = ("config", "tmp")
_OWN_VOLUME = f"{' and '.join(OWN_VOLUMES)} are the worker's own volumes"


def _qualified_keys(value: dict[str, str]) -> dict[str, str]:
    """A structural schema cannot say what a map's keys are (and CEL would cost as much as
    the largest request): the operator says it."""
    bad = [
        key for key in value if not QUALIFIED_NAME.match(key) or len(key.rpartition("/")[0]) > 253
    ]
    if bad:
        raise ValueError(
            f"not a label or annotation key: {', '.join(map(repr, bad))} (a DNS subdomain "
            "and '/', optional, then at most 63 letters, digits, '-', '_' or '.')"
        )
    return value


# The operator's own keys in a map field of the spec, and what is said when a spec sets one.
_OPERATORS = {
    "pod_labels": ((NAME_LABEL, OWNER_LABEL), f"may not set {NAME_LABEL} or {OWNER_LABEL}"),
    "pod_annotations": ((CHECKSUM_ANNOTATION,), f"may not set {CHECKSUM_ANNOTATION}"),
}


def _not_the_operators(field: str) -> dict[str, Any]:
    """A CEL rule that keeps the operator's keys out of a map: a lookup costs the same
    whatever the map holds."""
    keys, message = _OPERATORS[field]
    rule = " && ".join(f"!('{key}' in self)" for key in keys)
    return {"x-kubernetes-validations": [{"rule": rule, "message": f"{message}, the operator's"}]}


Labels = Annotated[dict[str, LabelValue], AfterValidator(_qualified_keys)]
Annotations = Annotated[
    dict[str, Annotated[str, StringConstraints(max_length=32768)]],
    AfterValidator(_qualified_keys),
]
# Paths in normal form (no empty segment, none starting with '..', no trailing '/'): one path,
# one text, so that a prefix of the text is a parent directory.
_SEGMENT = r"([^/.][^/]*|\.[^/.][^/]*)"
RelativePath = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=f"^{_SEGMENT}(/{_SEGMENT})*$")
]
AbsolutePath = Annotated[
    str, StringConstraints(min_length=1, max_length=1024, pattern=f"^(/{_SEGMENT})+$")
]
FileMode = Annotated[int, Field(ge=0, le=0o777)]
VolumeName = Annotated[
    str, StringConstraints(min_length=1, max_length=63, pattern=f"^{_DNS_LABEL}$")
]


class LabelSelectorRequirement(_PodModel):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[LabelValue, ...] = Field((), max_length=64)


class LabelSelector(_PodModel):
    match_labels: Labels = Field(default_factory=dict, max_length=64)
    match_expressions: tuple[LabelSelectorRequirement, ...] = Field((), max_length=16)


class TopologySpreadConstraint(_PodModel):
    """As in a pod; without a labelSelector, it counts the QueueConsumer's own pods."""

    max_skew: int = Field(ge=1, le=2**31 - 1)
    topology_key: LabelKey
    when_unsatisfiable: Literal["DoNotSchedule", "ScheduleAnyway"]
    label_selector: LabelSelector | None = None
    min_domains: int | None = Field(None, ge=1, le=2**31 - 1)
    match_label_keys: tuple[LabelKey, ...] = Field((), max_length=16)
    node_affinity_policy: Literal["Honor", "Ignore"] | None = None
    node_taints_policy: Literal["Honor", "Ignore"] | None = None


class _Stored(_Model):
    """A part of core/v1 Affinity, in the API's camelCase: the CRD keeps `affinity` free-form,
    so it reaches the operator as the tenant wrote it. An API server stores a Deployment
    without unknown fields, nulls, empty lists and empty maps (Go's omitempty): any of them
    would make the stored Deployment differ from the rendered one, "restored" on every pass.
    They are refused, and what is given is what is stored."""

    model_config = ConfigDict(alias_generator=camel)

    @field_validator("*")
    @classmethod
    def _not_empty(cls, value: Any, info: ValidationInfo) -> Any:
        """Run on the fields given only: a default is no null given."""
        if value is None or value == () or (value == {} and info.field_name == "match_labels"):
            raise ValueError(f"{json.dumps(value)}: an API server does not keep it; leave it out")
        return value


class AffinitySelectorRequirement(_Stored):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist"]
    values: tuple[LabelValue, ...] = ()


class AffinitySelector(_Stored):
    """A label selector; an empty one (`{}`) selects every pod, none selects no pod."""

    match_labels: Labels = Field(default_factory=dict)
    match_expressions: tuple[AffinitySelectorRequirement, ...] = ()


class NodeSelectorRequirement(_Stored):
    key: LabelKey
    operator: Literal["In", "NotIn", "Exists", "DoesNotExist", "Gt", "Lt"]
    values: tuple[LabelValue, ...] = ()


class NodeSelectorTerm(_Stored):
    match_expressions: tuple[NodeSelectorRequirement, ...] = ()
    match_fields: tuple[NodeSelectorRequirement, ...] = ()


class NodeSelector(_Stored):
    node_selector_terms: tuple[NodeSelectorTerm, ...]


class PreferredSchedulingTerm(_Stored):
    weight: int = Field(ge=1, le=100)
    preference: NodeSelectorTerm


class NodeAffinity(_Stored):
    required_during_scheduling_ignored_during_execution: NodeSelector | None = None
    preferred_during_scheduling_ignored_during_execution: tuple[PreferredSchedulingTerm, ...] = ()


class PodAffinityTerm(_Stored):
    label_selector: AffinitySelector | None = None
    namespace_selector: AffinitySelector | None = None
    namespaces: tuple[ObjectName, ...] = ()
    topology_key: LabelKey
    match_label_keys: tuple[LabelKey, ...] = ()
    mismatch_label_keys: tuple[LabelKey, ...] = ()


class WeightedPodAffinityTerm(_Stored):
    weight: int = Field(ge=1, le=100)
    pod_affinity_term: PodAffinityTerm


class PodAffinity(_Stored):
    required_during_scheduling_ignored_during_execution: tuple[PodAffinityTerm, ...] = ()
    preferred_during_scheduling_ignored_during_execution: tuple[WeightedPodAffinityTerm, ...] = ()


class Affinity(_Stored):
    node_affinity: NodeAffinity | None = None
    pod_affinity: PodAffinity | None = None
    pod_anti_affinity: PodAffinity | None = None


# The CRD leaves `affinity` free-form, as it was: its full schema would add some hundred lines
# to the CRD for what the operator checks anyway.
_FREE_FORM = {"type": "object", "maxProperties": 3}


class KeyToPath(_PodModel):
    key: DataKey
    path: RelativePath
    mode: FileMode | None = None


class ConfigMapProjection(_PodModel):
    name: ObjectName
    items: tuple[KeyToPath, ...] = Field((), max_length=64)
    optional: bool | None = None


class SecretProjection(ConfigMapProjection):
    pass


class ConfigMapVolumeSource(ConfigMapProjection):
    default_mode: FileMode | None = None


class SecretVolumeSource(_PodModel):
    secret_name: ObjectName
    items: tuple[KeyToPath, ...] = Field((), max_length=64)
    default_mode: FileMode | None = None
    optional: bool | None = None


class EmptyDirVolumeSource(_PodModel):
    medium: Literal["Memory"] | None = None
    size_limit: Quantity | None = None


class ServiceAccountTokenProjection(_PodModel):
    """A token of the pods' service account (the admin's policy allows it or not), for
    `audience` (default: the API server)."""

    audience: str | None = Field(None, min_length=1, max_length=1024)
    expiration_seconds: int | None = Field(None, ge=600, le=2**32)
    path: RelativePath


def _exactly_one(what: str, sources: tuple[str, ...]) -> ConfigDict:
    """A union as Kubernetes writes one: exactly one of its optional fields is set. The CEL
    rule's cost is a handful of `has`, whatever the sizes."""
    count = " + ".join(f"(has(self.{camel(source)}) ? 1 : 0)" for source in sources)
    return ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"{count} == 1",
                    "message": f"{what} has exactly one of {_listed(sources)}",
                }
            ]
        }
    )


def _listed(sources: tuple[str, ...]) -> str:
    names = [camel(source) for source in sources]
    return ", ".join(names[:-1]) + f" or {names[-1]}"


class _Sourced(_PodModel):
    """A union (`_exactly_one`): a member of Kubernetes' union left out here (hostPath) is
    named as not allowed, not as a typo. Kept as an extra field until then: a validator run
    before the fields would see JSON arrays as lists, which strict tuples refuse."""

    model_config = ConfigDict(extra="allow")
    _what: ClassVar[str]
    _sources: ClassVar[tuple[str, ...]]

    @model_validator(mode="after")
    def _one(self) -> _Sourced:
        if refused := sorted(self.model_extra or ()):
            raise ValueError(
                f"{', '.join(refused)}: not allowed; {self._what} is {_listed(self._sources)}"
            )
        if sum(getattr(self, source) is not None for source in self._sources) != 1:
            raise ValueError(f"{self._what} has exactly one of {_listed(self._sources)}")
        return self


_PROJECTIONS = ("config_map", "secret", "service_account_token")
_VOLUME_SOURCES = ("config_map", "secret", "empty_dir", "projected")


class VolumeProjection(_Sourced):
    model_config = _exactly_one("a projected source", _PROJECTIONS)
    _what = "a projected source"
    _sources = _PROJECTIONS

    config_map: ConfigMapProjection | None = None
    secret: SecretProjection | None = None
    service_account_token: ServiceAccountTokenProjection | None = None


class ProjectedVolumeSource(_PodModel):
    sources: tuple[VolumeProjection, ...] = Field(min_length=1, max_length=16)
    default_mode: FileMode | None = None


class Volume(_Sourced):
    """A volume of the pods: what the restricted Pod Security profile allows that needs no
    storage of its own (no hostPath, no persistent volume)."""

    model_config = _exactly_one("a volume", _VOLUME_SOURCES)
    _what = "a volume"
    _sources = _VOLUME_SOURCES

    name: VolumeName = Field(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": " && ".join(f"self != '{own}'" for own in OWN_VOLUMES),
                    "message": _OWN_VOLUME,
                }
            ]
        }
    )
    config_map: ConfigMapVolumeSource | None = None
    secret: SecretVolumeSource | None = None
    empty_dir: EmptyDirVolumeSource | None = None
    projected: ProjectedVolumeSource | None = None

    @field_validator("name")
    @classmethod
    def _not_own(cls, name: str) -> str:
        if name in OWN_VOLUMES:
            raise ValueError(_OWN_VOLUME)
        return name


_OWN_MOUNTS = (CONFIG_DIR, TMP_DIR)
_SHADOWS = f"a mount may not be at, inside or above {' or '.join(_OWN_MOUNTS)}, the worker's own"


class VolumeMount(_PodModel):
    name: VolumeName
    mount_path: AbsolutePath = Field(
        json_schema_extra={
            "x-kubernetes-validations": [
                {
                    "rule": f"!{list(_OWN_MOUNTS)}.exists(p, self == p || "
                    "self.startsWith(p + '/') || p.startsWith(self + '/'))",
                    "message": _SHADOWS,
                }
            ]
        }
    )
    sub_path: RelativePath | None = None
    read_only: bool = False

    @field_validator("mount_path")
    @classmethod
    def _not_shadowing(cls, path: str) -> str:
        if any(
            path == own or path.startswith(own + "/") or own.startswith(path + "/")
            for own in _OWN_MOUNTS
        ):
            raise ValueError(_SHADOWS)
        return path


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
                },
                {
                    "rule": "!has(self.volumeMounts) || self.volumeMounts.all(m, "
                    "has(self.volumes) && self.volumes.exists(v, v.name == m.name))",
                    "message": "each of volumeMounts names one of volumes",
                },
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
    affinity: Annotated[Affinity, WithJsonSchema(_FREE_FORM)] | None = Field(
        None,
        description="core/v1 Affinity, as a Deployment stores it: no unknown fields, nulls, "
        "empty lists or empty maps",
    )
    service_account_name: ObjectName | None = None
    image_pull_secrets: tuple[LocalObjectReference, ...] = Field(
        (), max_length=16, description="Secrets in this namespace to pull the image with"
    )
    pod_annotations: Annotations = Field(
        default_factory=dict,
        max_length=64,
        json_schema_extra=_not_the_operators("pod_annotations"),
    )
    pod_labels: Labels = Field(
        default_factory=dict,
        max_length=64,
        description="besides the operator's; never the two that select the pods",
        json_schema_extra=_not_the_operators("pod_labels"),
    )
    priority_class_name: ObjectName | None = None
    topology_spread_constraints: tuple[TopologySpreadConstraint, ...] | None = Field(
        None,
        max_length=8,
        description="replace the default spread by zone and node, ScheduleAnyway ([]: none)",
    )
    volumes: tuple[Volume, ...] = Field(
        (),
        max_length=32,
        description="configMap, secret, emptyDir or projected",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["name"]},
    )
    volume_mounts: tuple[VolumeMount, ...] = Field(
        (),
        max_length=32,
        description="of the worker container; not at, in or above /etc/luaq or /tmp",
        json_schema_extra={
            "x-kubernetes-list-type": "map",
            "x-kubernetes-list-map-keys": ["mountPath"],
        },
    )

    @field_validator("pod_labels", "pod_annotations")
    @classmethod
    def _no_operator_keys(cls, value: dict[str, str], info: ValidationInfo) -> dict[str, str]:
        keys, message = _OPERATORS[str(info.field_name)]
        if any(key in value for key in keys):
            raise ValueError(f"{message}, the operator's")
        return value

    @field_validator("volumes")
    @classmethod
    def _unique_volumes(cls, volumes: tuple[Volume, ...]) -> tuple[Volume, ...]:
        names = [volume.name for volume in volumes]
        if twice := sorted({name for name in names if names.count(name) > 1}):
            raise ValueError(f"more than one volume named {', '.join(twice)}")
        return volumes

    @field_validator("volume_mounts")
    @classmethod
    def _mounts(
        cls, mounts: tuple[VolumeMount, ...], info: ValidationInfo
    ) -> tuple[VolumeMount, ...]:
        """Each of a declared volume, each at a path of its own."""
        declared = {volume.name for volume in info.data.get("volumes", ())}
        if unknown := sorted({m.name for m in mounts} - declared):
            raise ValueError(f"no volume named {', '.join(unknown)}")
        paths = [mount.mount_path for mount in mounts]
        if twice := sorted({path for path in paths if paths.count(path) > 1}):
            raise ValueError(f"more than one mount at {', '.join(twice)}")
        return mounts

    @model_validator(mode="after")
    def _one_source(self) -> QueueConsumerSpec:
        if (self.source is None) == (self.source_ref is None):
            raise ValueError("give exactly one of source (inline Lua) or sourceRef")
        return self


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
    path, loc = "spec", error["loc"]
    for n, part in enumerate(loc):
        if isinstance(part, int):
            path += f"[{part}]"
        elif error["type"] == "extra_forbidden" and n == len(loc) - 1:
            path += f".{part}"  # an unknown field, as it was written
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
