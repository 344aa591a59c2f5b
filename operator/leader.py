"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it for
controller-runtime.

Every replica watches and keeps its state warm; only the Lease holder acts. With a Lease of
`lease_seconds` (L):

- every replica tries every retry period (L/6): the holder renews, the others look;
- a follower takes the Lease only when its record has not changed for the Lease's duration,
  measured on the follower's own clock from when it saw the last change (as client-go: no trust
  in the holder's clock), or at once when it is released;
- the holder stops acting the moment its renew deadline (2L/3 after the start of its last
  successful renewal) passes, whatever the election loop is doing then: a timer, not the loop,
  drops leadership, so a hung request cannot keep a replica acting; it also stops at once when
  it finds another holder in the Lease;
- every API call runs in the election's own thread, never on the event loop, in one attempt
  bounded by the retry period, and each round by twice that (below the renew deadline);
- any error in a round is logged and the round retried: the loop ends only when it is stopped;
- `stop` releases the Lease (empty holder) whenever it still names this replica, so another
  replica takes over at once, even after errors.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import json
import logging
import time
from collections.abc import Callable, Coroutine
from concurrent.futures import ThreadPoolExecutor
from datetime import UTC, datetime
from typing import Any, TypeVar

from kubernetes import client
from kubernetes.client.exceptions import ApiException

from .kube import LEASES, Kube
from .settings import OperatorSettings

_log = logging.getLogger("luaq.operator.leader")
T = TypeVar("T")


class LeadershipLost(Exception):
    """The Lease was lost while a pass ran: the pass was cancelled."""


def _micro_time() -> str:
    """Now as a Kubernetes MicroTime, which a Lease's times are."""
    return datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%S.%fZ")


class _BoundedApiClient(client.ApiClient):
    """The Kubernetes client for the Lease calls: one attempt each (no urllib3 retries), given
    up after `timeout` seconds instead of Kube's 30."""

    def __init__(self, configuration: client.Configuration, timeout: float) -> None:
        super().__init__(configuration)
        self.timeout = timeout

    def call_api(self, *args: Any, **kwargs: Any) -> Any:
        kwargs["_request_timeout"] = self.timeout
        return super().call_api(*args, **kwargs)


def lease_client(kube: Kube, timeout: float) -> Kube:
    """A client with `kube`'s configuration and user agent, and a connection pool of its own
    (a stuck reconcile request never holds up a renewal), for bounded Lease calls."""
    configuration = copy.deepcopy(kube.api.configuration)
    configuration.retries = False
    api = _BoundedApiClient(configuration, timeout)
    api.user_agent = kube.api.user_agent
    return Kube(api)


