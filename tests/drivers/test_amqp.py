"""End to end on the real RabbitMQ at 127.0.0.1:5672 (guest/guest): the `luaq` command with the
AMQP driver, as a user runs it.

Every queue has a unique name (`queue_name:`) and is deleted from the broker at teardown, also
when a test fails; the recovery test runs in a vhost of its own (deleted afterwards, with its
queues) so that closing "all connections" touches nobody else. Nothing is skipped when the
broker is absent: then these tests fail. Waiting is polling with a deadline, never a sleep.
"""

from __future__ import annotations

import asyncio
import json
import shutil
import signal
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from contextlib import asynccontextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import quote
from uuid import uuid4

import aiormq
import aiormq.abc
import msgpack
import pytest
import yaml
from broker import AMQP_URL, delete_queues, queue_depth, rabbitmqctl
from luaq.runtime import entries
from luaq.runtime.cli import main
from pamqp.commands import Basic
from processes import (
    Process,
    Spawner,
    summaries,
    summary,
    write_app,
    write_jsonl,
)

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "email"

REJECTED_LOG = "message cannot be handled, rejected"


# -- the broker, seen from outside luaq -----------------------------------------------------------


@dataclass
class Rabbit:
    """Plain aiormq access to the broker: raw publishes, queue depth, basic_get, cleanup."""

    url: str = AMQP_URL
    names: list[str] = field(default_factory=list)

    def name(self, label: str) -> str:
        name = f"luaq-test-{label}-{uuid4().hex[:12]}"
        self.names.append(name)
        return name

    @asynccontextmanager
    async def channel(self) -> AsyncIterator[aiormq.abc.AbstractChannel]:
        # a short-lived connection per operation: nothing of ours is open when a test closes
        # the broker's connections
        connection = await aiormq.connect(self.url)
        try:
            yield await connection.channel()
        finally:
            await connection.close()

    async def publish(
        self,
        queue: str,
        body: bytes,
        content_type: str,
        message_id: str | None = None,
        priority: int | None = None,
    ) -> None:
        async with self.channel() as channel:
            confirmation = await channel.basic_publish(
                body,
                routing_key=queue,
                mandatory=True,
                properties=Basic.Properties(
                    content_type=content_type, message_id=message_id, priority=priority
                ),
            )
        assert isinstance(confirmation, Basic.Ack), confirmation

    async def counts(self, queue: str) -> tuple[int, int]:
        """(ready messages, consumers); fails if the queue is missing."""
        return await queue_depth(queue, self.url)

    async def depth(self, queue: str) -> int:
        return (await self.counts(queue))[0]

    async def settled_depth(self, queue: str, timeout: float = 10.0) -> int:
        """The ready count once no consumer is attached any more: by then the broker has
        requeued whatever a departed consumer left unacknowledged."""
        await poll(lambda: self._no_consumers(queue), timeout, f"no consumer on {queue}")
        return await self.depth(queue)

    async def _no_consumers(self, queue: str) -> bool:
        return (await self.counts(queue))[1] == 0

    async def take_all(self, queue: str) -> list[aiormq.abc.DeliveredMessage]:
        """Every ready message of a queue no consumer reads, removed (basic_get, no_ack)."""
        got: list[aiormq.abc.DeliveredMessage] = []
        async with self.channel() as channel:
            while True:
                message = await channel.basic_get(queue, no_ack=True)
                if isinstance(message.delivery, Basic.GetEmpty):
                    return got
                got.append(message)

    async def delete_queues(self) -> None:
        await delete_queues(*self.names, url=self.url)


@pytest.fixture
async def rabbit() -> AsyncIterator[Rabbit]:
    broker = Rabbit()
    try:
        yield broker
    finally:
        await broker.delete_queues()


