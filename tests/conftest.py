"""Shared test harness: real entries files, the real Lua runtime, the real memory driver."""

from __future__ import annotations

import asyncio
import logging
import sys
import textwrap
import threading
from collections.abc import Awaitable, Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import yaml
from broker import rabbitmqctl, vhost_url
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.codecs import CODECS
from luaq.runtime.drivers import Delivery
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker
from processes import Spawner
from rabbit_node import RESEND, RabbitNode, rabbit_node

pytest_plugins = ["kube_fixtures"]  # the operator tests' emulated cluster


@dataclass
class Received:
    data: Any
    headers: dict[str, Any]
    id: str
    attempts: int


@dataclass
class App:
    """A running worker built from an entries file written into a temporary directory."""

    worker: Worker
    path: Path

    @property
    def consumer(self) -> Any:
        return self.worker.consumers[0]

    async def publish(self, queue: str, data: Any, headers: dict[str, Any] | None = None) -> None:
        await self.worker.host.publish("app", queue, data, headers or {})

    async def info(self, queue: str) -> tuple[int, int]:
        return await self.worker.host.info("app", queue)

    async def idle(self, timeout: float = 10.0) -> None:
        await asyncio.wait_for(self.worker.wait_idle(), timeout)

    async def drain(self, queue: str) -> list[Received]:
        """Take every ready message out of a queue that no consumer reads (the test's sink)."""
        entry = self.worker.host.queue("app", queue)
        driver = self.worker.drivers[entry.driver]
        got: list[Delivery] = []
        consumer = entries.ConsumerEntry.model_construct(prefetch=10_000)
        subscription = await driver.consume(entry, consumer, got.append)
        await subscription.cancel()
        for delivery in got:
            await delivery.ack()
        decode = CODECS[entry.codec].decode
        return [Received(decode(d.body), dict(d.headers), d.id, d.attempts) for d in got]


FAST_RETRY = {"delay": "5ms", "max_delay": "20ms"}


@dataclass
class AppFactory:
    tmp_path: Path
    apps: list[App] = field(default_factory=list)

    def write(self, lua: str, **consumer: Any) -> Path:
        """An entries file with queues `in`, `out`, `other`, one consumer on `in` running `lua`.

        `in` retries after 5 ms (FAST_RETRY), so that tests counting redeliveries do not wait
        out the default backoff; `in_queue` adds or overrides fields of `in` (`retry: None`
        for the default backoff)."""
        extra_entries = consumer.pop("extra_entries", [])
        in_queue = {"retry": FAST_RETRY, **consumer.pop("in_queue", {})}
        modules = consumer.pop("modules", None)
        function: dict[str, Any] = {
            "name": "handler",
            "kind": "function.lua",
            "source": "file://handler.lua",
            "method": consumer.pop("method", "handle"),
        }
        if modules is not None:
            function["modules"] = modules
        max_length = consumer.pop("max_length", 1000)
        document = {
            "version": "1.0",
            "namespace": "app",
            "entries": [
                {"name": "broker", "kind": "queue.driver.memory", "publish_timeout": "200ms"},
                *(
                    {
                        "name": name,
                        "kind": "queue.queue",
                        "driver": "broker",
                        "driver_options": {"memory": {"max_length": max_length}},
                    }
                    | (in_queue if name == "in" else {})
                    for name in ("in", "out", "other")
                ),
                function,
                {"id": "worker", "kind": "queue.consumer", "queue": "in", "func": "handler"}
                | consumer,
                *extra_entries,
            ],
        }
        (self.tmp_path / "handler.lua").write_text(textwrap.dedent(lua))
        for entry in document["entries"]:
            if entry.get("retry", "") is None:
                del entry["retry"]
        path = self.tmp_path / "app.yaml"
        path.write_text(yaml.safe_dump(document, sort_keys=False))
        return path

    async def start(self, lua: str, settings: Settings | None = None, **consumer: Any) -> App:
        path = self.write(lua, **consumer)
        worker = build(load(entries.load([path]), settings or Settings(shutdown_timeout=5.0)))
        await worker.start()
        app = App(worker, path)
        self.apps.append(app)
        return app

    async def run(
        self,
        lua: str,
        messages: Sequence[Any | tuple[Any, dict[str, Any]]],
        settings: Settings | None = None,
        **consumer: Any,
    ) -> tuple[App, list[Received]]:
        """Start, publish `messages` to `in`, wait until idle, return what reached `out`."""
        app = await self.start(lua, settings, **consumer)
        for message in messages:
            data, headers = message if isinstance(message, tuple) else (message, {})
            await app.publish("in", data, headers)
        await app.idle()
        return app, await app.drain("out")


