"""The loop that reacts: kopf handlers, kept thin.

Each QueueConsumer gets a kopf daemon: its one writer, which runs a reconcile pass whenever the
resource or one of its objects changes (their watch events wake it), when an autoscaling or
resync period is due, and after a failure with backoff. Only the holder of the leader Lease
runs passes; the other replicas watch and wait. Losing the Lease cancels the passes in flight
(no new write starts), and each new term starts every daemon from a fresh ConsumerState: what
a replica cached in an earlier term may have been changed since by another.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import logging
from collections.abc import Callable, Coroutine, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

import kopf

from . import kube, render, watching
from .crd import spec_schema
from .kube import Kube
from .leader import LeaderElection, LeadershipLost
from .metrics import Metrics
from .reconcile import ConsumerState, Reconciler
from .resource import CRD_VERSION, GROUP, PLURAL
from .settings import OperatorSettings
from .watching import Watches

Key = tuple[str, str]
MANAGED = {"app.kubernetes.io/managed-by": render.MANAGED_BY}
PART_OF = {"app.kubernetes.io/part-of": "luaq"}
T = TypeVar("T")


class Operator:
    """The operator's state: its settings, API client, metrics, leadership and the daemons."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.schema = spec_schema()
        self.triggers: dict[Key, asyncio.Event] = {}
        self.checks = asyncio.Semaphore(settings.check_concurrency)
        self.bodies: dict[Key, Mapping[str, Any]] = {}
        self._kube: Kube | None = None
        self._leader: LeaderElection | None = None
        self.epoch = 0  # leadership terms so far: a daemon's state belongs to one term
        self._passes: set[asyncio.Task[Any]] = set()  # reconcile passes in flight
        self.watches = Watches(settings)
        # API calls and checks run here: stopping drops what has not started, so nothing is
        # written after the operator stops (the Lease has a thread of its own).
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="luaq-operator")

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    @property
    def kube(self) -> Kube:
        assert self._kube is not None, "the operator has not started"
        return self._kube

    @property
    def leading(self) -> bool:
        return self._leader is not None and self._leader.is_leader

    def wake(self, key: Key) -> None:
        trigger = self.triggers.get(key)
        if trigger is not None:
            trigger.set()

    def _leadership(self, leader: bool) -> None:
        self.metrics.leader.set(1 if leader else 0)
        if leader:  # a new term: catch up on everything that happened meanwhile
            self.epoch += 1
            for trigger in self.triggers.values():
                trigger.set()
        else:  # stop acting now: the passes in flight start no further write
            for task in self._passes:
                task.cancel()

    async def as_leader(self, coroutine: Coroutine[Any, Any, T]) -> T:
        """Run a pass that leadership's loss cancels: raises LeadershipLost then."""
        if not self.leading:
            coroutine.close()
            raise LeadershipLost
        task = asyncio.ensure_future(coroutine)
        self._passes.add(task)
        try:
            return await task
        except asyncio.CancelledError:
            current = asyncio.current_task()
            if current is not None and current.cancelling():
                raise  # the daemon itself is stopping
            raise LeadershipLost from None
        finally:
            self._passes.discard(task)

    def configure(self, kopf_settings: kopf.OperatorSettings) -> None:
        """kopf's side: no namespace or CRD scanning (no RBAC for it), server-side label
        selectors so only luaq's objects are watched, Events named as luaq's."""
        kopf_settings.scanning.disabled = True
        kopf_settings.posting.reporting_component = render.MANAGED_BY
        kopf_settings.posting.reporting_instance = self.settings.identity
        kopf_settings.posting.event_name_prefix = "luaq-"
        kopf_settings.posting.level = logging.WARNING  # kopf's own log lines as Events
        selector = ",".join(f"{key}={value}" for key, value in MANAGED.items())
        kopf_settings.watching.label_selectors["apps", "deployments"] = selector
        kopf_settings.watching.label_selectors["", "services"] = selector
        kopf_settings.watching.label_selectors["policy", "poddisruptionbudgets"] = selector
        kopf_settings.watching.label_selectors["", "configmaps"] = ",".join(
            f"{key}={value}" for key, value in PART_OF.items()
        )
        watching.configure(kopf_settings, self.settings)

    async def start(self) -> None:
        self._kube = await asyncio.to_thread(Kube.connect)
        self._leader = await asyncio.to_thread(
            LeaderElection, self.kube, self.settings, self._leadership
        )
        self._leader.start()
        if self.settings.metrics_port:
            self.metrics.serve(self.settings.metrics_port)

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        if self._leader is not None:
            await self._leader.stop()  # releases the Lease, whatever happened before
        self.metrics.stop()
        if self._kube is not None:
            self._kube.close()

    async def run_consumer(
        self, key: Key, body: Mapping[str, Any], stopped: kopf.DaemonStopped
    ) -> None:
        """The daemon of one QueueConsumer: passes until kopf stops it (deleted, stopping)."""
        trigger = self.triggers[key] = asyncio.Event()
        self.bodies[key] = body
        self.metrics.consumers.set(len(self.triggers))
        state, term = ConsumerState(), self.epoch
        reconciler = Reconciler(
            self.kube, self.settings, self.schema, _post_event, self.call, self.checks
        )
        try:
            while not stopped:
                trigger.clear()
                delay: float | None = None  # a follower waits for a change or a new term
                if self.leading:
                    if term != self.epoch:  # a new term: what was cached may be stale by now
                        await state.close()
                        state, term = ConsumerState(failures=state.failures), self.epoch
                    try:
                        result = await self.as_leader(reconciler.reconcile(body, state))
                    except LeadershipLost:
                        continue  # cancelled: wait for the next term
                    self.metrics.record(*key, result.outcome, state.status)
                    delay = result.requeue_after
                # asyncio.timeout, not wait_for: on 3.11, wait_for can swallow the cancellation
                # that stops this daemon, and kopf then waits for it in vain.
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(delay):
                        await trigger.wait()
        finally:
            del self.triggers[key], self.bodies[key]
            self.metrics.consumers.set(len(self.triggers))
            self.metrics.forget(*key)
            await state.close()

    def wake_sources(self, namespace: str, config_map: str) -> None:
        """A ConfigMap that QueueConsumers name as their sourceRef changed."""
        for (ns, name), body in self.bodies.items():
            ref = (body.get("spec") or {}).get("sourceRef") or {}
            if ns == namespace and ref.get("configMapName") == config_map:
                self.wake((ns, name))


