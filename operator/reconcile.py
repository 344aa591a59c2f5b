"""One pass over a QueueConsumer, read top-down: gather its inputs, render the desired state (a
pure function, render.desired), apply it with a semantic comparison, report the status.

A QueueConsumer that does not validate (the spec with the entries models, the admin's policy,
the Secrets and the Lua source with `luaq check`'s own function), or whose objects the API
server refuses, is Degraded with the reason and the API's message, and what runs is left as it
is. A valid one gets its ConfigMap (immutable, named by its content), its Deployment switched to
that ConfigMap, its Service, and a PodDisruptionBudget while it keeps more than one pod;
ConfigMaps of earlier configurations go once the rollout is done. An owned object changed
by hand is restored, fields added to it included; a second pass changes nothing.
"""

from __future__ import annotations

import asyncio
import copy
import hashlib
import json
import logging
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

from kubernetes.client.exceptions import ApiException
from kubernetes.utils import parse_quantity

from . import render
from .autoscale import Decision, Scaling
from .kube import (
    CONFIG_MAPS,
    DEPLOYMENTS,
    POD_DISRUPTION_BUDGETS,
    QUEUE_CONSUMERS,
    SERVICES,
    Kube,
)
from .policy import Checked, Inputs, Invalid, admitted, check_files
from .settings import OperatorSettings

_log = logging.getLogger("luaq.operator")

SPEC_HASH = "luaq.dev/spec-hash"
BACKOFF = (1.0, 2.0, 5.0, 10.0, 30.0, 60.0)  # after one failed pass, two, ...
PostEvent = Callable[[Mapping[str, Any], str, str, str], None]
Call = Callable[..., Awaitable[Any]]  # runs a blocking function off the event loop
RESOURCES = {
    "ConfigMap": CONFIG_MAPS,
    "Deployment": DEPLOYMENTS,
    "Service": SERVICES,
    "PodDisruptionBudget": POD_DISRUPTION_BUDGETS,
}
# Service fields the API server allocates: a replacement keeps them as they are.
_ALLOCATED = ("clusterIP", "clusterIPs", "ipFamilies", "ipFamilyPolicy")


@dataclass
class ConsumerState:
    """What the operator remembers of one QueueConsumer between passes."""

    scaling: Scaling = field(default_factory=Scaling)
    # The Warning Events posted and still standing, by topic: one Event per change.
    warnings: dict[str, tuple[str, str]] = field(default_factory=dict)
    status: dict[str, Any] | None = None  # what this operator wrote last (it is the only writer)
    checked: Checked | None = None  # the last check
    # Of each owned object, a fingerprint of what the API server stored after this operator
    # last wrote or saw it in the desired state: anything else is a change by hand.
    stored: dict[str, str] = field(default_factory=dict)
    failures: int = 0  # passes failed in a row, which the next one's backoff follows

    async def close(self) -> None:
        await self.scaling.close()


@dataclass(frozen=True)
class Result:
    """What a pass came to: its outcome (ok, invalid, error), which the metrics and the status
    record, the seconds until the next pass, unless a change wakes it first, and the reads of
    the backlog that failed in it."""

    outcome: str
    requeue_after: float
    read_errors: int = 0


def requeue_after(failures: int, autoscaled: bool, settings: OperatorSettings) -> float:
    """The wait before the next pass: after `failures` failed passes in a row, a backoff; else
    the autoscaler's period, when it reads a backlog each pass; else the resync period."""
    if failures:
        return BACKOFF[min(failures, len(BACKOFF)) - 1]
    return settings.autoscale_seconds if autoscaled else settings.resync_seconds


def _now() -> datetime:
    return datetime.now(UTC)


def _timestamp(value: datetime) -> str:
    """A Kubernetes Time (seconds), for conditions and lastScaleTime."""
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
    """Quantities (resources, emptyDir sizes) as numbers: the API server writes `0.5` back as
    `500m`."""
    manifest = copy.deepcopy(manifest)
    pod = manifest.get("spec", {}).get("template", {}).get("spec", {})
    for container in pod.get("containers", []):
        for group in (container.get("resources") or {}).values():
            for key, value in group.items():
                group[key] = f"{parse_quantity(value).normalize():f}"
    for volume in pod.get("volumes", []):
        empty_dir = volume.get("emptyDir") or {}
        if "sizeLimit" in empty_dir:
            empty_dir["sizeLimit"] = f"{parse_quantity(empty_dir['sizeLimit']).normalize():f}"
    return manifest