class LeaderElection:
    def __init__(
        self, kube: Kube, settings: OperatorSettings, on_change: Callable[[bool], None]
    ) -> None:
        self.settings = settings
        self.identity = settings.identity
        self.on_change = on_change
        self.is_leader = False
        lease = settings.lease_seconds
        self.renew_deadline = lease * 2 / 3
        self.retry_period = lease / 6
        self.kube = lease_client(kube, timeout=self.retry_period)
        # One thread: a call that hangs delays the next round instead of piling threads up,
        # and the release on stop comes after any call still in flight.
        self._thread = ThreadPoolExecutor(max_workers=1, thread_name_prefix="luaq-lease")
        self._observed = ""  # the Lease's spec as last seen (JSON), and when it last changed
        self._observed_at = 0.0
        self._deadline: asyncio.TimerHandle | None = None
        self._task: asyncio.Task[None] | None = None

    def try_acquire_or_renew(self) -> bool:
        """One round (blocking): create, renew or take over the Lease; False when another
        replica holds it. API errors (409: someone else wrote it first) are raised."""
        name, namespace = self.settings.lease_name, self.settings.lease_namespace
        lease = self.kube.get(LEASES, namespace, name)
        now = time.monotonic()
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": self._spec({}),
            }
            self._observe(self.kube.create(LEASES, namespace, body), now)
            return True
        spec = lease.get("spec") or {}
        self._observe(lease, now)
        holder = spec.get("holderIdentity") or ""
        duration = float(spec.get("leaseDurationSeconds") or 0)
        if holder and holder != self.identity and now < self._observed_at + duration:
            return False
        lease["spec"] = self._spec(spec)
        # resourceVersion makes it an optimistic lock: 409 when another replica wrote first
        self._observe(self.kube.replace(LEASES, namespace, name, lease), now)
        return True

    def _spec(self, previous: dict[str, Any]) -> dict[str, Any]:
        now = _micro_time()
        transitions = int(previous.get("leaseTransitions") or 0)
        ours = previous.get("holderIdentity") == self.identity
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.settings.lease_seconds)),
            "acquireTime": previous.get("acquireTime") if ours else now,
            "renewTime": now,
            "leaseTransitions": transitions if ours or not previous else transitions + 1,
        }

    def _observe(self, lease: dict[str, Any], now: float) -> None:
        record = json.dumps(lease.get("spec") or {}, sort_keys=True)
        if record != self._observed:
            self._observed, self._observed_at = record, now

    def _set(self, leader: bool) -> None:
        if not leader and self._deadline is not None:
            self._deadline.cancel()
            self._deadline = None
        if leader != self.is_leader:
            self.is_leader = leader
            _log.info("leadership %s", "acquired" if leader else "lost")
            self.on_change(leader)

    def _renewed(self, started: float) -> None:
        """Leading until the renew deadline of a renewal that started at `started`."""
        remaining = started + self.renew_deadline - time.monotonic()
        if remaining <= 0:
            return
        if self._deadline is not None:
            self._deadline.cancel()
        self._deadline = asyncio.get_running_loop().call_later(remaining, self._set, False)
        self._set(True)

    async def _round(self) -> bool | None:
        """True: this replica holds the Lease; False: another does; None: cannot tell."""
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(2 * self.retry_period):
                won: bool = await loop.run_in_executor(self._thread, self.try_acquire_or_renew)
                return won
        except Exception as exc:  # whatever the network does, the loop goes on
            if isinstance(exc, ApiException) and exc.status == 409:
                _log.debug("lease %s: written by another replica", self.settings.lease_name)
            else:
                _log.warning("lease %s: %r", self.settings.lease_name, exc)
            return None

    async def run(self) -> None:
        while True:
            started = time.monotonic()
            won = await self._round()
            if won:
                self._renewed(started)
            elif won is False:
                self._set(False)  # another holder: stop acting now, not at the deadline
            # None: the holder keeps trying until its renew deadline's timer stops it
            await asyncio.sleep(self.retry_period)

    def start(self) -> None:
        self._task = asyncio.create_task(self.run(), name="leader election")

    async def stop(self) -> None:
        """Stop acting, stop the loop, and release the Lease if it still names this replica."""
        self._set(False)
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        loop = asyncio.get_running_loop()
        try:
            async with asyncio.timeout(3 * self.retry_period):  # behind a call in flight
                await loop.run_in_executor(self._thread, self.release)
        except Exception as exc:
            _log.warning("lease %s not released: %r", self.settings.lease_name, exc)
        self._thread.submit(self.kube.close)  # after whatever call is still in flight
        self._thread.shutdown(wait=False)

    def release(self) -> None:
        """Hand the Lease over at once (blocking), as client-go's ReleaseOnCancel does."""
        namespace, name = self.settings.lease_namespace, self.settings.lease_name
        lease = self.kube.get(LEASES, namespace, name)
        if lease is None or (lease.get("spec") or {}).get("holderIdentity") != self.identity:
            return
        now = _micro_time()
        lease["spec"].update(
            holderIdentity="", leaseDurationSeconds=1, acquireTime=now, renewTime=now
        )
        self.kube.replace(LEASES, namespace, name, lease)


class Leadership:
    """The operator's API client, and when it may write with it: while this replica holds the
    Lease. Losing the Lease cancels the passes in flight (no new write starts); the terms are
    counted, since what a daemon cached in an earlier one may have been changed by another."""

    def __init__(self, settings: OperatorSettings, on_change: Callable[[bool], None]) -> None:
        self.settings = settings
        self.on_change = on_change
        self.epoch = 0  # leadership terms so far: a daemon's state belongs to one term
        self._kube: Kube | None = None
        self._election: LeaderElection | None = None
        self._passes: set[asyncio.Task[Any]] = set()  # passes in flight

    @property
    def kube(self) -> Kube:
        assert self._kube is not None, "the operator has not started"
        return self._kube

    @property
    def leading(self) -> bool:
        return self._election is not None and self._election.is_leader

    async def start(self) -> None:
        self._kube = await asyncio.to_thread(Kube.connect)
        self._election = await asyncio.to_thread(
            LeaderElection, self._kube, self.settings, self._changed
        )
        self._election.start()

    async def stop(self) -> None:
        if self._election is not None:
            await self._election.stop()  # releases the Lease, whatever happened before
        if self._kube is not None:
            self._kube.close()

    def _changed(self, leader: bool) -> None:
        if leader:
            self.epoch += 1
        else:  # stop acting now: the passes in flight start no further write
            for task in self._passes:
                task.cancel()
        self.on_change(leader)

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
