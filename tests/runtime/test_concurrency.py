"""The consumer pool: per-invocation message context under heavy concurrency, and the two
bounds (`concurrency` on running handlers, `prefetch` on deliveries held)."""

from __future__ import annotations

import asyncio
import time

from conftest import AppFactory, eventually
from luaq.runtime.codecs import CODECS
from luaq.runtime.consumer import Pace

N = 1000


async def test_thousand_concurrent_handlers_each_see_their_own_message(apps: AppFactory) -> None:
    app = await apps.start(
        """
        local running, peak, started = 0, 0, 0
        local total = TOTAL

        function handle(p)
          local msg = queue.message()
          local before = msg:id()
          running = running + 1
          started = started + 1
          if running > peak then peak = running end
          -- wait (with real awaits) until every handler has started, so all of them are in
          -- flight at once; give up after 5 s so a broken pool fails instead of hanging
          local waited = 0
          while started < total and waited < 5 do
            time.sleep(0.001)
            waited = waited + 0.001
          end
          time.sleep(0.01)
          local again = queue.message()
          local after = again:id()
          local header = again:header("n")
          running = running - 1
          assert(queue.publish("out", {
            before = before, after = after, payload_id = p.payload_id, header = header,
            same_object = (again == msg), peak = peak,
          }))
        end
        """.replace("TOTAL", str(N)),
        modules=["queue", "time"],
        concurrency=N,
        prefetch=N,
        max_length=2 * N,
    )
    queue_entry = app.worker.host.queue("app", "in")
    driver = app.worker.drivers["app:broker"]
    codec = CODECS[queue_entry.codec]
    ids: dict[int, str] = {}
    for n in range(N):
        body = codec.encode({"payload_id": n})
        ids[n] = await driver.publish(queue_entry, body, {"n": n}, codec.content_type)
    assert len(set(ids.values())) == N
    await app.idle(timeout=15)
    out = await app.drain("out")

    assert len(out) == N
    by_payload = {r.data["payload_id"]: r.data for r in out}
    assert sorted(by_payload) == list(range(N))
    for n, data in by_payload.items():
        assert data["before"] == ids[n], f"payload {n} saw another message before the await"
        assert data["after"] == ids[n], f"payload {n} saw another message after the await"
        assert data["header"] == n
        assert data["same_object"] is True
    # all 1,000 were running at the same time
    assert max(r.data["peak"] for r in out) == N
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.retried, stats.failed) == (N, N, 0, 0)


async def test_concurrency_is_a_bound(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        local running, peak = 0, 0
        function handle(p)
          running = running + 1
          local seen = running
          if running > peak then peak = running end
          time.sleep(0.01)
          running = running - 1
          assert(queue.publish("out", {n = p.n, seen = seen, peak = peak}))
        end
        """,
        [{"n": n} for n in range(20)],
        modules=["queue", "time"],
        concurrency=3,
        prefetch=20,
    )
    assert sorted(r.data["n"] for r in out) == list(range(20))
    seen = [r.data["seen"] for r in out]
    assert max(seen) == 3, f"running handlers: {seen}"
    assert max(r.data["peak"] for r in out) == 3
    assert app.consumer.stats.acked == 20


async def test_single_slot_runs_handlers_one_at_a_time(apps: AppFactory) -> None:
    _, out = await apps.run(
        """
        local running, peak = 0, 0
        function handle(p)
          running = running + 1
          if running > peak then peak = running end
          time.sleep(0.002)
          running = running - 1
          assert(queue.publish("out", {n = p.n, peak = peak}))
        end
        """,
        [{"n": n} for n in range(10)],
        modules=["queue", "time"],
        concurrency=1,
        prefetch=10,
    )
    # one slot: strictly one at a time, in queue order
    assert [r.data["n"] for r in out] == list(range(10))
    assert {r.data["peak"] for r in out} == {1}


async def test_prefetch_bounds_deliveries_held(apps: AppFactory) -> None:
    prefetch = 5
    app = await apps.start(
        """
        function handle(p)
          time.sleep(0.02)
          assert(queue.publish("out", {n = p.n}))
        end
        """,
        modules=["queue", "time"],
        concurrency=2,
        prefetch=prefetch,
    )
    for n in range(20):
        await app.publish("in", {"n": n})
    # the driver handed out exactly `prefetch` deliveries; the rest wait in the queue
    assert app.consumer.held == prefetch
    assert await app.info("in") == (20 - prefetch, 1)

    samples: list[int] = []
    ready: list[int] = []

    async def sample() -> bool:
        samples.append(app.consumer.held)
        ready.append((await app.info("in"))[0])
        return bool(app.consumer.stats.processed == 20)

    await eventually(sample, timeout=5.0)
    assert len(samples) > 10, "the handlers should take long enough to be sampled"
    assert max(samples) <= prefetch, f"held deliveries: {samples}"
    assert max(samples) == prefetch
    # while there was a backlog, the consumer held a full window and no more
    for held, waiting in zip(samples, ready, strict=True):
        if waiting:
            assert held == prefetch, (held, waiting)
    out = await app.drain("out")
    assert sorted(r.data["n"] for r in out) == list(range(20))
    await app.idle()
    assert app.consumer.held == 0


async def test_prefetch_one_holds_a_single_delivery(apps: AppFactory) -> None:
    app = await apps.start(
        """
        function handle(p)
          time.sleep(0.01)
          assert(queue.publish("out", {n = p.n}))
        end
        """,
        modules=["queue", "time"],
        concurrency=4,
        prefetch=1,
    )
    for n in range(6):
        await app.publish("in", {"n": n})
    samples: list[int] = []

    def sample() -> bool:
        samples.append(app.consumer.held)
        return bool(app.consumer.stats.processed == 6)

    await eventually(sample, timeout=5.0)
    assert set(samples) <= {0, 1}
    assert 1 in samples
    out = await app.drain("out")
    # with one delivery at a time, even four slots process in queue order
    assert [r.data["n"] for r in out] == list(range(6))


async def test_handlers_yield_to_the_loop_only_when_it_was_kept_busy() -> None:
    """Handlers that wait for something, as most do, let the event loop turn on its own: none
    of them gives it a turn on top. One that keeps the loop for longer than a slice makes the
    next handler yield first."""
    pace = Pace(slice_seconds=0.5)
    loop = asyncio.get_running_loop()
    until = loop.time() + 1.5
    while loop.time() < until:
        assert not pace.due(), "the loop had its turns"
        await asyncio.sleep(0.001)
    time.sleep(0.7)  # noqa: ASYNC251 (a handler that computes, holding the loop)
    assert pace.due()
    await pace.turn()
    assert not pace.due()
