"""The AMQP link under faults of the wire and of the broker's settings.

A small frame-aware proxy (FrameTap) sits between an in-process worker and the real RabbitMQ:
it reads the broker's frames one by one, so a test can corrupt one, append one to a reply, or
trickle bytes that never complete a frame, and it keeps what luaq sends, to read its closes.
Faults that need the broker reconfigured (channel_max) run on a node of their own
(tests/support/rabbit_node.py). Waiting is polling with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import logging
import struct
from collections.abc import AsyncIterator, Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import uuid4

import aiormq
import pamqp.frame
import pytest
from broker import AMQP_URL
from conftest import eventually
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker
from pamqp import base
from pamqp import commands as spec
from pamqp.commands import Basic
from processes import Spawner, write_app
from rabbit_node import RabbitNode, rabbit_node

_header = struct.Struct(">BHI")


@dataclass
class Tap:
    """One proxied connection: the broker's bytes go through `forward`, a frame at a time."""

    client: asyncio.StreamWriter
    server: asyncio.StreamWriter
    sent: bytearray = field(default_factory=bytearray)  # everything luaq sent
    muted: bool = False  # the broker's frames are dropped (a trickle stands in for them)
    tasks: list[asyncio.Task[None]] = field(default_factory=list)

    def inject(self, data: bytes) -> None:
        """Bytes to luaq as if from the broker, between two of its frames."""
        self.client.write(data)

    def trickle(self, data: bytes, interval: float) -> None:
        """From now on the broker's frames are dropped and `data` reaches luaq a byte every
        `interval` seconds: bytes keep coming, but never a whole frame."""
        self.muted = True

        async def drip() -> None:
            for byte in data:
                self.client.write(bytes((byte,)))
                await asyncio.sleep(interval)  # the fault's pace, not a synchronisation

        self.tasks.append(asyncio.create_task(drip()))

    def methods(self) -> list[Any]:
        """The methods luaq sent on channel 0 (after the protocol header)."""
        found, data = [], bytes(self.sent[8:])
        while len(data) >= 8:
            length = _header.unpack_from(data)[2]
            if len(data) < length + 8:
                break
            _, channel, value = pamqp.frame.unmarshal(data[: length + 8])
            if channel == 0 and isinstance(value, base.Frame):
                found.append(value)
            data = data[length + 8 :]
        return found

    def close(self) -> None:
        self.client.transport.abort()
        self.server.transport.abort()
        for task in self.tasks:
            task.cancel()


Forward = Callable[[Tap, bytes], bytes]


class FrameTap:
    """A proxy to `target` that hands every frame from the broker to `forward` (which returns
    what luaq gets instead) and admits new connections only while `admitting` is set."""

    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0
        self.taps: list[Tap] = []
        self.forward: Forward = lambda tap, frame: frame
        self.admitting = asyncio.Event()
        self.admitting.set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> FrameTap:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(self, *_: object) -> None:
        assert self._server is not None
        self._server.close()
        for tap in self.taps:
            tap.close()

    @property
    def open(self) -> list[Tap]:
        return [tap for tap in self.taps if not tap.client.transport.is_closing()]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        await self.admitting.wait()
        try:
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.transport.abort()
            return
        tap = Tap(writer, upstream_writer)
        self.taps.append(tap)
        tap.tasks += [
            asyncio.create_task(self._upstream(tap, reader)),
            asyncio.create_task(self._downstream(tap, upstream_reader)),
        ]

    async def _upstream(self, tap: Tap, reader: asyncio.StreamReader) -> None:
        with _closing(tap):
            while data := await reader.read(65536):
                tap.sent += data
                tap.server.write(data)

    async def _downstream(self, tap: Tap, reader: asyncio.StreamReader) -> None:
        with _closing(tap):
            while True:
                header = await reader.readexactly(7)
                payload = await reader.readexactly(_header.unpack(header)[2] + 1)
                if not tap.muted:
                    tap.client.write(self.forward(tap, header + payload))


