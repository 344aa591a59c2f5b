"""Watches that cannot go silent unnoticed.

A watch stream whose connection dies without a FIN (a NAT or load balancer that forgot it, a
node that vanished) looks idle, not broken: kopf would wait on it and stop seeing changes while
its timers keep running. So every watch request asks the API server to end it after
`watch_seconds` and gives up by itself `watch_connect_seconds` later (kopf then starts the next
one from the last resourceVersion), and kopf's session is traced: each watch whose response
starts counts as (re)established. The liveness probe fails when a watch stream has not been
re-established for three such periods, so that the kubelet restarts an operator that would
otherwise go on blind.
"""

from __future__ import annotations

import asyncio
import time
from types import SimpleNamespace

import aiohttp
import kopf

from . import kube
from .settings import OperatorSettings

PERIODS = 3  # how many periods without a new watch make a stream stale


class Watches:
    """When each watch stream (a resource's path, in a namespace or across all) last started."""

    def __init__(self, settings: OperatorSettings) -> None:
        self.settings = settings
        period = settings.watch_seconds + settings.watch_connect_seconds
        self.stale_after = PERIODS * period
        self.since = time.monotonic()
        self.established: dict[str, float] = {}
        self.trace = aiohttp.TraceConfig()
        self.trace.on_request_end.append(self._request_end)

    async def _request_end(
        self,
        session: aiohttp.ClientSession,
        context: SimpleNamespace,
        params: aiohttp.TraceRequestEndParams,
    ) -> None:
        url, status = params.url, params.response.status
        if params.method == "GET" and url.query.get("watch") == "true" and status == 200:
            self.established[url.path] = time.monotonic()

    def ages(self) -> dict[str, float]:
        """Seconds since each stream (or, before the first, the operator) last started; raises
        kopf.PermanentError, which fails the liveness probe, when one is stale."""
        now = time.monotonic()
        ages = {path: round(now - at, 1) for path, at in self.established.items()}
        stale = {path: age for path, age in ages.items() if age > self.stale_after}
        if not ages and now - self.since > self.stale_after:
            stale = {"any": round(now - self.since, 1)}
        if stale:
            raise kopf.PermanentError(
                f"watches not re-established for {self.stale_after} s: {stale}"
            )
        return ages

    def configure(self, kopf_settings: kopf.OperatorSettings) -> None:
        """kopf's watch timeouts from the operator's settings."""
        settings = self.settings
        kopf_settings.watching.server_timeout = settings.watch_seconds
        kopf_settings.watching.client_timeout = (
            settings.watch_seconds + settings.watch_connect_seconds
        )
        kopf_settings.watching.connect_timeout = settings.watch_connect_seconds

    async def login(self, kopf_settings: kopf.OperatorSettings) -> kopf.AiohttpSession:
        """The session kopf would build with the operator's own credentials, traced."""
        info = await asyncio.to_thread(kube.login, kopf_settings)
        ssl = await asyncio.to_thread(info.as_ssl_context)  # reads certificate files
        session = aiohttp.ClientSession(
            connector=aiohttp.TCPConnector(limit=0, ssl=ssl),
            headers=info.as_http_headers(),
            proxy=info.proxy_url,
            trust_env=info.trust_env,
            trace_configs=[self.trace],
        )
        return kopf.AiohttpSession(
            aiohttp_session=session,
            server=info.server,
            default_namespace=info.default_namespace,
            priority=info.priority,
            expiration=info.expiration,
        )