async def poll(
    check: Callable[[], Awaitable[bool] | bool],
    timeout: float,
    what: str,
    process: Process | None = None,
) -> None:
    """Poll `check` until it holds; fail at the deadline, or at once if `process` exits."""
    deadline = time.monotonic() + timeout
    while True:
        result = check()
        if not isinstance(result, bool):
            result = await result
        if result:
            return
        if process is not None and process.popen.poll() is not None:
            raise AssertionError(
                f"luaq exited ({process.popen.returncode}) while waiting for {what}:\n"
                f"{process.stderr}"
            )
        if time.monotonic() > deadline:
            detail = f":\n{process.stderr}" if process is not None else ""
            raise AssertionError(f"{what} not met within {timeout}s{detail}")
        await asyncio.sleep(0.02)


# -- luaq as a child process ----------------------------------------------------------------------


@pytest.fixture
def spawn(rabbit: Rabbit, tmp_path: Path) -> Iterator[Spawner]:
    """Processes are killed at teardown before `rabbit` deletes their queues."""
    spawner = Spawner(tmp_path)
    yield spawner
    spawner.stop_all()


# -- entries files --------------------------------------------------------------------------------


def amqp_broker(**extra: Any) -> dict[str, Any]:
    return {"name": "broker", "kind": "queue.driver.amqp", "url": AMQP_URL, **extra}


def amqp_queue(name: str, queue_name: str, **extra: Any) -> dict[str, Any]:
    return {
        "name": name,
        "kind": "queue.queue",
        "driver": "broker",
        "queue_name": queue_name,
        **extra,
    }


def lua_consumer(queue: str, source: str, **extra: Any) -> dict[str, Any]:
    return {
        "id": "worker",
        "kind": "queue.consumer",
        "queue": queue,
        "method": "handle",
        "source": source,
        **extra,
    }


# -- 1. the email example on RabbitMQ -------------------------------------------------------------


async def test_email_example_on_rabbitmq(
    tmp_path: Path, rabbit: Rabbit, spawn: Callable[..., Process]
) -> None:
    example = yaml.safe_load((EXAMPLE / "app.yaml").read_text())
    names = {"emails": rabbit.name("emails"), "receipts": rabbit.name("receipts")}
    for entry in example["entries"]:
        if entry["kind"] == "queue.driver.memory":
            entry.update(kind="queue.driver.amqp", url=AMQP_URL)
        elif entry["kind"] == "queue.queue":
            entry["queue_name"] = names[entry["name"]]
    assert {e["kind"] for e in example["entries"]} >= {"queue.driver.amqp", "queue.queue"}
    for lua in ("email.lua", "receipts.lua"):
        shutil.copy(EXAMPLE / lua, tmp_path / lua)
    app = tmp_path / "app.yaml"
    app.write_text(yaml.safe_dump(example, sort_keys=False))
    messages = EXAMPLE / "messages.jsonl"
    inputs = [json.loads(line) for line in messages.read_text().splitlines() if line.strip()]
    flaky = [m for m in inputs if m["data"]["to"].endswith("@flaky.example")]
    assert flaky, "the example has addresses that fail once"

    process = spawn("run", app, "--input", messages, "--until-idle")
    code = process.wait(30)

    assert code == 0, process.stderr
    rows = summary(process.stdout)
    assert set(rows) == {"app:email_worker", "app:receipt_worker"}
    emails, receipts = rows["app:email_worker"], rows["app:receipt_worker"]
    assert (receipts["processed"], receipts["acked"]) == (len(inputs), len(inputs))
    assert emails["acked"] == len(inputs)
    assert emails["retried"] == len(flaky), "each flaky address fails once and is tried again"
    assert emails["failed"] == len(flaky)
    assert emails["processed"] == len(inputs) + len(flaky)
    assert emails["rejected"] == receipts["rejected"] == 0
    # what the receipt handler saw came through RabbitMQ's properties and headers
    seen = {
        line["fields"]["to"]: line["fields"] for line in process.logs() if line["msg"] == "Receipt"
    }
    assert set(seen) == {m["data"]["to"] for m in inputs}
    for message in inputs:
        fields, headers = seen[message["data"]["to"]], message.get("headers", {})
        assert fields["priority"] == headers.get("priority", "normal"), fields
        if "correlation_id" in headers:
            assert fields["correlation_id"] == headers["correlation_id"], fields
        else:  # the handler falls back to the email's message id
            assert fields["correlation_id"], fields
    for name in names.values():
        assert await rabbit.settled_depth(name) == 0, f"{name} is not empty"


