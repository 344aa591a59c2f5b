"""Every row of the settlement table (docs/design.md, "Settlement"), observed through the memory
driver and the stats.

Handlers record each invocation by publishing to `out` (message id and how many times this
handler has seen that id), so redelivery shows up as several records with the same id.
"""

from __future__ import annotations

import logging
import math
from typing import Any

import msgpack
import pytest
from conftest import AppFactory, Received
from luaq.runtime.codecs import BY_CONTENT_TYPE
from luaq.runtime.settings import Settings

# Records every call, and runs the Lua statement `fail` on the first `fail_times` calls per id.
RECORDING_HANDLER = """
local calls = {}
local fail_times = %(fail_times)d

function handle(p)
  local msg = queue.message()
  local id = msg:id()
  calls[id] = (calls[id] or 0) + 1
  assert(queue.publish("out", {id = id, call = calls[id], p = p}))
  if calls[id] <= fail_times then
    %(fail)s
  end
end
"""


def recording(fail: str, fail_times: int = 2) -> str:
    return RECORDING_HANDLER % {"fail": fail, "fail_times": fail_times}


def calls_by_id(out: list[Received]) -> dict[str, list[int]]:
    seen: dict[str, list[int]] = {}
    for record in out:
        seen.setdefault(record.data["id"], []).append(record.data["call"])
    return seen


def failure_attempts(caplog: pytest.LogCaptureFixture) -> list[int]:
    """The delivery attempt of every 'handler failed' warning the consumer logged."""
    return [
        record.attempt  # type: ignore[attr-defined]
        for record in caplog.records
        if record.name == "luaq.consumer" and record.getMessage() == "handler failed"
    ]


# -- returns normally: ack, delivered once ---------------------------------------------------


@pytest.mark.parametrize(
    "ending",
    ["", "return", "return nil", "return nil, nil", "return 42", "return true", "return {}"],
)
async def test_normal_return_acks_once(apps: AppFactory, ending: str) -> None:
    app, out = await apps.run(
        f"""
        function handle(p)
          assert(queue.publish("out", {{n = p.n, id = queue.message():id()}}))
          {ending}
        end
        """,
        [{"n": 1}, {"n": 2}],
    )
    assert sorted(r.data["n"] for r in out) == [1, 2]
    assert len({r.data["id"] for r in out}) == 2
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed, stats.rejected) == (
        2,
        2,
        0,
        0,
        0,
    )
    assert await app.info("in") == (0, 1)


# -- `return false`: nack, redelivered -----------------------------------------------------------


async def test_return_false_nacks_and_redelivers_same_message(apps: AppFactory) -> None:
    app, out = await apps.run(recording("return false"), [{"n": 7}])
    calls = calls_by_id(out)
    assert len(calls) == 1, "redelivery must keep the message id"
    assert next(iter(calls.values())) == [1, 2, 3]
    assert all(r.data["p"] == {"n": 7} for r in out)
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (3, 1, 2, 0)
    assert await app.info("in") == (0, 1)


# -- errors: nack, redelivered -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("fail", "kind"),
    [
        ('return nil, "boom"', "UNKNOWN"),
        ('return nil, errors.new({message = "busy", kind = errors.UNAVAILABLE})', "UNAVAILABLE"),
        # a second return value is an error even when the first one is true
        ('return true, "but it failed"', "UNKNOWN"),
        ('return true, errors.new("late failure")', "UNKNOWN"),
        ('error("x")', "UNKNOWN"),
        ('error(errors.new({message = "conflict", kind = errors.CONFLICT}))', "CONFLICT"),
        ("local t = nil; return t.field", "UNKNOWN"),
    ],
    ids=[
        "nil-string",
        "nil-error-object",
        "true-string",
        "true-error-object",
        "error-string",
        "error-object",
        "runtime-error",
    ],
)
async def test_errors_nack_and_redeliver(
    apps: AppFactory, caplog: pytest.LogCaptureFixture, fail: str, kind: str
) -> None:
    caplog.set_level(logging.WARNING, logger="luaq.consumer")
    app, out = await apps.run(recording(fail), [{"n": 1}])
    calls = calls_by_id(out)
    assert len(calls) == 1
    assert next(iter(calls.values())) == [1, 2, 3]
    # the same delivery came back with its attempt counter increased
    assert failure_attempts(caplog) == [1, 2]
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (3, 1, 2, 2)
    assert stats.errors == {kind: 2}
    assert await app.info("in") == (0, 1)


