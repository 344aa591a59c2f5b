"""What a QueueConsumer must be before anything of it is applied: its spec valid by the CRD's
schema and within the cluster admin's policy, its files passing `luaq check` (that command's
own function: the operator and the CLI agree). What is not is Degraded with the reason and the
problems found, and nothing of it is applied.

The policy is the admin's bounds on the pods a QueueConsumer makes. Creating a QueueConsumer
creates a Deployment in its namespace: pods that run an image, as a service account, with values
of the namespace's Secrets in their environment or their volumes, and, with a projected
serviceAccountToken, a token of that account. Where every team that may write QueueConsumers
may also create Deployments, that is nothing new; where it is not, the admin bounds it here
(operator flags, chart values): a spec outside the bounds is Degraded with reason `NotAllowed`.
"""

from __future__ import annotations

import tempfile
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from pathlib import Path
from typing import Any

from kubernetes.utils import parse_quantity
from luaq.runtime.check import check
from luaq.runtime.entries import Config
from luaq.runtime.errors import ConfigError

from .resource import InvalidSpec, QueueConsumerSpec, VolumeProjection, parse_spec
from .settings import OperatorSettings, Policy


class Invalid(Exception):
    """The QueueConsumer cannot be applied as it is: `reason` names the kind of problem."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass(frozen=True)
class Inputs:
    """Everything a pass reads besides what it owns: the resource, its spec (valid, allowed)
    and what it references."""

    body: dict[str, Any]
    spec: QueueConsumerSpec
    source: str
    environ: dict[str, str]  # the pod's environment, as far as its entries file reads it


@dataclass(frozen=True)
class Checked:
    """What `luaq check` said of a QueueConsumer's files with its pods' environment, which `key`
    digests: a later pass checks again only when they change."""

    key: str
    outcome: Config | Invalid

    def config(self) -> Config:
        """The entries as the check loaded them; raises what it found wrong."""
        if isinstance(self.outcome, Invalid):
            raise Invalid(self.outcome.reason, self.outcome.message)
        return self.outcome


def admitted(
    spec: Mapping[str, Any], schema: Mapping[str, Any], settings: OperatorSettings
) -> QueueConsumerSpec:
    """The spec (as the API serves it, `schema` the CRD's), valid and within the admin's policy."""
    try:
        parsed = parse_spec(spec, schema)
    except InvalidSpec as exc:
        raise Invalid("InvalidSpec", str(exc)) from None
    image = parsed.image or settings.image
    if refused := violations(parsed, image, settings.policy):
        raise Invalid("NotAllowed", "; ".join(refused))
    return parsed


def check_files(
    files: Mapping[str, str], entries: str, environ: Mapping[str, str], settings: OperatorSettings
) -> Config:
    """`luaq check` (blocking) on a QueueConsumer's files, `entries` the entries file among them,
    with its pods' environment; problems in the Lua source make it InvalidSource."""
    with tempfile.TemporaryDirectory(prefix="luaq-check-") as tmp:
        directory = Path(tmp).resolve()
        for file_name, text in files.items():
            (directory / file_name).write_text(text, encoding="utf-8")
        try:
            return check(
                [directory / entries], settings.validation, environ, settings.check_timeout
            )
        except ConfigError as exc:
            problems = [problem.replace(f"{directory}/", "") for problem in exc.problems]
            lua = any(": source: " in p or "Lua source" in p for p in problems)
            raise Invalid("InvalidSource" if lua else "InvalidSpec", "; ".join(problems)) from None


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