class _closing:
    """Either side ending ends the other."""

    def __init__(self, tap: Tap) -> None:
        self.tap = tap

    def __enter__(self) -> None:
        pass

    def __exit__(self, *_: object) -> bool:
        self.tap.close()
        return True


def method_of(frame: bytes) -> Any:
    return pamqp.frame.unmarshal(frame)[2]


def connection_close(code: int, text: str) -> bytes:
    return pamqp.frame.marshal(spec.Connection.Close(code, text, 0, 0), 0)


# -- a worker on the tap ------------------------------------------------------------------------


@dataclass
class Rig:
    worker: Worker
    url: str  # the broker straight, not through the tap
    queue: str

    @property
    def handled(self) -> int:
        return sum(consumer.stats.acked for consumer in self.worker.consumers)

    async def publish(self, count: int) -> None:
        connection = await aiormq.connect(self.url)
        try:
            channel = await connection.channel()
            for n in range(count):
                confirmation = await channel.basic_publish(
                    b'{"n": %d}' % n,
                    routing_key=self.queue,
                    properties=Basic.Properties(content_type="application/json"),
                )
                assert isinstance(confirmation, Basic.Ack), confirmation
        finally:
            await connection.close()


def worker_on(
    tmp_path: Path, url: str, vhost: str | None, consumers: int = 1, **broker: Any
) -> tuple[Worker, str]:
    queue = f"luaq-test-faults-{uuid4().hex[:12]}"
    app = write_app(
        tmp_path / "app.yaml",
        [
            {
                "name": "broker",
                "kind": "queue.driver.amqp",
                "url": url,
                "reconnect_delay": "100ms",
                "reconnect_max_delay": "500ms",
                "connection_timeout": "3s",
                **({"vhost": vhost} if vhost else {}),
                **broker,
            },
            {"name": "jobs", "kind": "queue.queue", "driver": "broker", "queue_name": queue},
            *(
                {
                    "id": f"worker{n}",
                    "kind": "queue.consumer",
                    "queue": "jobs",
                    "method": "handle",
                    "source": "function handle(p) end",
                }
                for n in range(consumers)
            ),
        ],
    )
    return build(load(entries.load([app]), Settings(shutdown_timeout=2.0))), queue


@pytest.fixture
async def tap() -> AsyncIterator[FrameTap]:
    async with FrameTap("127.0.0.1", 5672) as proxy:
        yield proxy


@pytest.fixture
async def stopping() -> AsyncIterator[list[Worker]]:
    workers: list[Worker] = []
    yield workers
    for worker in workers:
        await worker.stop(1.0)


class Ticker:
    """The event loop's responsiveness: the longest it went without running a 10 ms ticker,
    up to when the ticker is stopped (a freeze that ends the code under test counts too)."""

    def __init__(self) -> None:
        self.worst = 0.0
        self._last = 0.0
        self._task: asyncio.Task[None] | None = None

    def _gap(self) -> None:
        now = asyncio.get_running_loop().time()
        self.worst = max(self.worst, now - self._last)
        self._last = now

    async def _tick(self) -> None:
        while True:
            self._gap()
            await asyncio.sleep(0.01)  # the probe itself: how late does it run again?

    def __enter__(self) -> Ticker:
        self._last = asyncio.get_running_loop().time()
        self._task = asyncio.ensure_future(self._tick())
        return self

    def __exit__(self, *_: object) -> None:
        assert self._task is not None
        self._task.cancel()
        self._gap()


def tapped_url(tap: FrameTap, vhost: str) -> tuple[str, str]:
    """The URL through the tap, and the broker's own, both on `vhost`."""
    path = quote(vhost, safe="")
    return f"amqp://guest:guest@127.0.0.1:{tap.port}/", f"{AMQP_URL}{path}"


# -- 12. a Connection.Close in the same read as a reply ------------------------------------------