# -- 2. luaq publish -------------------------------------------------------------------------------

SEEN_HANDLER = """
local queue = require("queue")

function handle(payload)
  local msg = queue.message()
  assert(queue.publish("seen", {
    id = msg:id(),
    to = payload.to,
    priority = msg:header("priority"),
    correlation_id = msg:header("correlation_id"),
  }))
end
"""


async def test_publish_command_then_run(
    tmp_path: Path,
    rabbit: Rabbit,
    spawn: Callable[..., Process],
    capsys: pytest.CaptureFixture[str],
) -> None:
    emails, seen = rabbit.name("emails"), rabbit.name("seen")
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(),
            amqp_queue("emails", emails),
            amqp_queue("seen", seen),
            lua_consumer("emails", SEEN_HANDLER),
        ],
    )

    published = spawn(
        "publish", "--entries", app, "app:emails", '{"to": "a@b.c"}',
        "-H", "priority=high", "-H", "correlation_id=req-9",
    )  # fmt: skip
    assert published.wait(20) == 0, published.stderr
    printed = published.stdout.splitlines()
    assert len(printed) == 1, published.stdout
    message_id = printed[0].strip()
    assert message_id, published.stdout
    assert " " not in message_id, message_id

    # other AMQP clients read the well-known headers as properties
    async with rabbit.channel() as channel:
        raw = await channel.basic_get(emails, no_ack=False)
        assert isinstance(raw.delivery, Basic.GetOk), "luaq publish left nothing on the queue"
        assert raw.delivery.delivery_tag is not None
        await channel.basic_nack(raw.delivery.delivery_tag, requeue=True)
    properties = raw.header.properties
    assert properties.message_id == message_id
    assert properties.correlation_id == "req-9"
    assert properties.priority == 9
    assert properties.content_type == "application/json"
    assert json.loads(raw.body) == {"to": "a@b.c"}

    run = spawn("run", app, "--until-idle")
    assert run.wait(30) == 0, run.stderr
    worker = summary(run.stdout)["app:worker"]
    assert (worker["processed"], worker["acked"], worker["failed"]) == (1, 1, 0), worker
    got = await rabbit.take_all(seen)
    assert [json.loads(m.body) for m in got] == [
        {"id": message_id, "to": "a@b.c", "priority": "high", "correlation_id": "req-9"}
    ]

    # bad calls: a configuration error, nothing published
    code = main(["publish", "--entries", str(app), "app:nope", '{"to": "x@y.z"}'])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "QUEUE_ID: app:nope is not a declared queue.queue entry" in err
    assert "nothing was started" in err
    code = main(["publish", "--entries", str(app), "emails", '{"to": "x@y.z"}', "-H", "priority"])
    err = capsys.readouterr().err
    assert code == 2, err
    assert "-H priority: expected KEY=VALUE" in err
    assert "nothing was started" in err
    assert await rabbit.depth(emails) == 0


# -- 3. msgpack -----------------------------------------------------------------------------------

ECHO_HANDLER = """
local queue = require("queue")

function handle(payload)
  assert(queue.publish("out", {
    echo = payload,
    types = {
      int = math.type(payload.int),
      big = math.type(payload.big),
      float = math.type(payload.float),
      whole_float = math.type(payload.whole_float),
    },
  }))
end
"""

MSGPACK_DATA: dict[str, Any] = {
    "text": "héllo wörld — 日本語 🚀",
    "int": 42,
    "big": 2**62,
    "negative": -17,
    "float": 0.1,
    "whole_float": 3.0,
    "flag": True,
    "nested": {
        "list": [1, 2.5, "три", {"deep": [True, False, -1]}],
        "map": {"ключ": "значение", "zero": 0, "half": 0.5},
    },
}


def typed(value: Any) -> Any:
    """`value` with every scalar tagged by its type: 1 and 1.0 (and True) compare unequal."""
    if isinstance(value, dict):
        return {key: typed(item) for key, item in value.items()}
    if isinstance(value, list):
        return [typed(item) for item in value]
    return (type(value).__name__, value)