@pytest.fixture(autouse=True)
def _restore_logging() -> Iterator[None]:
    """`luaq.runtime.cli.main` points the root logger at capsys's stderr, and `luaq run` takes
    over reports, uncaught exceptions and warnings; put back what was there before."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    hooks = sys.excepthook, threading.excepthook
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
    sys.excepthook, threading.excepthook = hooks
    logging.captureWarnings(False)


class Vhosts:
    """Fresh vhosts, guest allowed in, made `batch` at a time, and the ones tests are done with
    deleted (queues and all) in the same call: each rabbitmqctl boots an Erlang VM (0.5 s), and
    three per test (add, permit, delete) cost the suite 1.5 s for each test on the broker."""

    def __init__(self, ctl: Callable[..., str] = rabbitmqctl, batch: int = 8) -> None:
        self.ctl, self.batch = ctl, batch
        self.fresh: list[str] = []
        self.done: list[str] = []

    def take(self) -> str:
        if not self.fresh:
            self.fresh = [f"luaq-test-{uuid4().hex[:12]}" for _ in range(self.batch)]
            self.settle(self.fresh)
        return self.fresh.pop()

    def close(self) -> None:
        self.done += self.fresh
        self.settle([])

    def settle(self, add: list[str]) -> None:
        """Delete the vhosts tests are done with and add `add`, in one `rabbitmqctl eval`."""
        gone, self.done = self.done, []
        # a vhost already gone is no error here: the test that had it is over
        steps = [f'rabbit_vhost:delete(<<"{name}">>, <<"tests">>)' for name in gone]
        for name in add:
            steps.append(f'ok = rabbit_vhost:add(<<"{name}">>, <<"tests">>)')
            permit = ", ".join(f'<<"{arg}">>' for arg in ("guest", name, ".*", ".*", ".*", "tests"))
            steps.append(f"ok = rabbit_auth_backend_internal:set_permissions({permit})")
        if steps:
            self.ctl("eval", "".join(f"{step}, " for step in steps) + "ok.")


@pytest.fixture(scope="session")
def _vhosts() -> Iterator[Vhosts]:
    vhosts = Vhosts()
    yield vhosts
    vhosts.close()


@pytest.fixture
def vhost(_vhosts: Vhosts) -> Iterator[str]:
    """A vhost of the test's own, with guest allowed in; deleted (queues and all) afterwards,
    with the next batch of them (Vhosts)."""
    name = _vhosts.take()
    try:
        yield name
    finally:
        _vhosts.done.append(name)


@pytest.fixture
def url(vhost: str) -> str:
    return vhost_url(vhost)


@pytest.fixture
def spawn(tmp_path: Path) -> Iterator[Spawner]:
    """`luaq` as child processes of the test; what still runs at the end is killed, so that a
    failed test leaves no worker behind."""
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.stop_all()


@pytest.fixture(scope="session")
def own_node() -> Iterator[RabbitNode]:
    """A RabbitMQ node of the suite's own (rabbit_node, the default configuration but for a
    refused dead letter sent again after 1 s, RESEND), started once rather than by each test
    (5 s or more a start): for tests that add users, set limits or policies or restart the
    broker, never on the shared node. Each works in a vhost of its own (own_node_vhost) and
    puts back what is not the vhost's."""
    with rabbit_node(advanced=RESEND) as node:
        yield node


@pytest.fixture(scope="session")
def _own_node_vhosts(own_node: RabbitNode) -> Iterator[Vhosts]:
    vhosts = Vhosts(own_node.ctl, batch=1)
    yield vhosts
    vhosts.close()


@pytest.fixture
def own_node_vhost(
    own_node: RabbitNode, _own_node_vhosts: Vhosts
) -> Iterator[tuple[RabbitNode, str]]:
    """The suite's own node and a vhost of the test's own on it, guest allowed in."""
    name = _own_node_vhosts.take()
    try:
        yield own_node, name
    finally:
        _own_node_vhosts.done.append(name)


@pytest.fixture
async def apps(tmp_path: Path) -> Any:
    factory = AppFactory(tmp_path)
    yield factory
    for app in factory.apps:
        await app.worker.stop(1.0)


async def eventually(check: Callable[[], Awaitable[bool] | bool], timeout: float = 5.0) -> None:
    """Poll `check` until it is true or the deadline passes (no sleeps as synchronisation)."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout
    while True:
        result = check()
        if isinstance(result, Awaitable):
            result = await result
        if result:
            return
        if loop.time() > deadline:
            raise AssertionError("condition not met before the deadline")
        await asyncio.sleep(0.005)
