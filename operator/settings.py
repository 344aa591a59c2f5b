"""The operator's settings: one object, built by `luaq-operator` from flags and environment."""

from __future__ import annotations

from dataclasses import dataclass, field

from luaq.runtime.settings import Settings as RuntimeSettings

DEFAULT_IMAGE = "ghcr.io/luaq/luaq:0.1.0"


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
    # Limits for loading a QueueConsumer's Lua source while validating it (as `luaq check`).
    validation: RuntimeSettings = field(
        default_factory=lambda: RuntimeSettings(lua_max_memory=64 * 2**20)
    )