async def test_msgpack_round_trip_through_rabbitmq(
    tmp_path: Path, rabbit: Rabbit, spawn: Callable[..., Process]
) -> None:
    jobs, out = rabbit.name("jobs"), rabbit.name("out")
    msgpack_codec = {"codec": "application/msgpack"}
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(),
            amqp_queue("jobs", jobs, **msgpack_codec),
            amqp_queue("out", out, **msgpack_codec),
            lua_consumer("jobs", ECHO_HANDLER),
        ],
    )
    by_luaq = {"n": 1, **MSGPACK_DATA}
    by_other_client = {"n": 2, **MSGPACK_DATA}
    messages = write_jsonl(tmp_path / "in.jsonl", [{"queue": "jobs", "data": by_luaq}])
    process = spawn("run", app, "--input", messages)
    await poll(lambda: "worker started" in process.messages(), 20, "worker started", process)
    await rabbit.publish(jobs, msgpack.packb(by_other_client), "application/msgpack")
    await poll(lambda: _depth_at_least(rabbit, out, 2), 20, "two echoes", process)
    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0, process.stderr

    got = await rabbit.take_all(out)
    assert [m.header.properties.content_type for m in got] == ["application/msgpack"] * 2
    echoes = sorted((msgpack.unpackb(m.body) for m in got), key=lambda e: e["echo"]["n"])
    for echo, sent in zip(echoes, (by_luaq, by_other_client), strict=True):
        assert typed(echo["echo"]) == typed(sent)
        assert echo["types"] == {
            "int": "integer",
            "big": "integer",
            "float": "float",
            "whole_float": "float",
        }
    worker = summary(process.stdout)["app:worker"]
    assert (worker["acked"], worker["failed"], worker["rejected"]) == (2, 0, 0), worker


async def _depth_at_least(rabbit: Rabbit, queue: str, count: int) -> bool:
    return await rabbit.depth(queue) >= count


# -- 4. poison messages ---------------------------------------------------------------------------

FORWARD_HANDLER = """
local queue = require("queue")

function handle(payload)
  local msg = queue.message()
  assert(queue.publish("out", {n = payload.n, id = msg:id()}))
end
"""


async def test_poison_messages_are_rejected_once(
    tmp_path: Path, rabbit: Rabbit, spawn: Callable[..., Process]
) -> None:
    """With `dead_letter` but no dead-letter queue (test_reliability has the other cases)."""
    jobs, out = rabbit.name("jobs"), rabbit.name("out")
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(),
            amqp_queue("jobs", jobs, dead_letter={"max_attempts": 3}),
            amqp_queue("out", out),
            lua_consumer("jobs", FORWARD_HANDLER),
        ],
    )
    # declare the queues the way luaq does (an empty run), then publish as another client would
    declared = spawn("run", app, "--until-idle")
    assert declared.wait(20) == 0, declared.stderr
    good = [json.dumps({"n": n}).encode() for n in (1, 2, 3)]
    await rabbit.publish(jobs, good[0], "application/json", "good-1")
    await rabbit.publish(jobs, b'{"n": 4', "application/json", "poison-json")
    await rabbit.publish(jobs, good[1], "application/json", "good-2")
    await rabbit.publish(jobs, b"n=5", "text/x-nope", "poison-type")
    await rabbit.publish(jobs, good[2], "application/json", "good-3")
    assert await rabbit.depth(jobs) == 5

    process = spawn("run", app, "--until-idle")
    assert process.wait(30) == 0, process.stderr

    worker = summary(process.stdout)["app:worker"]
    assert worker["rejected"] == 2, worker
    assert (worker["processed"], worker["acked"], worker["retried"]) == (3, 3, 0), worker
    rejections = [line for line in process.logs() if line["msg"] == REJECTED_LOG]
    assert sorted(line["message_id"] for line in rejections) == ["poison-json", "poison-type"]
    assert all(line["consumer"] == "app:worker" for line in rejections)
    got = [json.loads(m.body) for m in await rabbit.take_all(out)]
    assert sorted((m["n"], m["id"]) for m in got) == [(1, "good-1"), (2, "good-2"), (3, "good-3")]
    assert await rabbit.settled_depth(jobs) == 0, "a poison message went back to the queue"


