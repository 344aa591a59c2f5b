"""The actions: one QueueConsumer brought to what it declares, and its status told.

A pass validates everything first (the spec with the entries models, the Secrets and the Lua
source with `luaq check`'s own function); a QueueConsumer that does not validate leaves its
running objects as they are and says why in its Degraded condition. A valid one gets its
ConfigMap, Deployment and Service created, updated or restored; a second pass changes nothing.
"""

from __future__ import annotations

import copy
import hashlib
import json
import logging
import tempfile
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from kubernetes.utils import parse_quantity
from luaq.runtime.check import check
from luaq.runtime.entries import AmqpDriverEntry, Config, resolve_id
from luaq.runtime.errors import ConfigError, QueueError

from . import render
from .autoscale import BacklogReader, decide
from .kube import CONFIG_MAPS, DEPLOYMENTS, QUEUE_CONSUMERS, SERVICES, Kind, Kube
from .metrics import Metrics
from .resource import InvalidSpec, QueueConsumerSpec, parse_spec
from .settings import OperatorSettings

_log = logging.getLogger("luaq.operator")

SPEC_HASH = "luaq.dev/spec-hash"
PostEvent = Callable[[Mapping[str, Any], str, str, str], None]
Call = Callable[..., Awaitable[Any]]  # runs a blocking function off the event loop


class Invalid(Exception):
    """The QueueConsumer cannot be applied as it is: `reason` names the kind of problem."""

    def __init__(self, reason: str, message: str) -> None:
        super().__init__(message)
        self.reason = reason
        self.message = message


@dataclass
class ConsumerState:
    """What the operator remembers of one QueueConsumer between passes."""

    reader: BacklogReader | None = None
    backlog: int | None = None
    backlog_read: float = float("-inf")
    desired: int | None = None
    last_scale: datetime | None = None
    events: dict[str, str] = field(default_factory=dict)
    status: dict[str, Any] | None = None  # what this operator wrote last (it is the only writer)
    # The last check: a digest of the files and environment, and its outcome.
    checked: tuple[str, Config | Invalid] | None = None

    async def close(self) -> None:
        if self.reader is not None:
            await self.reader.close()
            self.reader = None


def _now() -> datetime:
    return datetime.now(UTC)


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%SZ")


def contains(actual: Any, desired: Any) -> bool:
    """Whether `actual` has everything `desired` says (what the API server added is ignored)."""
    if isinstance(desired, dict):
        return isinstance(actual, dict) and all(
            key in actual and contains(actual[key], value) for key, value in desired.items()
        )
    if isinstance(desired, list):
        return (
            isinstance(actual, list)
            and len(actual) == len(desired)
            and all(contains(a, d) for a, d in zip(actual, desired, strict=True))
        )
    return bool(actual == desired)


def _canonical(manifest: dict[str, Any]) -> dict[str, Any]:
    """Resource quantities as numbers: the API server writes `0.5` back as `500m`."""
    manifest = copy.deepcopy(manifest)
    containers = manifest.get("spec", {}).get("template", {}).get("spec", {}).get("containers", [])
    for container in containers:
        for group in (container.get("resources") or {}).values():
            for key, value in group.items():
                group[key] = str(parse_quantity(value))
    return manifest


