"""Leader election on a coordination.k8s.io Lease, as client-go's leaderelection does it.

Every replica watches and keeps its state warm; only the Lease holder acts. A holder that cannot
renew stops acting at its renew deadline, before the Lease expires for the others; a replica
that stops releases the Lease so another takes over at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from typing import Any

from kubernetes.client.exceptions import ApiException

from .kube import LEASES, Kube
from .settings import OperatorSettings

_log = logging.getLogger("luaq.operator.leader")


def _now() -> datetime:
    return datetime.now(UTC)


def _time(value: datetime) -> str:
    return value.strftime("%Y-%m-%dT%H:%M:%S.%fZ")


def _parse(value: str | None) -> datetime | None:
    if not value:
        return None
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


class LeaderElection:
    def __init__(
        self, kube: Kube, settings: OperatorSettings, on_change: Callable[[bool], None]
    ) -> None:
        self.kube = kube
        self.settings = settings
        self.identity = settings.identity
        self.on_change = on_change
        self.is_leader = False
        self._renewed: datetime | None = None

    @property
    def _duration(self) -> timedelta:
        return timedelta(seconds=self.settings.lease_seconds)

    def _spec(self, acquired: str, transitions: int) -> dict[str, Any]:
        now = _time(_now())
        return {
            "holderIdentity": self.identity,
            "leaseDurationSeconds": max(1, round(self.settings.lease_seconds)),
            "acquireTime": acquired or now,
            "renewTime": now,
            "leaseTransitions": transitions,
        }

    def try_acquire(self) -> bool:
        """One round: create, renew or take over the Lease. Conflicts mean someone else won."""
        name, namespace = self.settings.lease_name, self.settings.lease_namespace
        lease = self.kube.get(LEASES, namespace, name)
        if lease is None:
            body = {
                "apiVersion": "coordination.k8s.io/v1",
                "kind": "Lease",
                "metadata": {"name": name, "namespace": namespace},
                "spec": self._spec("", 0),
            }
            self.kube.create(LEASES, namespace, body)
            return True
        spec = lease.get("spec") or {}
        holder = spec.get("holderIdentity") or ""
        renewed = _parse(spec.get("renewTime"))
        duration = timedelta(seconds=spec.get("leaseDurationSeconds") or 0)
        expired = renewed is None or renewed + duration < _now()
        if holder and holder != self.identity and not expired:
            return False
        transitions = int(spec.get("leaseTransitions") or 0)
        if holder == self.identity:
            acquired = str(spec.get("acquireTime") or "")
        else:
            acquired, transitions = "", transitions + 1
        lease["spec"] = self._spec(acquired, transitions)
        self.kube.replace(LEASES, namespace, name, lease)  # resourceVersion: optimistic lock
        return True

    def _set(self, leader: bool) -> None:
        if leader != self.is_leader:
            self.is_leader = leader
            _log.info("leadership %s", "acquired" if leader else "lost")
            self.on_change(leader)

    async def run(self) -> None:
        retry = self.settings.lease_seconds / 3
        while True:
            try:
                won = await asyncio.to_thread(self.try_acquire)
            except (ApiException, OSError) as exc:
                if not (isinstance(exc, ApiException) and exc.status == 409):
                    _log.warning("lease %s: %s", self.settings.lease_name, exc)
                won = False
            now = _now()
            if won:
                self._renewed = now
                self._set(True)
            elif self.is_leader:
                # Stop acting before the Lease can expire for the others (renew deadline).
                deadline = (self._renewed or now) + self._duration * 2 / 3
                if now >= deadline or not self._held_by_us():
                    self._set(False)
            await asyncio.sleep(retry)

    def _held_by_us(self) -> bool:
        with contextlib.suppress(ApiException, OSError):
            lease = self.kube.get(LEASES, self.settings.lease_namespace, self.settings.lease_name)
            return lease is not None and lease["spec"].get("holderIdentity") == self.identity
        return True  # cannot tell: the renew deadline decides

    def release(self) -> None:
        """Hand the Lease over at once on a clean stop."""
        if not self.is_leader:
            return
        self._set(False)
        with contextlib.suppress(ApiException, OSError):
            namespace, name = self.settings.lease_namespace, self.settings.lease_name
            lease = self.kube.get(LEASES, namespace, name)
            if lease is not None and lease["spec"].get("holderIdentity") == self.identity:
                lease["spec"].update(holderIdentity="", leaseDurationSeconds=1)
                self.kube.replace(LEASES, namespace, name, lease)
