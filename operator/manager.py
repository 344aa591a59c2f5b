"""The operator's parts, wired, and the state its daemons share. It holds no logic of its own:
reconcile.py has the passes, handlers.py the glue to kopf that runs them."""

from __future__ import annotations

import asyncio
import contextlib
import functools
from collections.abc import Callable, Coroutine, Iterator, Mapping
from concurrent.futures import ThreadPoolExecutor
from typing import Any, TypeVar

from .crd import spec_schema
from .leader import Leadership
from .metrics import Metrics
from .settings import OperatorSettings
from .watching import Watches

Key = tuple[str, str]
T = TypeVar("T")


class Operator:
    """The operator's state: its settings, metrics, leadership (the API client, the Lease), the
    watches' liveness and the daemons."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        self.metrics = Metrics()
        self.schema = spec_schema()
        self.triggers: dict[Key, asyncio.Event] = {}
        self.checks = asyncio.Semaphore(settings.check_concurrency)
        self.bodies: dict[Key, Mapping[str, Any]] = {}
        self.leadership = Leadership(settings, self._leadership)
        self.watches = Watches(settings)
        # API calls and checks run here: stopping drops what has not started, so nothing is
        # written after the operator stops (the Lease has a thread of its own).
        self._executor = ThreadPoolExecutor(max_workers=8, thread_name_prefix="luaq-operator")

    async def call(self, function: Callable[..., Any], *args: Any) -> Any:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._executor, functools.partial(function, *args))

    @property
    def leading(self) -> bool:
        return self.leadership.leading

    @property
    def epoch(self) -> int:
        return self.leadership.epoch

    async def as_leader(self, coroutine: Coroutine[Any, Any, T]) -> T:
        return await self.leadership.as_leader(coroutine)

    def wake(self, key: Key) -> None:
        trigger = self.triggers.get(key)
        if trigger is not None:
            trigger.set()

    def _leadership(self, leader: bool) -> None:
        self.metrics.leader.set(1 if leader else 0)
        if leader:  # a new term: catch up on everything that happened meanwhile
            for trigger in self.triggers.values():
                trigger.set()
        else:
            self.metrics.follow()

    async def start(self) -> None:
        """The metrics first (unless `luaq-operator` serves them already): a replica that
        cannot serve them fails its start-up before it may take the Lease. kopf tries a failed
        start-up again a minute later, and a leader that had failed would hold the Lease
        meanwhile, doing nothing."""
        if self.settings.metrics_port and not self.metrics.serving:
            self.metrics.serve(self.settings.metrics_port)
        await self.leadership.start()

    async def stop(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        await self.leadership.stop()
        self.metrics.stop()

    @contextlib.contextmanager
    def daemon(self, key: Key, body: Mapping[str, Any]) -> Iterator[asyncio.Event]:
        """While the daemon of one QueueConsumer runs: the trigger that wakes it."""
        trigger = self.triggers[key] = asyncio.Event()
        self.bodies[key] = body
        self.metrics.consumers.set(len(self.triggers))
        try:
            yield trigger
        finally:
            del self.triggers[key], self.bodies[key]
            self.metrics.consumers.set(len(self.triggers))
            self.metrics.forget(*key)

    def wake_sources(self, namespace: str, config_map: str) -> None:
        """A ConfigMap that QueueConsumers name as their sourceRef changed."""
        for (ns, name), body in self.bodies.items():
            ref = (body.get("spec") or {}).get("sourceRef") or {}
            if ns == namespace and ref.get("configMapName") == config_map:
                self.wake((ns, name))