def _post_event(body: Mapping[str, Any], kind: str, reason: str, message: str) -> None:
    kopf.event(body, type=kind, reason=reason, message=message)  # type: ignore[arg-type]


def registry(operator: Operator) -> kopf.OperatorRegistry:
    """The handlers, in a registry of their own (KopfRunner and `luaq-operator` both use it)."""
    handlers = kopf.OperatorRegistry()

    @kopf.on.login(registry=handlers)
    async def login(settings: kopf.OperatorSettings, **_: Any) -> kopf.AiohttpSession:
        info = await asyncio.to_thread(kube.login, settings)
        return await operator.watches.session(info)  # traced: when each watch starts

    # kopf's liveness endpoint fails while a probe raises (luaq.operator.watching)
    @kopf.on.probe(id="watches", errors=kopf.ErrorsMode.PERMANENT, registry=handlers)
    async def watches(**_: Any) -> dict[str, float]:
        return operator.watches.ages()

    @kopf.on.startup(registry=handlers)
    async def startup(settings: kopf.OperatorSettings, **_: Any) -> None:
        operator.configure(settings)
        await operator.start()

    @kopf.on.cleanup(registry=handlers)
    async def cleanup(**_: Any) -> None:
        await operator.stop()

    @kopf.daemon(GROUP, CRD_VERSION, PLURAL, registry=handlers, cancellation_timeout=30.0)
    async def consumer(
        body: kopf.Body, namespace: str | None, name: str, stopped: kopf.DaemonStopped, **_: Any
    ) -> None:
        assert namespace is not None  # a namespaced resource
        await operator.run_consumer((namespace, name), body, stopped)

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