# -- 5. recovery ----------------------------------------------------------------------------------


async def test_worker_recovers_when_the_broker_closes_its_connection(
    tmp_path: Path, vhost: str, spawn: Callable[..., Process]
) -> None:
    # the vhost's deletion at teardown removes these queues as well
    rabbit = Rabbit(url=f"{AMQP_URL}{quote(vhost, safe='')}")
    jobs, out = rabbit.name("jobs"), rabbit.name("out")
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(
                vhost=vhost,
                reconnect_delay="200ms",
                reconnect_max_delay="1s",
                connection_timeout="2s",
            ),
            amqp_queue("jobs", jobs),
            amqp_queue("out", out),
            lua_consumer("jobs", FORWARD_HANDLER, concurrency=4),
        ],
    )
    process = spawn("run", app, "--shutdown-timeout", "5")
    await poll(lambda: "worker started" in process.messages(), 20, "worker started", process)

    sunk: list[dict[str, Any]] = []  # everything taken off the sink so far

    async def reached(ids: list[str]) -> bool:
        sunk.extend(json.loads(m.body) for m in await rabbit.take_all(out))
        return set(ids) <= {m["id"] for m in sunk}

    first = [f"first-{n}" for n in range(10)]
    for n, message_id in enumerate(first):
        await rabbit.publish(jobs, json.dumps({"n": n}).encode(), "application/json", message_id)
    await poll(lambda: reached(first), 15, "the first batch in the sink", process)

    rabbitmqctl("close_all_connections", "--vhost", vhost, "test")
    lost, restored = "connection lost, reconnecting", "connection restored"
    await poll(lambda: restored in process.messages(), 10, "connection restored", process)
    messages = process.messages()
    assert lost in messages, process.stderr
    assert messages.index(lost) < messages.index(restored), messages
    for line in process.logs():
        if line["msg"] in (lost, restored):
            assert line["driver"] == "app:broker", line
    # two connections per driver (publishing, consuming): the recovered ones, nothing left
    # behind by the recovery
    connections = rabbitmqctl("list_connections", "vhost").split()
    assert connections.count(vhost) == 2, connections

    second = [f"second-{n}" for n in range(10)]
    for n, message_id in enumerate(second, 10):
        await rabbit.publish(jobs, json.dumps({"n": n}).encode(), "application/json", message_id)
    await poll(lambda: reached(second), 15, "the second batch in the sink", process)

    process.popen.send_signal(signal.SIGTERM)
    assert process.wait(20) == 0, process.stderr
    sunk.extend(json.loads(m.body) for m in await rabbit.take_all(out))
    assert {m["id"] for m in sunk} == {*first, *second}, "every input reached the sink"
    assert {m["n"] for m in sunk} == set(range(20))
    worker = summary(process.stdout)["app:worker"]
    assert worker["acked"] >= 20, worker


# -- 6. --processes -------------------------------------------------------------------------------


async def test_two_processes_share_the_work(
    tmp_path: Path, rabbit: Rabbit, spawn: Callable[..., Process]
) -> None:
    jobs, out = rabbit.name("jobs"), rabbit.name("out")
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(),
            amqp_queue("jobs", jobs),
            amqp_queue("out", out),
            lua_consumer("jobs", FORWARD_HANDLER, concurrency=4),
        ],
    )
    count = 200
    messages = write_jsonl(
        tmp_path / "in.jsonl", [{"queue": "jobs", "data": {"n": n}} for n in range(count)]
    )

    process = spawn("run", app, "--input", messages, "--processes", "2", "--until-idle")
    assert process.wait(45) == 0, process.stderr

    tables = summaries(process.stdout)
    assert len(tables) == 2, process.stdout
    assert all(set(table) == {"app:worker"} for table in tables), tables
    assert sum(t["app:worker"]["processed"] for t in tables) >= count, tables
    assert sum(t["app:worker"]["acked"] for t in tables) >= count, tables
    assert process.messages().count("worker started") == 2, process.stderr
    got = [json.loads(m.body) for m in await rabbit.take_all(out)]
    assert {m["n"] for m in got} == set(range(count))
    assert await rabbit.settled_depth(jobs) == 0