async def test_error_message_reaches_the_log(
    apps: AppFactory, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.WARNING, logger="luaq.consumer")
    _, out = await apps.run(
        recording('error(errors.new({message = "db down", kind = errors.UNAVAILABLE}))', 1),
        [{"n": 1}],
    )
    failures = [r for r in caplog.records if r.getMessage() == "handler failed"]
    assert len(failures) == 1
    assert failures[0].kind == "UNAVAILABLE"  # type: ignore[attr-defined]
    assert "db down" in failures[0].error  # type: ignore[attr-defined]
    assert failures[0].message_id == out[0].data["id"]  # type: ignore[attr-defined]


# -- instruction budget ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spin",
    [
        "while true do end",
        # pcall must not be able to swallow the stop
        "while true do pcall(function() while true do end end) end",
        "local function f() return f() end return f()",
    ],
    ids=["loop", "pcall-loop", "tail-call-loop"],
)
async def test_budget_exceeded_redelivers_and_worker_keeps_going(
    apps: AppFactory, spin: str
) -> None:
    app, out = await apps.run(
        f"""
        local spun = false
        function handle(p)
          if p.spin and not spun then
            spun = true
            {spin}
          end
          assert(queue.publish("out", {{n = p.n, id = queue.message():id()}}))
        end
        """,
        [{"n": 1}, {"n": 2, "spin": True}, {"n": 3}, {"n": 4}],
        settings=Settings(max_instructions=1_000_000, shutdown_timeout=5.0),
        concurrency=1,
        prefetch=1,
    )
    # every message got through, the runaway one on its second delivery
    assert sorted(r.data["n"] for r in out) == [1, 2, 3, 4]
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (5, 4, 1, 1)
    assert stats.errors == {"TIMEOUT": 1}
    assert await app.info("in") == (0, 1)


async def test_budget_applies_per_invocation(apps: AppFactory) -> None:
    """Many invocations that each stay under the budget are never stopped."""
    app, out = await apps.run(
        """
        function handle(p)
          local x = 0
          for i = 1, 20000 do x = x + i end
          assert(queue.publish("out", {n = p.n, x = x}))
        end
        """,
        [{"n": n} for n in range(30)],
        settings=Settings(max_instructions=1_000_000, shutdown_timeout=5.0),
    )
    assert sorted(r.data["n"] for r in out) == list(range(30))
    assert {r.data["x"] for r in out} == {200010000}
    assert app.consumer.stats.failed == 0


# -- poison bodies -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    "body", [b"\xff{not json", b"{not json", b"", b'{"a": 1', b'\xef\xbb\xbf{"a": 1']
)
async def test_poison_body_rejected_once_never_redelivered(apps: AppFactory, body: bytes) -> None:
    """With `dead_letter` but no dead-letter queue, rejected (see test_reliability for a queue
    without `dead_letter`, where nothing is dropped)."""
    app = await apps.start(
        """
        function handle(p)
          assert(queue.publish("out", {seen = p}))
        end
        """,
        in_queue={"dead_letter": {"max_attempts": 3}},
    )
    queue_entry = app.worker.host.queue("app", "in")
    driver = app.worker.drivers["app:broker"]
    await driver.publish(queue_entry, b'{"n": 1}', {}, "application/json")
    await driver.publish(queue_entry, body, {}, "application/json")
    await driver.publish(queue_entry, b'{"n": 2}', {}, "application/json")
    await app.idle()
    out = await app.drain("out")
    # the handler never saw the poison body; the good messages around it went through
    assert [r.data["seen"] for r in out] == [{"n": 1}, {"n": 2}]
    stats = app.consumer.stats
    assert (stats.rejected, stats.processed, stats.acked, stats.retried, stats.failed) == (
        1,
        2,
        2,
        0,
        0,
    )
    assert await app.info("in") == (0, 1)
    assert app.consumer.held == 0


async def test_json_bodies_are_read_in_every_encoding_json_allows(apps: AppFactory) -> None:
    """UTF-8 with or without a byte order mark, UTF-16 and UTF-32, as another client may send."""
    app = await apps.start('function handle(p) assert(queue.publish("out", p)) end')
    queue_entry = app.worker.host.queue("app", "in")
    driver = app.worker.drivers["app:broker"]
    text = '{"n": "\u00e9"}'
    for body in (text.encode(), b"\xef\xbb\xbf" + text.encode(), text.encode("utf-16"),
                 text.encode("utf-32")):  # fmt: skip
        await driver.publish(queue_entry, body, {}, "application/json")
    await app.idle()
    assert [r.data for r in await app.drain("out")] == [{"n": "\u00e9"}] * 4
    assert app.consumer.stats.rejected == 0