def digest(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _condition(
    previous: Mapping[str, Mapping[str, Any]],
    kind: str,
    true: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> dict[str, Any]:
    status = "True" if true else "False"
    before = previous.get(kind, {})
    changed = before.get("status") != status
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": before.get("lastTransitionTime") if not changed else _time(_now()),
        "observedGeneration": generation,
    }


def status_for(
    body: Mapping[str, Any],
    previous_status: Mapping[str, Any],
    desired: int | None,
    deployment: Mapping[str, Any] | None,
    invalid: Invalid | None,
    state: ConsumerState,
) -> dict[str, Any]:
    """The status a pass reports: what was observed of the Deployment, and the conditions."""
    meta = body["metadata"]
    generation = meta.get("generation")
    observed = (deployment or {}).get("status") or {}
    replicas = int(observed.get("replicas") or 0)
    ready = int(observed.get("readyReplicas") or 0)
    updated = int(observed.get("updatedReplicas") or 0)
    wanted = int(
        (deployment or {}).get("spec", {}).get("replicas", 0) if desired is None else desired
    )
    previous = {c["type"]: c for c in previous_status.get("conditions") or []}
    rolled_out = deployment is not None and (
        int(observed.get("observedGeneration") or 0)
        >= int(deployment["metadata"].get("generation") or 0)
        and updated >= wanted
        and replicas == updated
    )
    if deployment is None:
        progress = ("Creating", "the worker Deployment does not exist yet")
    elif rolled_out:
        progress = ("UpToDate", f"{updated} replica(s) run the current configuration")
    else:
        progress = ("RollingOut", f"{updated} of {wanted} replica(s) updated")
    if rolled_out and wanted == 0:
        readiness = (True, "ScaledToZero", "no replicas are wanted")
    elif rolled_out and ready >= wanted:
        readiness = (True, "ReplicasReady", f"{ready} of {wanted} replica(s) ready")
    else:
        readiness = (False, "WaitingForReplicas", f"{ready} of {wanted} replica(s) ready")
    degraded = (True, invalid.reason, invalid.message) if invalid else (False, "Valid", "")
    conditions = [
        _condition(previous, "Ready", *readiness, generation),
        _condition(previous, "Progressing", not rolled_out, *progress, generation),
        _condition(previous, "Degraded", *degraded, generation),
    ]
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "desiredReplicas": wanted,
        "selector": render.selector(meta["name"]),
        "backlog": state.backlog,
        "lastScaleTime": _time(state.last_scale) if state.last_scale else None,
        "conditions": conditions,
    }


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        metrics: Metrics,
        schema: Mapping[str, Any],
        post_event: PostEvent,
        call: Call,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.metrics = metrics
        self.schema = schema
        self.post_event = post_event
        self._call = call

    async def reconcile(self, body: Mapping[str, Any], state: ConsumerState) -> str:
        """One pass; returns the outcome (ok, invalid), raises on API or broker failures."""
        body = copy.deepcopy(dict(body))
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            spec = parse_spec(body.get("spec") or {}, self.schema)
            source = await self._source(namespace, spec)
            environ = await self._environment(namespace, spec)
            data = render.config_data(name, spec, source)
            config = await self._checked(data, environ, state)
        except (Invalid, InvalidSpec) as exc:
            invalid = exc if isinstance(exc, Invalid) else Invalid("InvalidSpec", str(exc))
            running = await self._call(
                self.kube.get, DEPLOYMENTS, namespace, render.Names(name).deployment
            )
            await self._report(body, state, None, running, invalid)
            return "invalid"
        # the Secrets' values too, so that a rotated password rolls the pods (their env has it)
        secrets = {variable: environ[variable] for variable in render.secret_refs(spec)}
        checksum = render.checksum(data, secrets)
        desired = await self._replicas(body, spec, state, config, checksum)
        owned = [
            (CONFIG_MAPS, render.config_map(body, data)),
            (DEPLOYMENTS, render.deployment(body, spec, self.settings, checksum, desired)),
            (SERVICES, render.service(body, self.settings)),
        ]
        deployment: dict[str, Any] | None = None
        try:
            for kind, manifest in owned:
                actual = await self._apply(body, kind, manifest)
                if kind is DEPLOYMENTS:
                    deployment = actual
        except Invalid as exc:
            await self._report(body, state, desired, deployment, exc)
            return "invalid"
        await self._report(body, state, desired, deployment, None)
        return "ok"

    async def _source(self, namespace: str, spec: QueueConsumerSpec) -> str:
        if spec.source is not None:
            return spec.source
        assert spec.source_ref is not None  # one of the two, validated
        ref = spec.source_ref
        config_map = await self._call(self.kube.get, CONFIG_MAPS, namespace, ref.config_map_name)
        text = ((config_map or {}).get("data") or {}).get(ref.key)
        if text is None:
            what = "does not exist" if config_map is None else f"has no key {ref.key}"
            raise Invalid("SourceMissing", f"ConfigMap {ref.config_map_name} {what}")
        return str(text)

    async def _environment(self, namespace: str, spec: QueueConsumerSpec) -> dict[str, str]:
        """The environment the pod will have, as far as the entries file reads it."""
        environ = {env.name: env.value for env in spec.env if env.value is not None}
        for variable, ref in render.secret_refs(spec).items():
            value = await self._call(self.kube.secret_value, namespace, ref.name, ref.key)
            if value is None:
                raise Invalid(
                    "BrokerSecretMissing",
                    f"Secret {ref.name} with key {ref.key} not found in namespace {namespace}",
                )
            environ[variable] = value
        return environ

    async def _checked(
        self, data: Mapping[str, str], environ: Mapping[str, str], state: ConsumerState
    ) -> Config:
        """The check of the last pass, when nothing it reads has changed since."""
        key = digest({"data": data, "environ": environ})
        if state.checked is None or state.checked[0] != key:
            try:
                outcome: Config | Invalid = await self._call(self._check, data, environ)
            except Invalid as exc:
                outcome = exc
            state.checked = (key, outcome)
        outcome = state.checked[1]
        if isinstance(outcome, Invalid):
            raise Invalid(outcome.reason, outcome.message)
        return outcome

    def _check(self, data: Mapping[str, str], environ: Mapping[str, str]) -> Config:
        """`luaq check` on the ConfigMap's files, with the pod's environment."""
        with tempfile.TemporaryDirectory(prefix="luaq-check-") as tmp:
            directory = Path(tmp).resolve()
            for file_name, text in data.items():
                (directory / file_name).write_text(text, encoding="utf-8")
            try:
                worker = check([directory / render.ENTRIES_FILE], self.settings.validation, environ)
            except ConfigError as exc:
                problems = [problem.replace(f"{directory}/", "") for problem in exc.problems]
                lua = any(": source: " in problem for problem in problems)
                raise Invalid(
                    "InvalidSource" if lua else "InvalidSpec", "; ".join(problems)
                ) from None
            return worker.config

    async def _replicas(
        self,
        body: Mapping[str, Any],
        spec: QueueConsumerSpec,
        state: ConsumerState,
        config: Config,
        checksum: str,
    ) -> int:
        scaling = spec.autoscaling
        if scaling is None:
            await state.close()
            state.backlog = state.last_scale = state.desired = None
            return spec.replicas
        status = body.get("status") or {}
        if state.desired is None:  # a restarted operator goes on from what it reported
            state.desired = status.get("desiredReplicas", scaling.min_replicas)
            last = status.get("lastScaleTime")
            state.last_scale = datetime.fromisoformat(last.replace("Z", "+00:00")) if last else None
        due = time.monotonic() - state.backlog_read >= self.settings.autoscale_seconds
        if state.reader is None or state.reader.checksum != checksum:
            await state.close()
            driver = config.drivers[resolve_id(render.BROKER_ID, spec.id_namespace)]
            assert isinstance(driver, AmqpDriverEntry)
            state.reader = BacklogReader(driver, config.queues[spec.queue], checksum)
            due = True
        current = min(max(int(state.desired or 0), scaling.min_replicas), scaling.max_replicas)
        if due:
            state.backlog_read = time.monotonic()
            try:
                state.backlog = await state.reader.backlog()
            except (QueueError, OSError) as exc:
                message = getattr(exc, "message", str(exc))
                self._event_once(body, state, "Warning", "BacklogUnavailable", message)
                _log.warning("backlog of %s: %s", spec.queue, message)
                await state.close()
                return current
            state.events.pop("BacklogUnavailable", None)
            since = (_now() - state.last_scale).total_seconds() if state.last_scale else None
            target = decide(state.backlog, scaling, current, since)
            if target != current:
                state.last_scale = _now()
                self.post_event(
                    body,
                    "Normal",
                    "Scaled",
                    f"{current} -> {target} replicas (backlog {state.backlog})",
                )
            current = target
        state.desired = current
        return current

    async def _apply(
        self, body: Mapping[str, Any], kind: Kind, manifest: dict[str, Any]
    ) -> dict[str, Any]:
        meta = manifest["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        wanted = _canonical(manifest)
        meta.setdefault("annotations", {})[SPEC_HASH] = digest(wanted)
        actual: dict[str, Any] | None = await self._call(self.kube.get, kind, namespace, name)
        what = f"{manifest['kind']} {name}"
        if actual is None:
            created: dict[str, Any] = await self._call(self.kube.create, kind, namespace, manifest)
            self.post_event(body, "Normal", "Created", f"created {what}")
            return created
        owners = actual["metadata"].get("ownerReferences") or []
        if not any(owner.get("uid") == body["metadata"]["uid"] for owner in owners):
            raise Invalid(
                "NameConflict", f"{what} exists and does not belong to this QueueConsumer"
            )
        if contains(_canonical(actual), {**wanted, "metadata": meta}):
            return actual
        updated = (actual["metadata"].get("annotations") or {}).get(SPEC_HASH) != digest(wanted)
        patched: dict[str, Any] = await self._call(self.kube.patch, kind, namespace, name, manifest)
        if updated:
            self.post_event(body, "Normal", "Updated", f"updated {what}")
        else:
            self.post_event(body, "Normal", "Restored", f"restored {what}, changed by hand")
        return patched

    def _event_once(
        self, body: Mapping[str, Any], state: ConsumerState, kind: str, reason: str, message: str
    ) -> None:
        if state.events.get(reason) != message:
            state.events[reason] = message
            self.post_event(body, kind, reason, message)

    async def _report(
        self,
        body: Mapping[str, Any],
        state: ConsumerState,
        desired: int | None,
        deployment: Mapping[str, Any] | None,
        invalid: Invalid | None,
    ) -> None:
        meta = body["metadata"]
        current = state.status if state.status is not None else body.get("status") or {}
        status = status_for(body, current, desired, deployment, invalid, state)
        if invalid is not None:
            self._event_once(body, state, "Warning", invalid.reason, invalid.message)
        else:
            state.events.clear()
        self.metrics.desired.labels(meta["namespace"], meta["name"]).set(status["desiredReplicas"])
        self.metrics.ready.labels(meta["namespace"], meta["name"]).set(status["readyReplicas"])
        if any(current.get(key) != value for key, value in status.items()):
            await self._call(
                self.kube.patch,
                QUEUE_CONSUMERS,
                meta["namespace"],
                meta["name"],
                {"status": status},
                "status",
            )
        state.status = status
