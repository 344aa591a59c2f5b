"""The operator's settings: one object, built by `luaq-operator` from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from luaq.runtime.settings import Settings as RuntimeSettings

DEFAULT_IMAGE = "ghcr.io/luaq/luaq:0.1.0"


@dataclass(frozen=True)
class Policy:
    """What a QueueConsumer may ask for (policy.py checks a spec against it)."""

    # Globs (fnmatch) the worker image must match: `registry.example/luaq:*`.
    images: tuple[str, ...] = ("*",)
    # Globs the pods' service account must match (the namespace's `default` when none is named).
    service_accounts: tuple[str, ...] = ("*",)
    # Whether `env` and `volumes` may take values from the namespace's Secrets
    # (`valueFrom.secretKeyRef`, a `secret` volume or projected source); the broker's own
    # Secrets are always read.
    secret_env: bool = True
    max_replicas: int = 1000  # also autoscaling's maxReplicas
    max_processes: int = 64
    # The largest cpu and memory a container may request or be limited to (quantities).
    max_cpu: str | None = None
    max_memory: str | None = None


@dataclass(frozen=True)
class OperatorSettings:
    # What the watched QueueConsumers' pods run unless their spec names an image.
    image: str = DEFAULT_IMAGE
    # Namespaces to watch; empty means every namespace.
    namespaces: tuple[str, ...] = ()
    # The port of the workers' /metrics, /healthz and /readyz (`luaq run --metrics-port`).
    worker_metrics_port: int = 9090
    # The operator's own /metrics; 0 turns it off.
    metrics_port: int = 8080
    # Drift and referenced ConfigMaps are also caught by a full pass this often.
    resync_seconds: float = 60.0
    # How often the autoscaler reads the backlog of each autoscaled QueueConsumer.
    autoscale_seconds: float = 10.0
    # Leader election: only the holder of this Lease acts; the others wait, ready.
    lease_name: str = "luaq-operator"
    lease_namespace: str = "default"
    lease_seconds: float = 15.0
    # Who this replica is in the Lease (the pod name in a cluster).
    identity: str = ""
    # Limits for loading a QueueConsumer's Lua source while validating it (as `luaq check`,
    # in a child process), and how many such checks run at once: a burst of QueueConsumers
    # costs the operator at most this many children.
    validation: RuntimeSettings = field(
        default_factory=lambda: RuntimeSettings(lua_max_memory=64 * 2**20)
    )
    check_timeout: float = 20.0
    check_concurrency: int = 2
    # What a QueueConsumer may ask for (images, service accounts, Secrets in env and volumes,
    # sizes).
    policy: Policy = field(default_factory=Policy)
    # Watches: each watch request asks the API server to end it after this long (an integer,
    # as timeoutSeconds must be), and the operator gives up on it this much later, so a stream
    # cut without a FIN is replaced; liveness fails when one is not re-established for three
    # such periods (luaq.operator.watching).
    watch_seconds: int = 60
    watch_connect_seconds: float = 10.0
