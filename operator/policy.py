"""What a QueueConsumer may ask for: the cluster admin's bounds on the pods it makes.

Creating a QueueConsumer creates a Deployment in its namespace: pods that run an image, as a
service account, with values of the namespace's Secrets in their environment or their volumes,
and, with a projected serviceAccountToken, a token of that account. Where every team
that may write QueueConsumers may also create Deployments, that is nothing new; where it is not,
the admin bounds it here (operator flags, chart values). A spec outside the bounds is Degraded
with reason `NotAllowed`, and nothing of it is applied.
"""

from __future__ import annotations

from collections.abc import Iterator
from fnmatch import fnmatchcase

from kubernetes.utils import parse_quantity

from .resource import QueueConsumerSpec, VolumeProjection
from .settings import Policy


def violations(spec: QueueConsumerSpec, image: str, policy: Policy) -> list[str]:
    """What `spec` asks for beyond `policy`, each as `spec.field: what`; `image` is the one its
    pods would run (the spec's, or the operator's default)."""
    found = []
    if not any(fnmatchcase(image, pattern) for pattern in policy.images):
        found.append(f"spec.image: {image} is not among the allowed images")
    account = spec.service_account_name or "default"
    allowed = any(fnmatchcase(account, pattern) for pattern in policy.service_accounts)
    if not allowed:
        found.append(f"spec.serviceAccountName: {account} is not an allowed service account")
        found += [
            f"{where}.serviceAccountToken: a token of {account}, not an allowed service account"
            for where, projection in _projections(spec)
            if projection.service_account_token is not None
        ]
    if not policy.secret_env:
        for index, variable in enumerate(spec.env):
            if "secretKeyRef" in (variable.value_from or {}):
                found.append(f"spec.env[{index}].valueFrom: Secrets are not allowed in env")
        for index, volume in enumerate(spec.volumes):
            if volume.secret is not None:
                found.append(f"spec.volumes[{index}].secret: Secrets are not allowed in volumes")
        found += [
            f"{where}.secret: Secrets are not allowed in volumes"
            for where, projection in _projections(spec)
            if projection.secret is not None
        ]
    replicas = spec.autoscaling.max_replicas if spec.autoscaling else spec.replicas
    if replicas > policy.max_replicas:
        found.append(f"spec.replicas: {replicas} is over the allowed {policy.max_replicas}")
    if spec.processes > policy.max_processes:
        found.append(f"spec.processes: {spec.processes} is over the allowed {policy.max_processes}")
    resources = spec.resources
    for name, most in (("cpu", policy.max_cpu), ("memory", policy.max_memory)):
        if most is None or resources is None:
            continue
        for group, asked in (("requests", resources.requests), ("limits", resources.limits)):
            if name in asked and parse_quantity(asked[name]) > parse_quantity(most):
                found.append(
                    f"spec.resources.{group}.{name}: {asked[name]} is over the allowed {most}"
                )
    return found


def _projections(spec: QueueConsumerSpec) -> Iterator[tuple[str, VolumeProjection]]:
    """The sources of the projected volumes, each with where it is in the spec."""
    for volume, declared in enumerate(spec.volumes):
        if declared.projected is not None:
            for index, projection in enumerate(declared.projected.sources):
                yield f"spec.volumes[{volume}].projected.sources[{index}]", projection
