"""How the driver reaches the broker: the URL and TLS of a driver entry, and a Link, one
connection kept up.

Recovery is owned here, as aio-pika's robust connection does it: when a connection drops,
reconnect with exponential backoff and restore what the driver had on it (its queues, its
consumers) before anyone may use it; calls made meanwhile wait for the link (bounded). Every
wait on the broker is bounded: a broker that blocks or stalls gives an error, never a hang.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import ssl
import tempfile
from collections.abc import Awaitable, Callable, Iterator
from typing import Any, TypeVar
from urllib.parse import quote, urlsplit, urlunsplit

from ...entries import AmqpDriverEntry
from ...errors import ErrorKind, QueueError
from .client import ChannelClosed, ChannelGone, ChannelLimit, Connection, Endpoint
from .mapping import broker_error, channel_limit_error

_log = logging.getLogger("luaq.amqp")
T = TypeVar("T")


def safe_url(url: str) -> str:
    """The URL with its password masked, for logs and errors."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.replace(f":{parts.password}@", ":***@", 1)
    return urlunsplit(parts._replace(netloc=netloc))


def broker_url(entry: AmqpDriverEntry) -> str:
    """The broker's URL as logs and errors show it: password masked, vhost applied."""
    url = entry.url
    if entry.vhost is not None:
        parts = urlsplit(url)
        url = urlunsplit(parts._replace(path="/" + quote(entry.vhost, safe="")))
    return safe_url(url)


def endpoint(entry: AmqpDriverEntry, role: str) -> Endpoint:
    """Where and how the `role` connection (publish, consume) reaches the broker."""
    options: dict[str, Any] = {
        "name": f"{entry.connection_name or 'luaq ' + entry.id} ({role})",
        "tls": ssl_context(entry),
        "server_name": entry.tls.server_name,
        "timeout": entry.connection_timeout,
    }
    if entry.heartbeat is not None:
        options["heartbeat"] = round(entry.heartbeat)
    if entry.vhost is not None:
        options["vhost"] = entry.vhost
    return Endpoint.from_url(entry.url, **options)


def ssl_context(entry: AmqpDriverEntry) -> ssl.SSLContext | None:
    tls = entry.tls
    if not tls.enabled and not entry.url.startswith("amqps://"):
        return None
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH)
    if tls.ca:
        ca = _pem(tls.ca)
        if ca.lstrip().startswith("-----BEGIN"):
            context.load_verify_locations(cadata=ca)
        else:
            context.load_verify_locations(cafile=ca)
    if tls.cert and tls.key:
        with _pem_file(tls.cert) as cert, _pem_file(tls.key) as key:
            context.load_cert_chain(cert, key)
    if tls.insecure_skip_verify:
        context.check_hostname = False
        context.verify_mode = ssl.CERT_NONE
    return context


def _pem(value: str) -> str:
    """Inline PEM as it is; `file://path` as the path (environment is already expanded)."""
    return value.removeprefix("file://")


@contextlib.contextmanager
def _pem_file(value: str) -> Any:
    value = _pem(value)
    if not value.lstrip().startswith("-----BEGIN"):
        yield value
        return
    # ssl loads certificate chains only from files: inline PEM goes through a private temp file
    with tempfile.NamedTemporaryFile("w", suffix=".pem") as handle:
        os.chmod(handle.name, 0o600)
        handle.write(value)
        handle.flush()
        yield handle.name


