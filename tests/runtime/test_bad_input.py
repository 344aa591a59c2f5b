"""Bad input: none of it crashes or wedges a worker; each gets a clear outcome and
the next good message is still processed."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import eventually
from luaq.runtime import entries
from luaq.runtime.assembly import build, load
from luaq.runtime.settings import Settings
from luaq.runtime.worker import Worker

HANDLER = """
function handle(p)
  if type(p) == "table" and p.mode == "big" then
    local ok, err = queue.publish("out", string.rep("x", 10 * 1024 * 1024))
    return queue.publish("out", {ok = ok, kind = err and err:kind(), error = tostring(err)})
  end
  if type(p) == "table" and p.mode == "header-keys" then
    local ok, err = queue.publish("out", {x = 1}, {[1] = "one"})
    return queue.publish("out", {ok = ok, kind = err and err:kind()})
  end
  if type(p) == "table" and p.mode == "deep-decode" then
    local value, err = json.decode(string.rep("[", 10000) .. string.rep("]", 10000))
    return queue.publish("out", {ok = value ~= nil, kind = err and err:kind()})
  end
  if type(p) == "table" and p.mode == "return-function" then
    return function() end
  end
  if type(p) == "table" and p.mode == "return-evil-error" then
    return nil, setmetatable({}, {__tostring = function() error("no text for you") end})
  end
  return queue.publish("out", {good = p})
end
"""


@pytest.fixture
async def worker(tmp_path: Path) -> AsyncIterator[Worker]:
    (tmp_path / "h.lua").write_text(HANDLER)
    document = {
        "version": "1.0",
        "namespace": "app",
        "entries": [
            {"name": "broker", "kind": "queue.driver.memory", "max_message_size": 4 * 2**20},
            # dead_letter without a queue: given up messages are rejected, not retried
            {"name": "in", "kind": "queue.queue", "driver": "broker",
             "dead_letter": {"max_attempts": 3}, "retry": {"delay": "5ms"}},
            {"name": "out", "kind": "queue.queue", "driver": "broker"},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle",
             "source": "file://h.lua"},
        ],
    }  # fmt: skip
    path = tmp_path / "app.yaml"
    path.write_text(yaml.safe_dump(document))
    running = build(load(entries.load([path]), Settings(shutdown_timeout=2.0)))
    await running.start()
    yield running
    await running.stop(1.0)


async def outputs(worker: Worker) -> list[Any]:
    await asyncio.wait_for(worker.wait_idle(), 20)
    queue = worker.host.queue("app", "out")
    got: list[Any] = []
    driver = worker.drivers[queue.driver]
    reader = entries.ConsumerEntry.model_construct(
        id="app:test", kind="queue.consumer", file=queue.file, queue=queue.id, prefetch=100
    )
    subscription = await driver.consume(queue, reader, got.append)
    await subscription.close()
    return [json.loads(d.body) for d in got]


async def raw(worker: Worker, body: bytes, content_type: str = "application/json") -> None:
    queue = worker.host.queue("app", "in")
    await worker.drivers[queue.driver].publish(queue, body, {}, content_type)


async def test_each_bad_input_is_contained(
    worker: Worker, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING)
    await worker.host.publish("app", "in", {"mode": "big"}, {})
    await raw(worker, b'"' + b"x" * (10 * 2**20) + b'"')  # delivered over the size limit
    await raw(worker, b"[" * 10_000 + b"]" * 10_000)  # JSON nested 10,000 deep
    await raw(worker, b'{"to": "\xff\xfe"}')  # not UTF-8
    await raw(worker, b"\x00\x01", "application/x-unknown")  # a content type no codec reads
    for mode in ("header-keys", "deep-decode", "return-function"):
        await worker.host.publish("app", "in", {"mode": mode}, {})
    await worker.host.publish("app", "in", "after all that", {})

    out = await outputs(worker)

    assert out == [
        {
            "kind": "INVALID",
            "error": "message of 10485762 bytes is over the max_message_size of 4194304 bytes "
            "of driver app:broker",
        },
        {"kind": "INVALID"},  # non-string header keys
        {"ok": False, "kind": "INVALID"},  # json.decode of 10,000 levels
        {"good": "after all that"},
    ]
    stats = worker.consumers[0].stats
    assert stats.rejected == 4, "size, depth, encoding and content type: rejected, not retried"
    assert (stats.processed, stats.failed, stats.acked) == (5, 0, 5)
    rejected = [r.getMessage() for r in caplog.records if r.name == "luaq.consumer"]
    assert rejected.count("message cannot be handled, rejected") == 4
    assert (await worker.host.info("app", "in"))[0] == 0


async def test_an_error_value_that_cannot_be_shown_still_fails_cleanly(worker: Worker) -> None:
    """`return nil, err` where tostring(err) itself raises: a failure, redelivered, and the
    worker goes on with other messages."""
    await worker.host.publish("app", "in", {"mode": "return-evil-error"}, {})
    stats = worker.consumers[0].stats
    await eventually(lambda: stats.failed >= 3)
    await worker.host.publish("app", "in", "still alive", {})
    await eventually(lambda: stats.acked >= 1)
    assert stats.errors == {"UNKNOWN": stats.failed}