def digest(manifest: Mapping[str, Any]) -> str:
    return hashlib.sha256(json.dumps(manifest, sort_keys=True).encode()).hexdigest()[:16]


def _fingerprint(stored: Mapping[str, Any]) -> str:
    """Of what an owned object says (not its metadata, which others annotate too)."""
    return digest({key: stored.get(key) for key in ("spec", "data", "immutable")})


def _rolled_out(deployment: Mapping[str, Any] | None, wanted: int) -> bool:
    if deployment is None:
        return False
    observed = deployment.get("status") or {}
    updated = int(observed.get("updatedReplicas") or 0)
    return (
        int(observed.get("observedGeneration") or 0)
        >= int(deployment["metadata"].get("generation") or 0)
        and updated >= wanted
        and int(observed.get("replicas") or 0) == updated
    )


def _rollout_failure(deployment: Mapping[str, Any] | None) -> str | None:
    """The Deployment controller's message when the rollout passed its progress deadline."""
    for condition in ((deployment or {}).get("status") or {}).get("conditions") or []:
        if condition.get("type") == "Progressing" and (
            condition.get("reason") == "ProgressDeadlineExceeded"
        ):
            return str(condition.get("message") or "the rollout passed its progress deadline")
    return None


# Characters of a condition's message (the CRD allows 32768): what is wrong with a spec may
# quote as much as the tenant wrote, and an API server refuses a status over its schema's bound.
MESSAGE_MOST = 4096