class Link:
    """One connection to the broker, kept up: when it drops, reconnect with backoff, and run
    `restore` on the new connection before anyone may use it."""

    def __init__(
        self,
        entry: AmqpDriverEntry,
        role: str,
        restore: Callable[[Connection], Awaitable[None]],
        channels: Callable[[], int],
    ) -> None:
        self.entry = entry
        self.role = role
        self.url = broker_url(entry)
        self._channels = channels
        self.connection: Connection | None = None
        self._restore = restore
        self.reconnects = 0
        self._up = asyncio.Event()
        self._task: asyncio.Task[None] | None = None
        self._closing = False

    async def start(self) -> None:
        try:
            await self._connect()
        except Exception as exc:  # whatever it is, a message, not a traceback
            _log.debug("connecting failed", exc_info=True)
            raise QueueError(
                ErrorKind.UNAVAILABLE,
                f"cannot connect to {self.url}: {self._reason(exc)}",
                retryable=not isinstance(exc, ChannelLimit),
            ) from exc
        self._up.set()
        self._task = asyncio.create_task(self._keep(), name=f"{self.entry.id}#{self.role}")

    def channels_needed(self) -> int:
        """The channels the driver opens on this link's connection: the publisher's, or the
        declarations' and one per consumer."""
        return self._channels()

    async def _connect(self) -> None:
        async with asyncio.timeout(self.entry.connection_timeout):
            connection = await Connection.open(endpoint(self.entry, self.role))
        try:
            if connection.channel_max < self.channels_needed():
                raise ChannelLimit(connection.channel_max)
            await self._restore(connection)
        except BaseException:
            connection.abort()
            raise
        self.connection = connection

    def _reason(self, exc: Exception) -> str:
        """Why connecting failed, for a log line or an error."""
        if isinstance(exc, ChannelLimit):
            return channel_limit_error(exc, self.channels_needed()).message
        if isinstance(exc, ChannelClosed | OSError | TimeoutError | QueueError):
            return str(exc) or type(exc).__name__
        return f"{type(exc).__name__}: {exc}"  # not expected: a bug, named

    async def _keep(self) -> None:
        """Wait for the connection to drop; reconnect with backoff and restore what we had.
        Nothing but close() ends this task: any failure is logged (once per distinct reason
        in an outage) and retried."""
        entry = self.entry
        where = {"driver": entry.id, "connection": self.role}
        while not self._closing:
            assert self.connection is not None
            await asyncio.wait([self.connection.closed])
            if self._closing:
                return
            self._up.clear()
            delay = entry.reconnect_delay
            _log.warning(
                "connection lost, reconnecting",
                extra={**where, "error": str(self.connection.closed_by)},
            )
            told: set[str] = set()  # reasons logged in this outage
            while not self._closing:
                await asyncio.sleep(delay)
                try:
                    await self._connect()
                except Exception as exc:
                    reason = self._reason(exc)
                    expected = isinstance(exc, ChannelClosed | OSError | TimeoutError | QueueError)
                    level = logging.DEBUG if reason in told else logging.WARNING
                    told.add(reason)
                    _log.log(
                        level,
                        "reconnect failed, retrying",
                        extra={**where, "error": reason, "delay": delay},
                        exc_info=not expected and level == logging.WARNING,
                    )
                    delay = min(delay * 2, entry.reconnect_max_delay)
                    continue
                _log.info("connection restored", extra=where)
                self.reconnects += 1
                self._up.set()
                break

    async def get(self) -> Connection:
        """The connection; while it is down, wait for the recovery (at most
        connection_timeout)."""
        connection = self.connection
        if connection is not None and connection.closed_by is not None:
            # closed, or closing (its reason is set a loop turn before it is gone): the
            # recovery task is about to notice
            self._up.clear()
        if not self._up.is_set():
            timeout = self.entry.connection_timeout
            try:
                async with asyncio.timeout(timeout):  # (wait_for may swallow a cancel on 3.11)
                    await self._up.wait()
            except TimeoutError as exc:
                raise QueueError(
                    ErrorKind.UNAVAILABLE,
                    f"no connection to {self.url} for {timeout:g}s",
                    retryable=True,
                ) from exc
        assert self.connection is not None
        return self.connection

    async def run(self, what: str, operation: Callable[[Connection], Awaitable[T]]) -> T:
        """Run `operation` on the connection; if that connection drops meanwhile, again on the
        recovered one, for at most connection_timeout. Failures leave as QueueError, named by
        `what`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + self.entry.connection_timeout
        while True:
            connection = await self.get()
            try:
                with self.errors(what):
                    return await operation(connection)
            except OSError as exc:  # the connection went: the recovery is on it
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise QueueError(
                        ErrorKind.UNAVAILABLE, f"{what}: {exc}", retryable=True
                    ) from exc
                # A connection the broker closed in the same read as its last reply fails the
                # next call at once, before it is gone: wait until it is, so that the next try
                # waits for the link's recovery instead of spinning on it, the loop frozen.
                await asyncio.wait([connection.closed], timeout=remaining)

    @contextlib.contextmanager
    def errors(self, what: str, *, again: bool = False, conflict: str = "") -> Iterator[None]:
        """The client's failures on this link as QueueError named by `what`, the one place they
        are mapped (as httpx's map_httpcore_exceptions maps httpcore's): a channel the broker
        closed by its reply code (a 406 named by `conflict`, when given: declared before with
        other options), a name or argument AMQP cannot carry INVALID, no answer in time
        TIMEOUT, too few channels UNAVAILABLE. With `again`, a ChannelGone passes: the call can
        be made again on a new channel. A lost connection (OSError) passes: `run` waits for the
        recovery."""
        try:
            yield
        except ChannelClosed as exc:
            if again and isinstance(exc, ChannelGone):
                raise
            what = conflict if conflict and exc.code == 406 else what
            raise broker_error(exc, what) from exc
        except (TypeError, ValueError) as exc:
            raise QueueError(ErrorKind.INVALID, f"{what}: {exc}") from exc
        except TimeoutError as exc:
            raise QueueError(
                ErrorKind.TIMEOUT,
                f"{what}: no answer from the broker within {self.entry.connection_timeout:g}s",
                retryable=True,
            ) from exc
        except ChannelLimit as exc:
            raise channel_limit_error(exc, self.channels_needed(), what) from exc

    @property
    def up(self) -> bool:
        connection = self.connection
        return self._up.is_set() and connection is not None and connection.closed_by is None

    def keepalive(self) -> None:
        if self.connection is not None and not self.connection.is_closed:
            self.connection.keepalive()

    async def close(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
        if self.connection is not None:
            await self.connection.close()

    def abort(self) -> None:
        self._closing = True
        if self._task is not None:
            self._task.cancel()
        if self.connection is not None:
            self.connection.abort()