def test_processes_refuse_the_memory_driver(tmp_path: Path, spawn: Callable[..., Process]) -> None:
    app = write_app(
        tmp_path / "app.yaml",
        [
            {"name": "broker", "kind": "queue.driver.memory"},
            {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
            lua_consumer("jobs", "function handle() end"),
        ],
    )

    process = spawn("run", app, "--processes", "2", "--until-idle")

    assert process.wait(20) == 2, process.stderr
    assert "app:broker" in process.stderr
    assert "in-memory" in process.stderr
    assert "consumer" not in process.stdout, "nothing ran"


# -- 7. entries validation ------------------------------------------------------------------------


def check(capsys: pytest.CaptureFixture[str], path: Path) -> tuple[int, str, str]:
    code = main(["check", str(path)])
    captured = capsys.readouterr()
    return code, captured.out, captured.err


async def test_amqp_entries_with_env_and_durations_are_valid(
    tmp_path: Path,
    rabbit: Rabbit,
    spawn: Callable[..., Process],
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    jobs = rabbit.name("jobs")
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(
                url="${env:LUAQ_TEST_URL}",
                connection_name="luaq-${env:LUAQ_TEST_NAME}",
                heartbeat="10s",
                connection_timeout="1.5m",
                reconnect_delay="500ms",
                reconnect_max_delay="1h",
                default_message_ttl=30,
                prefetch_count=50,
            ),
            amqp_queue("jobs", jobs, driver_options={"amqp": {"message_ttl": "2.5m"}}),
        ],
    )
    env = {"LUAQ_TEST_URL": AMQP_URL, "LUAQ_TEST_NAME": "e2e"}
    for name, value in env.items():
        monkeypatch.setenv(name, value)

    code, out, err = check(capsys, app)

    assert code == 0, err
    assert out.startswith("ok: 1 file(s), 1 driver(s), 1 queue(s)"), out
    driver = entries.load([app]).drivers["app:broker"]
    assert isinstance(driver, entries.AmqpDriverEntry)
    assert driver.url == AMQP_URL
    assert driver.connection_name == "luaq-e2e"
    assert (driver.heartbeat, driver.connection_timeout) == (10.0, 90.0)
    assert (driver.reconnect_delay, driver.reconnect_max_delay) == (0.5, 3600.0)
    # the expanded url is the one used: a publish through it reaches the broker
    published = spawn("publish", "--entries", app, "jobs", '{"n": 1}', env=env)
    assert published.wait(20) == 0, published.stderr
    assert await rabbit.depth(jobs) == 1