def _condition(
    previous: Mapping[str, Mapping[str, Any]],
    kind: str,
    true: bool,
    reason: str,
    message: str,
    generation: int | None,
) -> dict[str, Any]:
    if len(message) > MESSAGE_MOST:
        cut = f"... ({len(message) - MESSAGE_MOST + 64} more characters)"
        message = message[: MESSAGE_MOST - 64] + cut
    status = "True" if true else "False"
    before = previous.get(kind, {})
    since = before.get("lastTransitionTime")
    if before.get("status") != status:
        since = _timestamp(_now())
    return {
        "type": kind,
        "status": status,
        "reason": reason,
        "message": message,
        "lastTransitionTime": since,
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
    """The status a pass reports: what was observed of the Deployment, and the conditions, which
    follow the Deployment's own (a rollout past its deadline is a failure, not progress)."""
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
    rolled_out = _rolled_out(deployment, wanted)
    failure = None if rolled_out else _rollout_failure(deployment)
    if deployment is None:
        progress = (False, "NotCreated", "no worker Deployment: nothing was applied")
    elif rolled_out:
        progress = (False, "UpToDate", f"{updated} replica(s) run the current configuration")
    elif failure is not None:
        progress = (False, "RolloutFailed", failure)
    else:
        progress = (True, "RollingOut", f"{updated} of {wanted} replica(s) updated")
    if rolled_out and wanted == 0:
        readiness = (True, "ScaledToZero", "no replicas are wanted")
    elif rolled_out and ready >= wanted:
        readiness = (True, "ReplicasReady", f"{ready} of {wanted} replica(s) ready")
    else:
        readiness = (False, "WaitingForReplicas", f"{ready} of {wanted} replica(s) ready")
    if invalid is not None:
        degraded = (True, invalid.reason, invalid.message)
    elif failure is not None:
        degraded = (True, "RolloutFailed", failure)
    else:
        degraded = (False, "Valid", "")
    conditions = [
        _condition(previous, "Ready", *readiness, generation),
        _condition(previous, "Progressing", *progress, generation),
        _condition(previous, "Degraded", *degraded, generation),
    ]
    return {
        "observedGeneration": generation,
        "replicas": replicas,
        "readyReplicas": ready,
        "desiredReplicas": wanted,
        "selector": render.selector(meta["name"]),
        "backlog": state.scaling.backlog,
        "lastScaleTime": _timestamp(state.scaling.last_scale) if state.scaling.last_scale else None,
        "conditions": conditions,
    }


def _refusal(exc: ApiException) -> str:
    """The API server's own message for a refused request."""
    try:
        return str(json.loads(exc.body or "{}").get("message") or exc.reason)
    except ValueError:
        return str(exc.reason)


class Reconciler:
    def __init__(
        self,
        kube: Kube,
        settings: OperatorSettings,
        schema: Mapping[str, Any],
        post_event: PostEvent,
        call: Call,
        checks: asyncio.Semaphore,
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.schema = schema
        self.post_event = post_event
        self._call = call
        self._checks = checks  # shared by every QueueConsumer: how many checks run at once

    async def reconcile(self, resource: Mapping[str, Any], state: ConsumerState) -> Result:
        """One pass, and when the next is due; an API or broker failure is an error outcome, and
        so is a pass that applied replicas no current backlog calls for (it could not be read)."""
        read_errors = state.scaling.read_errors
        try:
            outcome = await self._pass(resource, state)
            state.failures = 0
            if outcome == "ok" and state.scaling.unavailable is not None:
                outcome = "error"  # the reader retries when due: no backoff
        except Exception as exc:
            outcome = "error"
            state.failures += 1
            meta = resource["metadata"]
            _log.warning(
                "reconcile %s/%s failed: %s", meta["namespace"], meta["name"], exc, exc_info=True
            )
        autoscaled = (resource.get("spec") or {}).get("autoscaling") is not None
        return Result(
            outcome,
            requeue_after(state.failures, autoscaled, self.settings),
            state.scaling.read_errors - read_errors,
        )

    async def _pass(self, resource: Mapping[str, Any], state: ConsumerState) -> str:
        """One pass; returns the outcome (ok, invalid), raises on API or broker failures."""
        body = copy.deepcopy(dict(resource))  # kopf's view changes while the pass awaits
        meta = body["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        try:
            inputs = await self._inputs(body)
            config = (await self._checked(inputs, state)).config()
        except Invalid as exc:
            running = await self._call(
                self.kube.get, DEPLOYMENTS, namespace, render.Names(name).deployment
            )
            await self._report(body, state, None, running, exc)
            return "invalid"
        decision = await state.scaling.replicas(
            inputs.spec, body.get("status") or {}, config, self.settings.autoscale_seconds, _now()
        )
        replicas = self._scaled(body, state, decision)
        secrets = {
            variable: inputs.environ[variable] for variable in render.secret_refs(inputs.spec)
        }
        desired = render.desired(body, inputs.spec, self.settings, inputs.source, secrets, replicas)
        try:
            applied = {m["kind"]: await self._apply(body, m, state) for m in desired.manifests}
        except Invalid as exc:
            running = await self._call(
                self.kube.get, DEPLOYMENTS, namespace, render.Names(name).deployment
            )
            await self._report(body, state, replicas, running, exc)
            return "invalid"
        deployment = applied["Deployment"]
        for kind, unwanted in desired.unwanted:
            await self._remove(body, kind, unwanted, state)
        if _rolled_out(deployment, replicas):
            await self._collect(body, desired.config_map["metadata"]["name"], state)
        await self._report(body, state, replicas, deployment, None)
        return "ok"

    # -- inputs -----------------------------------------------------------------------------

    async def _inputs(self, body: dict[str, Any]) -> Inputs:
        """The spec, valid and within the admin's policy, and what it references in its own
        namespace: the Lua source and the Secrets of the pod's environment (as far as its
        entries file reads it)."""
        namespace = body["metadata"]["namespace"]
        spec = admitted(body.get("spec") or {}, self.schema, self.settings)
        source = spec.source
        if source is None:
            ref = spec.source_ref
            assert ref is not None  # one of the two, validated
            source = await self._config_map_text(namespace, ref.config_map_name, ref.key)
        environ = {env.name: env.value for env in spec.env if env.value is not None}
        for variable, secret in render.secret_refs(spec).items():
            value = await self._secret_text(namespace, secret.name, secret.key)
            # a path would name a file of the operator's as it checks and reads the backlog
            if variable != render.URL_ENV and not value.lstrip().startswith("-----BEGIN"):
                raise Invalid(
                    "BrokerSecretInvalid",
                    f"Secret {secret.name} key {secret.key} is not PEM (-----BEGIN ...): TLS "
                    "material from a Secret is given inline, never as a path",
                )
            environ[variable] = value
        return Inputs(body, spec, source, environ)

    async def _config_map_text(self, namespace: str, name: str, key: str) -> str:
        config_map = await self._call(self.kube.get, CONFIG_MAPS, namespace, name)
        text = ((config_map or {}).get("data") or {}).get(key)
        if text is None:
            what = "does not exist" if config_map is None else f"has no key {key}"
            raise Invalid("SourceMissing", f"ConfigMap {name} {what}")
        return str(text)

    async def _secret_text(self, namespace: str, name: str, key: str) -> str:
        value: bytes | None = await self._call(self.kube.secret_value, namespace, name, key)
        if value is None:
            raise Invalid(
                "BrokerSecretMissing",
                f"Secret {name} with key {key} not found in namespace {namespace}",
            )
        try:
            return value.decode()
        except UnicodeDecodeError:
            raise Invalid(
                "BrokerSecretInvalid", f"Secret {name} key {key} is not UTF-8 text"
            ) from None

    async def _checked(self, inputs: Inputs, state: ConsumerState) -> Checked:
        """`luaq check` on the ConfigMap's files with the pod's environment; the outcome of the
        last pass when nothing it reads has changed since."""
        name = inputs.body["metadata"]["name"]
        data = render.config_data(name, inputs.spec, inputs.source)
        key = digest({"data": data, "environ": inputs.environ})
        if state.checked is None or state.checked.key != key:
            async with self._checks:
                try:
                    outcome = await self._call(
                        check_files, data, render.ENTRIES_FILE, inputs.environ, self.settings
                    )
                except Invalid as exc:
                    outcome = exc
            state.checked = Checked(key, outcome)
        return state.checked

    def _scaled(self, body: Mapping[str, Any], state: ConsumerState, decision: Decision) -> int:
        """The autoscaler's decision told: an Event for a change, a Warning while it cannot
        read the backlog."""
        if state.scaling.unavailable is None:
            state.warnings.pop("backlog", None)
        else:
            self._warn(body, state, "backlog", "BacklogUnavailable", state.scaling.unavailable)
        if decision.change is not None:
            self.post_event(body, "Normal", "Scaled", decision.change)
        return decision.replicas

    # -- apply ------------------------------------------------------------------------------

    async def _apply(
        self, body: Mapping[str, Any], manifest: dict[str, Any], state: ConsumerState
    ) -> dict[str, Any]:
        resource = RESOURCES[manifest["kind"]]
        meta = manifest["metadata"]
        namespace, name = meta["namespace"], meta["name"]
        wanted = _canonical(manifest)
        meta.setdefault("annotations", {})[SPEC_HASH] = digest(wanted)
        what = f"{manifest['kind']} {name}"
        actual: dict[str, Any] | None = await self._call(self.kube.get, resource, namespace, name)
        if actual is None:
            created = await self._write(what, self.kube.create, resource, namespace, manifest)
            state.stored[what] = _fingerprint(created)
            self.post_event(body, "Normal", "Created", f"created {what}")
            return created
        owners = actual["metadata"].get("ownerReferences") or []
        if not any(owner.get("uid") == body["metadata"]["uid"] for owner in owners):
            raise Invalid(
                "NameConflict", f"{what} exists and does not belong to this QueueConsumer"
            )
        seen = state.stored.get(what)
        by_hand = seen is not None and seen != _fingerprint(actual)
        if contains(_canonical(actual), {**wanted, "metadata": meta}) and not by_hand:
            state.stored[what] = _fingerprint(actual)
            return actual
        replacement = _replacement(actual, manifest)
        updated = (actual["metadata"].get("annotations") or {}).get(SPEC_HASH) != digest(wanted)
        written = await self._write(what, self.kube.replace, resource, namespace, name, replacement)
        state.stored[what] = _fingerprint(written)
        if updated:
            self.post_event(body, "Normal", "Updated", f"updated {what}")
        else:
            self.post_event(body, "Normal", "Restored", f"restored {what}, changed by hand")
        return written

    async def _write(self, what: str, method: Callable[..., Any], *args: Any) -> dict[str, Any]:
        """A create or a replace; what the API server refuses for good (not a conflict, not a
        throttle) is a Degraded QueueConsumer with its message, not a retry."""
        try:
            written: dict[str, Any] = await self._call(method, *args)
            return written
        except ApiException as exc:
            if exc.status is not None and 400 <= exc.status < 500 and exc.status not in (409, 429):
                raise Invalid("ApplyFailed", f"{what}: {_refusal(exc)}") from None
            raise

    async def _remove(
        self, body: Mapping[str, Any], kind: str, name: str, state: ConsumerState
    ) -> None:
        """An object it owns only at times (a PodDisruptionBudget), when it should not have it;
        one of the same name that belongs to something else is left alone."""
        meta = body["metadata"]
        resource = RESOURCES[kind]
        found = await self._call(self.kube.get, resource, meta["namespace"], name)
        owners = ((found or {}).get("metadata") or {}).get("ownerReferences") or []
        if any(owner.get("uid") == meta["uid"] for owner in owners):
            await self._call(self.kube.delete, resource, meta["namespace"], name)
            self.post_event(body, "Normal", "Deleted", f"deleted {kind} {name}")
        state.stored.pop(f"{kind} {name}", None)

    async def _collect(self, body: Mapping[str, Any], current: str, state: ConsumerState) -> None:
        """ConfigMaps of earlier configurations, once no pod mounts them (the rollout is done),
        and what the operator remembers of them: a tenant editing all day would grow it."""
        for what in [w for w in state.stored if w.startswith("ConfigMap ")]:
            if what != f"ConfigMap {current}":
                del state.stored[what]
        meta = body["metadata"]
        names = render.Names(meta["name"])
        owned = await self._call(
            self.kube.labelled,
            CONFIG_MAPS,
            meta["namespace"],
            f"{render.OWNER_LABEL}={meta['name']}",
        )
        for config_map in owned:
            old = config_map["metadata"]
            mine = any(
                owner.get("uid") == meta["uid"] for owner in old.get("ownerReferences") or []
            )
            if mine and old["name"].startswith(names.config_map_prefix) and old["name"] != current:
                await self._call(self.kube.delete, CONFIG_MAPS, meta["namespace"], old["name"])

    # -- status -----------------------------------------------------------------------------

    def _warn(
        self, body: Mapping[str, Any], state: ConsumerState, topic: str, reason: str, message: str
    ) -> None:
        """One Warning Event per change of what is wrong, not one per pass."""
        if state.warnings.get(topic) != (reason, message):
            state.warnings[topic] = (reason, message)
            self.post_event(body, "Warning", reason, message)

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
        degraded = next(c for c in status["conditions"] if c["type"] == "Degraded")
        if degraded["status"] == "True":
            self._warn(body, state, "degraded", degraded["reason"], degraded["message"])
        else:
            state.warnings.pop("degraded", None)
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


def _replacement(actual: Mapping[str, Any], manifest: Mapping[str, Any]) -> dict[str, Any]:
    """`manifest` as a replacement for `actual`: every field the operator owns as it says (what
    was added by hand goes), the metadata others wrote kept, the Service's allocated addresses
    kept, and actual's resourceVersion, so a concurrent change makes it a conflict."""
    meta = copy.deepcopy(dict(actual["metadata"]))
    ours = manifest["metadata"]
    meta["labels"] = {**(meta.get("labels") or {}), **ours["labels"]}
    meta["annotations"] = {**(meta.get("annotations") or {}), **ours.get("annotations", {})}
    meta["ownerReferences"] = ours["ownerReferences"]
    replacement = {**copy.deepcopy(dict(manifest)), "metadata": meta}
    if manifest["kind"] == "Service":
        allocated = {k: v for k, v in (actual.get("spec") or {}).items() if k in _ALLOCATED}
        replacement["spec"] = {**replacement["spec"], **allocated}
    return replacement