async def test_a_close_right_after_a_reply_at_start_up_is_ridden_out(
    tmp_path: Path, vhost: str, tap: FrameTap, stopping: list[Worker]
) -> None:
    """The broker's reply to the queue's declaration and its Connection.Close arrive together:
    the consumer that attaches next finds the connection closing. It waits for the link's
    reconnection (the event loop free meanwhile) instead of retrying on the closed connection
    without ever yielding, which froze the loop for connection_timeout and failed the start."""
    url, direct = tapped_url(tap, vhost)
    worker, queue = worker_on(tmp_path, url, vhost)
    closes: list[Tap] = []

    def close_after_the_declaration(through: Tap, frame: bytes) -> bytes:
        if not closes and isinstance(method_of(frame), spec.Queue.DeclareOk):
            closes.append(through)
            return frame + connection_close(320, "CONNECTION_FORCED - the test's")
        return frame

    tap.forward = close_after_the_declaration
    stopping.append(worker)
    with Ticker() as ticker:
        started = await asyncio.gather(worker.start(), return_exceptions=True)
    assert closes, "no declaration went through the tap"
    assert ticker.worst < 0.5, f"the event loop froze for {ticker.worst:.1f}s"
    assert started == [None], str(started[0])
    assert worker.drivers["app:broker"].reconnects == 1
    assert worker.telemetry.unready() is None

    rig = Rig(worker, direct, queue)
    await rig.publish(5)
    await eventually(lambda: rig.handled == 5, timeout=10)


# -- 11. a corrupt frame length, a trickle that never makes a frame ------------------------------


async def started(worker: Worker, stopping: list[Worker], direct: str, queue: str) -> Rig:
    stopping.append(worker)
    await worker.start()
    rig = Rig(worker, direct, queue)
    await rig.publish(2)
    await eventually(lambda: rig.handled == 2, timeout=10)
    return rig


async def test_an_oversized_frame_is_a_frame_error_and_the_link_recovers(
    tmp_path: Path, vhost: str, tap: FrameTap, stopping: list[Worker]
) -> None:
    """A frame header from the broker announcing 2^31 bytes, far over the negotiated frame_max:
    luaq closes the connection with FRAME_ERROR (AMQP 0-9-1 4.2.3) at once, is not ready while
    the link is down, and recovers on a new connection. It used to wait for the 2 GiB, counting
    the heartbeats buffered behind them as signs of life: ready, and handling nothing."""
    url, direct = tapped_url(tap, vhost)
    worker, queue = worker_on(tmp_path, url, vhost, heartbeat="2s")
    rig = await started(worker, stopping, direct, queue)
    consuming = tap.taps[0]  # the driver connects its consuming link first
    tap.admitting.clear()  # the link stays down until the test has seen it down

    consuming.inject(_header.pack(1, 1, 2**31) + bytes(64))

    def closes() -> list[spec.Connection.Close]:
        return [m for m in consuming.methods() if isinstance(m, spec.Connection.Close)]

    await eventually(lambda: bool(closes()), timeout=2)
    assert closes()[0].reply_code == 501, closes()
    assert "FRAME_ERROR" in closes()[0].reply_text
    await eventually(lambda: worker.telemetry.unready() == "reconnecting app:broker", timeout=2)
    await rig.publish(5)
    tap.admitting.set()
    await eventually(lambda: rig.handled == 7, timeout=10)
    await eventually(lambda: worker.telemetry.unready() is None, timeout=10)