UNREADABLE_URL = (
    "url: cannot be read as amqp://user:password@host:port/vhost (a '/', '?', '#' or '@' in the "
    "user, password or vhost must be percent-encoded, as %2F, %3F, %23, %40)"
)
QUERY_URL = (
    "url: query parameters are not read; use the entry's fields (heartbeat, connection_timeout, "
    "connection_name, tls, ...), and percent-encode a '?' or '#' in the password"
)
BAD_DRIVERS: dict[str, tuple[dict[str, Any], str]] = {
    "env-unset": (
        {"url": "${env:LUAQ_TEST_URL}"},
        "url: environment variable LUAQ_TEST_URL is not set",
    ),
    "env-unset-nested": (
        {"tls": {"enabled": True, "ca": "${env:LUAQ_TEST_CA}"}},
        "tls.ca: environment variable LUAQ_TEST_CA is not set",
    ),
    "scheme": (
        {"url": "http://guest:guest@127.0.0.1:5672/"},
        "url: must start with amqp:// or amqps://",
    ),
    "port": ({"url": "amqp://guest:guest@127.0.0.1:amqp/"}, UNREADABLE_URL),
    # a password with a '/' or '?' puts part of it where the port or the query should be: no
    # message quotes any of it
    "slash-in-password": ({"url": "amqp://luaq:Zm9v/YmFy@rabbitmq:5672/"}, UNREADABLE_URL),
    # ... and after digits, it reads as host `luaq`, port 12345 and a path that holds the rest
    "slash-after-digits": ({"url": "amqp://luaq:12345/Sekr3t@rabbitmq:5672/"}, UNREADABLE_URL),
    "slash-in-vhost": ({"url": "amqp://guest:guest@rabbitmq:5672/a/b"}, UNREADABLE_URL),
    "query": ({"url": "amqp://guest:guest@127.0.0.1:5672/?heartbeat=30"}, QUERY_URL),
    "question-mark-in-password": ({"url": "amqp://luaq:s3cr3t?tail@rabbitmq/"}, UNREADABLE_URL),
    "delays": (
        {"reconnect_delay": "5s", "reconnect_max_delay": "500ms"},
        "reconnect_max_delay: must not be less than reconnect_delay",
    ),
    "garbage-duration": (
        {"heartbeat": "soon"},
        "heartbeat: expected a duration like 10s, 500ms, 1h, got 'soon'",
    ),
    # AMQP negotiates whole seconds: 400ms used to round to 0, heartbeats off
    "sub-second-heartbeat": (
        {"heartbeat": "400ms"},
        "heartbeat: AMQP heartbeats are whole seconds: 0.4s would be 0, which turns them off "
        "(write 0 for that, or at least 1s)",
    ),
    "fractional-heartbeat": (
        {"heartbeat": 2.5},
        "heartbeat: AMQP heartbeats are whole seconds: 2.5s is not one (write 2s or 3s)",
    ),
    "huge-heartbeat": (
        {"heartbeat": "19h"},
        "heartbeat: AMQP heartbeats are at most 65535s, not 68400s",
    ),
    "garbage-unit": (
        {"reconnect_delay": "10 parsecs"},
        "reconnect_delay: expected a duration like 10s, 500ms, 1h, got '10 parsecs'",
    ),
    "unknown-field": ({"colour": "blue"}, "colour: unknown field"),
    "unknown-tls-field": ({"tls": {"verify": False}}, "tls.verify: unknown field"),
}


@pytest.mark.parametrize(("fields", "problem"), BAD_DRIVERS.values(), ids=BAD_DRIVERS.keys())
def test_amqp_driver_entry_problems(
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
    monkeypatch: pytest.MonkeyPatch,
    fields: dict[str, Any],
    problem: str,
) -> None:
    monkeypatch.delenv("LUAQ_TEST_URL", raising=False)
    monkeypatch.delenv("LUAQ_TEST_CA", raising=False)
    app = write_app(tmp_path / "app.yaml", [amqp_broker(**fields)])

    code, out, err = check(capsys, app)

    assert code == 2, out
    assert err.splitlines() == [
        f"{app}: app:broker: {problem}",
        "luaq: 1 problem(s), nothing was started",
    ]


@pytest.mark.parametrize(("heartbeat", "seconds"), [(0, 0.0), ("1000ms", 1.0), ("1.5m", 90.0)])
def test_heartbeats_in_whole_seconds_or_off_are_valid(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], heartbeat: Any, seconds: float
) -> None:
    app = write_app(tmp_path / "app.yaml", [amqp_broker(heartbeat=heartbeat)])

    code, _, err = check(capsys, app)

    assert code == 0, err
    driver = entries.load([app]).drivers["app:broker"]
    assert isinstance(driver, entries.AmqpDriverEntry)
    assert driver.heartbeat == seconds


BAD_QUEUE_OPTIONS: dict[str, tuple[dict[str, Any], str]] = {
    "garbage-ttl": (
        {"message_ttl": "forever"},
        "driver_options.amqp.message_ttl: expected a duration like 10s, 500ms, 1h, got 'forever'",
    ),
    "unknown-option": ({"max_lenght": 5}, "driver_options.amqp.max_lenght: unknown field"),
}


@pytest.mark.parametrize(
    ("options", "problem"), BAD_QUEUE_OPTIONS.values(), ids=BAD_QUEUE_OPTIONS.keys()
)
def test_amqp_queue_option_problems(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], options: dict[str, Any], problem: str
) -> None:
    queue = amqp_queue("jobs", "luaq-test-never-declared", driver_options={"amqp": options})
    app = write_app(tmp_path / "app.yaml", [amqp_broker(), queue])

    code, out, err = check(capsys, app)

    assert code == 2, out
    assert err.splitlines() == [
        f"{app}: app:jobs: {problem}",
        "luaq: 1 problem(s), nothing was started",
    ]


