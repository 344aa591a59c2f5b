"""The loop that reacts: kopf handlers, kept thin.

Each QueueConsumer gets a kopf daemon: its one writer, which runs a reconcile pass whenever the
resource or one of its objects changes (their watch events wake it), and when the pass's
Result says the next one is due (an autoscaling or resync period, a backoff after a failure).
Only the holder of the leader Lease runs passes; the other replicas watch and wait. Losing the
Lease cancels the passes in flight (no new write starts), and each new term starts every daemon
from a fresh ConsumerState: what a replica cached in an earlier term may have been changed
since by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Mapping
from typing import Any

import kopf

from . import render
from .leader import LeadershipLost
from .manager import Key, Operator
from .reconcile import ConsumerState, Reconciler
from .resource import CRD_VERSION, GROUP, PLURAL

MANAGED = {"app.kubernetes.io/managed-by": render.MANAGED_BY}
PART_OF = {"app.kubernetes.io/part-of": "luaq"}


def configure(kopf_settings: kopf.OperatorSettings, operator: Operator) -> None:
    """kopf's side: no namespace or CRD scanning (no RBAC for it), server-side label selectors
    so only luaq's objects are watched, the watches' timeouts, Events named as luaq's."""
    kopf_settings.scanning.disabled = True
    kopf_settings.posting.reporting_component = render.MANAGED_BY
    kopf_settings.posting.reporting_instance = operator.settings.identity
    kopf_settings.posting.event_name_prefix = "luaq-"
    kopf_settings.posting.level = logging.WARNING  # kopf's own log lines as Events
    selector = ",".join(f"{key}={value}" for key, value in MANAGED.items())
    kopf_settings.watching.label_selectors["apps", "deployments"] = selector
    kopf_settings.watching.label_selectors["", "services"] = selector
    kopf_settings.watching.label_selectors["policy", "poddisruptionbudgets"] = selector
    kopf_settings.watching.label_selectors["", "configmaps"] = ",".join(
        f"{key}={value}" for key, value in PART_OF.items()
    )
    operator.watches.configure(kopf_settings)


async def run_consumer(
    operator: Operator, key: Key, body: Mapping[str, Any], stopped: kopf.DaemonStopped
) -> None:
    """The daemon of one QueueConsumer: passes until kopf stops it (deleted, stopping)."""
    state, term = ConsumerState(), operator.epoch
    reconciler = Reconciler(
        operator.leadership.kube,
        operator.settings,
        operator.schema,
        _post_event,
        operator.call,
        operator.checks,
    )
    with operator.daemon(key, body) as trigger:
        try:
            while not stopped:
                trigger.clear()
                delay: float | None = None  # a follower waits for a change or a new term
                if operator.leading:
                    if term != operator.epoch:  # a new term: what was cached may be stale
                        await state.close()
                        state, term = ConsumerState(failures=state.failures), operator.epoch
                    try:
                        result = await operator.as_leader(reconciler.reconcile(body, state))
                    except LeadershipLost:
                        continue  # cancelled: wait for the next term
                    operator.metrics.record(
                        *key,
                        result.outcome,
                        state.status,
                        state.scaling.last_read,
                        result.read_errors,
                    )
                    delay = result.requeue_after
                # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow the cancellation
                # that stops this daemon, and kopf then waits for it in vain.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await trigger.wait()
        finally:
            await state.close()


def _post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(body, type=kind, reason=reason, message=message)  # type: ignore[arg-type]


def registry(operator: Operator) -> kopf.OperatorRegistry:
    """The handlers, in a registry of their own (KopfRunner and `luaq-operator` both use it)."""
    handlers = kopf.OperatorRegistry()

    @kopf.on.login(registry=handlers)
    async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.AiohttpSession:
        return await operator.watches.login(settings)  # traced: when each watch starts

    # kopf's liveness endpoint fails while a probe raises (luaq.operator.watching)
    @kopf.on.probe(id="watches", errors=kopf.ErrorsMode.PERMANENT, registry=handlers)
    async def watches(**_: Any) -> dict[str, float]:
        return operator.watches.ages()

    @kopf.on.startup(registry=handlers)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        configure(settings, operator)
        await operator.start()

    @kopf.on.cleanup(registry=handlers)
    async def cleanup(**_: Any) -> None:
        await operator.stop()

    @kopf.daemon(GROUP, CRD_VERSION, PLURAL, registry=handlers, cancellation_timeout=30.0)
    async def consumer(
        body: kopf.Body, namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        assert namespace is not None  # a namespaced resource
        await run_consumer(operator, (namespace, name), body, stopped)

    # Async, so they run on the event loop: the daemons' triggers are asyncio Events.
    @kopf.on.event(GROUP, CRD_VERSION, PLURAL, registry=handlers)
    async def changed(namespace: str | None, name: str, **_: Any) -> None:
        operator.wake((namespace or "", name))

    async def owned(namespace: str | None, labels: Mapping[str, str], **_: Any) -> None:
        owner = labels.get(render.OWNER_LABEL)
        if owner:
            operator.wake((namespace or "", owner))

    kopf.on.event("apps", "v1", "deployments", labels=MANAGED, registry=handlers)(owned)
    kopf.on.event("", "v1", "services", labels=MANAGED, registry=handlers)(owned)
    kopf.on.event("policy", "v1", "poddisruptionbudgets", labels=MANAGED, registry=handlers)(owned)

    @kopf.on.event("", "v1", "configmaps", labels=PART_OF, registry=handlers)
    async def config_map(
        namespace: str | None, name: str, labels: Mapping[str, str], **_: Any
    ) -> None:
        await owned(namespace, labels)
        operator.wake_sources(namespace or "", name)

    return handlers