async def test_a_trickle_that_never_completes_a_frame_is_a_dead_connection(
    tmp_path: Path, vhost: str, tap: FrameTap, stopping: list[Worker]
) -> None:
    """The broker's frames stop; bytes still come, a few a second, but never a whole frame
    (a frame of 4 KiB, well within frame_max, trickled). Liveness counts whole frames only:
    within about two heartbeat intervals the connection is dead, and recovers."""
    url, direct = tapped_url(tap, vhost)
    worker, queue = worker_on(tmp_path, url, vhost, heartbeat="1s")
    rig = await started(worker, stopping, direct, queue)
    consuming = tap.taps[0]
    tap.admitting.clear()
    loop = asyncio.get_running_loop()

    began = loop.time()
    consuming.trickle(_header.pack(1, 1, 4096) + bytes(200), interval=0.05)

    await eventually(lambda: worker.telemetry.unready() == "reconnecting app:broker", timeout=5)
    assert loop.time() - began < 3.0, "more than about two heartbeat intervals"
    await rig.publish(5)
    tap.admitting.set()
    await eventually(lambda: rig.handled == 7, timeout=10)
    await eventually(lambda: worker.telemetry.unready() is None, timeout=10)


# -- 13. a broker allowing fewer channels than luaq opens ---------------------------------------

CHANNEL_LIMIT = "the broker allows 2 channels per connection, luaq needs 3: raise channel_max"


@pytest.fixture(scope="module")
def narrow() -> Iterator[RabbitNode]:
    """A node allowing 2 channels per connection: luaq opens one for declarations and one per
    consumer on its consuming connection, so two consumers need 3."""
    with rabbit_node("channel_max = 2") as node:
        yield node


def test_too_few_channels_at_start_up_is_a_clear_error(tmp_path: Path, narrow: RabbitNode) -> None:
    app = write_app(
        tmp_path / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.amqp", "url": narrow.url},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker",
             "queue_name": f"luaq-test-narrow-{uuid4().hex[:12]}"},
            *({"id": f"worker{n}", "kind": "queue.consumer", "queue": "jobs",
               "method": "handle", "source": "function handle(p) end"} for n in range(2)),
        ],
    )  # fmt: skip
    spawner = Spawner(tmp_path)
    try:
        process = spawner("run", app, "--until-idle")
        code = process.wait(20)
    finally:
        spawner.stop_all()

    assert code == 1, process.stderr
    assert "Traceback" not in process.stderr, process.stderr
    assert CHANNEL_LIMIT in process.stderr.splitlines()[-1], process.stderr


async def test_too_few_channels_at_a_reconnect_is_retried_until_the_broker_allows_them(
    tmp_path: Path,
    vhost: str,
    narrow: RabbitNode,
    tap: FrameTap,
    stopping: list[Worker],
    caplog: pytest.LogCaptureFixture,
) -> None:
    """The broker comes back allowing fewer channels than luaq needs (reconfigured, or another
    broker behind the same address): the reconnection fails with a reason that says what to
    change, logged once however often it is retried, the worker unready meanwhile; once the
    broker allows enough, the link recovers. The recovery task used to die on the client's
    `coroutine raised StopIteration`, leaving the worker "reconnecting" for ever."""
    narrow.ctl("add_vhost", vhost)
    narrow.ctl("set_permissions", "-p", vhost, "guest", ".*", ".*", ".*")
    url, direct = tapped_url(tap, vhost)
    worker, queue = worker_on(tmp_path, url, vhost, consumers=2)
    rig = await started(worker, stopping, direct, queue)
    caplog.set_level(logging.DEBUG, "luaq.amqp")
    shared = tap.target
    tap.target = ("127.0.0.1", narrow.port)

    tap.taps[0].close()  # the consuming connection drops, and reconnects to the narrow broker

    def failures() -> list[logging.LogRecord]:
        return [r for r in caplog.records if r.msg == "reconnect failed, retrying"]

    await eventually(lambda: len(failures()) >= 4, timeout=10)
    assert [r.levelno for r in failures()][:4] == [logging.WARNING] + 3 * [logging.DEBUG]
    assert {r.error for r in failures()} == {CHANNEL_LIMIT}  # type: ignore[attr-defined]
    assert worker.telemetry.unready() == "reconnecting app:broker"

    await rig.publish(5)
    tap.target = shared
    await eventually(lambda: rig.handled == 7, timeout=10)
    await eventually(lambda: worker.telemetry.unready() is None, timeout=10)