MSGPACK_POISON = {
    "an extension type": {"e": msgpack.ExtType(5, b"abc")},
    "a NaN key": {math.nan: 1},  # (Lua cannot index a table with it: this aborted the process)
    "a float key": {1.5: 1},
    "a nil key": {None: 1},
    "a boolean key": {True: 1},
    "a key beyond 64-bit integers": {2**64 - 1: 1},
}


@pytest.mark.parametrize("data", MSGPACK_POISON.values(), ids=MSGPACK_POISON.keys())
async def test_msgpack_bodies_lua_has_no_value_for_are_poison(apps: AppFactory, data: Any) -> None:
    """A msgpack body is read into plain values only (no Python object reaches Lua), with keys
    a Lua table can hold and JSON can write back: anything else cannot be decoded."""
    app = await apps.start(
        'function handle(p) assert(queue.publish("out", {seen = p})) end',
        in_queue={"dead_letter": {"max_attempts": 3}},
    )
    queue_entry = app.worker.host.queue("app", "in")
    driver = app.worker.drivers["app:broker"]
    for body in (msgpack.packb({"n": 1}), msgpack.packb(data), msgpack.packb({"n": 2})):
        await driver.publish(queue_entry, body, {}, "application/msgpack")
    await app.idle()
    assert [r.data["seen"] for r in await app.drain("out")] == [{"n": 1}, {"n": 2}]
    stats = app.consumer.stats
    assert (stats.rejected, stats.processed, stats.failed) == (1, 2, 0)


async def test_numbers_lua_cannot_hold_exactly_arrive_as_floats(apps: AppFactory) -> None:
    """Integers beyond Lua's 64 bits (in a body or a header) become floats, as in other Lua
    JSON libraries, instead of failing every attempt; msgpack timestamps become seconds since
    the epoch; integer keys and byte strings are kept."""
    app = await apps.start(
        """
        function handle(p)
          local msg = queue.message()
          local seen = {}
          for k, v in pairs(p) do seen[tostring(k)] = {math.type(v) or type(v), v} end
          local h = msg:header("big")
          seen.header = {math.type(h), h}
          assert(queue.publish("out", seen))
        end
        """
    )
    queue_entry = app.worker.host.queue("app", "in")
    driver = app.worker.drivers["app:broker"]
    big = {"big": 2**64 + 8}
    await driver.publish(queue_entry, b'{"a": 18446744073709551615, "b": -9223372036854775809, '
                         b'"c": 9223372036854775807}', big, "application/json")  # fmt: skip
    stamp = msgpack.Timestamp(1_700_000_000, 500_000_000)
    await driver.publish(queue_entry, msgpack.packb({"t": stamp, 7: b"bytes", "i": 2**64 - 1}),
                         big, "application/msgpack")  # fmt: skip
    await app.idle()
    first, second = (r.data for r in await app.drain("out"))
    assert first == {
        "a": ["float", 2.0**64],
        "b": ["float", -(2.0**63)],
        "c": ["integer", 2**63 - 1],
        "header": ["float", 2.0**64],
    }
    assert second == {
        "t": ["float", 1_700_000_000.5],
        "7": ["string", "bytes"],
        "i": ["float", 2.0**64],
        "header": ["float", 2.0**64],
    }
    assert app.consumer.stats.failed == 0


@pytest.mark.parametrize("codec", ["application/json", "application/msgpack"])
async def test_a_body_nested_deeper_than_lua_data_may_be_is_poison(
    apps: AppFactory, codec: str, caplog: pytest.LogCaptureFixture
) -> None:
    """Deeper than the 100 levels luaq reads back from Lua: no attempt can succeed, so it is
    poison, set aside at once, and the handler never runs. It used to fail every attempt until
    max_attempts, and beyond a few hundred levels with an internal error and a traceback
    (RecursionError) each time."""
    app = await apps.start(
        'function handle(p) assert(queue.publish("out", {n = p.n})) end',
        in_queue={"dead_letter": {"max_attempts": 2}},
    )
    queue_entry = app.worker.host.queue("app", "in")
    driver = app.worker.drivers["app:broker"]
    deep: Any = {"n": 0}
    for _ in range(600):
        deep = {"n": 0, "inner": deep}
    bodies = [{"n": 1}, deep, {"n": 2}]
    for data in bodies:
        await driver.publish(queue_entry, BY_CONTENT_TYPE[codec].encode(data), {}, codec)
    await app.idle()
    assert [r.data["n"] for r in await app.drain("out")] == [1, 2]
    stats = app.consumer.stats
    assert (stats.processed, stats.failed, stats.rejected, stats.retried) == (2, 0, 1, 0)
    [rejected] = [r for r in caplog.records if r.msg == "message cannot be handled, rejected"]
    assert rejected.__dict__["error"] == "the message's data is nested deeper than 100 levels"
    assert rejected.__dict__["attempt"] == 1
    assert not [r for r in caplog.records if r.exc_info], "no traceback"