# -- 8. passwords ---------------------------------------------------------------------------------


@pytest.mark.parametrize("command", ["run", "publish"])
def test_password_never_appears(
    tmp_path: Path, spawn: Callable[..., Process], command: str
) -> None:
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(url="amqp://guest:supersecret@127.0.0.1:5999/", connection_timeout="5s"),
            amqp_queue("jobs", f"luaq-test-never-declared-{uuid4().hex[:12]}"),
            lua_consumer("jobs", "function handle() end"),
        ],
    )
    args = {
        "run": ["run", app, "--until-idle"],
        "publish": ["publish", "--entries", app, "jobs", '{"n": 1}'],
    }[command]

    started = time.monotonic()
    process = spawn("--log-level", "debug", *args)
    code = process.wait(20)
    elapsed = time.monotonic() - started

    assert code == 1, process.stderr
    assert elapsed < 10, f"a refused connection took {elapsed:.1f}s to report"
    assert "127.0.0.1:5999" in process.stderr
    assert "amqp://guest:***@127.0.0.1:5999/" in process.stderr
    assert "supersecret" not in process.stderr
    assert "supersecret" not in process.stdout


# -- 9. queue options on the broker ---------------------------------------------------------------


async def test_queue_options_reach_the_broker(
    tmp_path: Path, rabbit: Rabbit, spawn: Callable[..., Process]
) -> None:
    limited, temporary = rabbit.name("limited"), rabbit.name("temporary")
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(default_message_ttl="30s"),
            amqp_queue(
                "limited",
                limited,
                driver_options={
                    "amqp": {"max_length": 5, "message_ttl": "60s", "max_priority": 10}
                },
            ),
            amqp_queue(
                "temporary",
                temporary,
                driver_options={"amqp": {"durable": False, "queue_expiry": "10m"}},
            ),
            lua_consumer("limited", "function handle() end"),
        ],
    )

    process = spawn("run", app, "--until-idle")
    assert process.wait(20) == 0, process.stderr

    assert summary(process.stdout)["app:worker"]["processed"] == 0
    listed = json.loads(
        rabbitmqctl("list_queues", "name", "arguments", "durable", "--formatter", "json")
    )
    queues = {q["name"]: q for q in listed if q["name"] in (limited, temporary)}
    assert set(queues) == {limited, temporary}, listed

    def arguments(name: str) -> dict[str, Any]:
        return {key: value for key, _type, value in queues[name]["arguments"]}

    assert arguments(limited) == {
        "x-max-length": 5,
        "x-message-ttl": 60_000,
        "x-max-priority": 10,
    }
    assert queues[limited]["durable"] is True
    # the driver's default_message_ttl applies where the queue sets none
    assert arguments(temporary) == {"x-message-ttl": 30_000, "x-expires": 600_000}
    assert queues[temporary]["durable"] is False


async def test_priority_header_orders_a_max_priority_queue(
    tmp_path: Path, rabbit: Rabbit, spawn: Callable[..., Process]
) -> None:
    ranked = rabbit.name("ranked")
    app = write_app(
        tmp_path / "app.yaml",
        [
            amqp_broker(),
            amqp_queue("ranked", ranked, driver_options={"amqp": {"max_priority": 10}}),
        ],
    )
    order = ["low", "normal", "high", 7]
    messages = write_jsonl(
        tmp_path / "in.jsonl",
        [{"queue": "ranked", "data": {"p": p}, "headers": {"priority": p}} for p in order],
    )

    process = spawn("run", app, "--input", messages, "--until-idle")
    assert process.wait(20) == 0, process.stderr

    got = await rabbit.take_all(ranked)
    assert [json.loads(m.body)["p"] for m in got] == ["high", 7, "normal", "low"]
    assert [m.header.properties.priority for m in got] == [9, 7, 5, 1]