# -- early settlement: first settle wins -------------------------------------------------------


async def test_early_ack_then_failure_is_acked_once(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local msg = queue.message()
          local ok = msg:ack()
          assert(queue.publish("out", {ok = ok, id = msg:id()}))
          error("failed after ack")
        end
        """,
        [{"n": 1}],
    )
    assert [r.data["ok"] for r in out] == [True]
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (1, 1, 0, 1)
    assert await app.info("in") == (0, 1)


@pytest.mark.parametrize("ending", ["return false", 'return nil, "no"'])
async def test_early_ack_wins_over_a_nack_verdict(apps: AppFactory, ending: str) -> None:
    app, out = await apps.run(
        f"""
        function handle(p)
          local msg = queue.message()
          assert(msg:ack())
          assert(queue.publish("out", {{id = msg:id()}}))
          {ending}
        end
        """,
        [{"n": 1}],
    )
    assert len(out) == 1
    assert app.consumer.stats.acked == 1
    assert app.consumer.stats.retried == 0
    assert await app.info("in") == (0, 1)


async def test_early_nack_then_normal_return_is_redelivered_once(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        local calls = {}
        function handle(p)
          local msg = queue.message()
          local id = msg:id()
          calls[id] = (calls[id] or 0) + 1
          local nacked = nil
          if calls[id] == 1 then nacked = msg:nack() end
          assert(queue.publish("out", {id = id, call = calls[id], nacked = nacked}))
          return true
        end
        """,
        [{"n": 1}],
        concurrency=1,
    )
    calls = calls_by_id(out)
    assert list(calls.values()) == [[1, 2]]
    assert [r.data.get("nacked") for r in out] == [True, None]
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (2, 1, 1, 0)
    assert await app.info("in") == (0, 1)


async def test_second_settle_is_a_noop_returning_false(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          local msg = queue.message()
          local first = msg:ack()
          local second = msg:ack()
          local third = msg:nack()
          assert(queue.publish("out", {first = first, second = second, third = third}))
          return false -- would nack, but the ack came first
        end
        """,
        [{"n": 1}],
    )
    assert [r.data for r in out] == [{"first": True, "second": False, "third": False}]
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried) == (1, 1, 0)
    assert await app.info("in") == (0, 1)


async def test_message_from_a_previous_invocation_cannot_settle_again(apps: AppFactory) -> None:
    """A Message kept in module state belongs to its own delivery, already settled: settling it
    again is a no-op and must not touch the delivery that is running now."""
    app, out = await apps.run(
        """
        local previous = nil
        local tried = false
        function handle(p)
          local msg = queue.message()
          local old = nil
          if previous and not tried then
            tried = true
            old = previous:nack()
          end
          previous = msg
          assert(queue.publish("out", {n = p.n, id = msg:id(), old = old}))
        end
        """,
        [{"n": 1}, {"n": 2}],
        concurrency=1,
    )
    assert [r.data["n"] for r in out] == [1, 2], "message 2 must not be redelivered"
    assert out[1].data["old"] is False
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried) == (2, 2, 0)


# -- auto_ack -------------------------------------------------------------------------------


@pytest.mark.parametrize("fail", ['error("boom")', "return false", 'return nil, "no"'])
async def test_auto_ack_failing_handler_is_not_redelivered(apps: AppFactory, fail: str) -> None:
    app, out = await apps.run(
        f"""
        local calls = 0
        function handle(p)
          calls = calls + 1
          assert(queue.publish("out", {{n = p.n, calls = calls}}))
          {fail}
        end
        """,
        [{"n": 1}, {"n": 2}],
        auto_ack=True,
        concurrency=1,
    )
    assert [r.data for r in out] == [{"n": 1, "calls": 1}, {"n": 2, "calls": 2}]
    stats = app.consumer.stats
    assert stats.processed == 2
    assert stats.acked == 2
    assert stats.retried == 0
    assert await app.info("in") == (0, 1)
