"""Graceful shutdown in-process: in-flight handlers finish within the grace period, everything
else goes back to the queue, and nothing is lost."""

from __future__ import annotations

import asyncio

import pytest
from conftest import App, AppFactory, eventually
from luaq.runtime.settings import Settings

N = 10


def sleeping_handler(seconds: float, early_ack: bool = False) -> str:
    # announces itself on `other` when it starts, reports on `out` when it finishes
    ack = "assert(queue.message():ack())" if early_ack else ""
    return f"""
    function handle(p)
      {ack}
      assert(queue.publish("other", {{started = p.n}}))
      time.sleep({seconds})
      assert(queue.publish("out", {{n = p.n}}))
    end
    """


async def start_busy(
    apps: AppFactory, seconds: float, prefetch: int = 4, early_ack: bool = False
) -> App:
    app = await apps.start(
        sleeping_handler(seconds, early_ack),
        modules=["queue", "time"],
        concurrency=2,
        prefetch=prefetch,
    )
    for n in range(N):
        await app.publish("in", {"n": n})

    async def two_running() -> bool:
        return await app.info("other") == (2, 0)

    await eventually(two_running)
    return app


async def test_stop_lets_running_handlers_finish_and_requeues_the_rest(
    apps: AppFactory,
) -> None:
    app = await start_busy(apps, 0.2)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await app.worker.stop(grace=5.0)
    elapsed = loop.time() - started
    assert elapsed < 2.0, "stop waits for the handlers, not for the whole grace period"

    started_ns = sorted(r.data["started"] for r in await app.drain("other"))
    finished = sorted(r.data["n"] for r in await app.drain("out"))
    assert len(started_ns) == 2, "no handler may start once stop() was called"
    assert finished == started_ns
    stats = app.consumer.stats
    assert (stats.processed, stats.acked, stats.failed) == (2, 2, 0)

    assert await app.info("in") == (N - 2, 0)
    requeued = await app.drain("in")
    # nothing lost, nothing duplicated
    assert sorted([r.data["n"] for r in requeued] + finished) == list(range(N))
    assert stats.acked + len(requeued) == N
    assert app.consumer.held == 0


async def test_stop_after_grace_requeues_in_flight_messages(apps: AppFactory) -> None:
    app = await start_busy(apps, 10.0)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await asyncio.wait_for(app.worker.stop(grace=0.05), 3)
    assert loop.time() - started < 1.0

    assert await app.drain("out") == []
    stats = app.consumer.stats
    assert stats.acked == 0
    assert stats.processed == 0
    assert await app.info("in") == (N, 0)
    requeued = await app.drain("in")
    assert sorted(r.data["n"] for r in requeued) == list(range(N))
    assert len({r.id for r in requeued}) == N
    started_ns = {r.data["started"] for r in await app.drain("other")}
    assert len(started_ns) == 2
    # the interrupted ones were delivered once before and come back with the same identity
    interrupted = [r for r in requeued if r.data["n"] in started_ns]
    assert [r.attempts for r in interrupted] == [2, 2]
    assert app.consumer.held == 0


async def test_stop_with_everything_buffered(apps: AppFactory) -> None:
    """prefetch larger than the backlog: every waiting message sits in the consumer's buffer."""
    app = await start_busy(apps, 0.05, prefetch=100)
    assert app.consumer.held == N
    assert await app.info("in") == (0, 1)
    await app.worker.stop(grace=5.0)
    finished = sorted(r.data["n"] for r in await app.drain("out"))
    assert len(finished) == 2
    assert app.consumer.stats.acked == 2
    assert await app.info("in") == (N - 2, 0)
    requeued = await app.drain("in")
    assert sorted([r.data["n"] for r in requeued] + finished) == list(range(N))


async def test_stop_is_safe_to_call_twice(apps: AppFactory) -> None:
    app = await start_busy(apps, 10.0)
    await asyncio.wait_for(app.worker.stop(grace=0.05), 3)
    assert await app.info("in") == (N, 0)
    # again (the fixture stops a third time at teardown)
    await asyncio.wait_for(app.worker.stop(grace=1.0), 3)
    assert await app.info("in") == (N, 0)
    assert app.consumer.stats.acked == 0
    assert app.consumer.held == 0


async def test_no_deliveries_after_stop(apps: AppFactory) -> None:
    app, out = await apps.run(
        """
        function handle(p)
          assert(queue.publish("out", p))
        end
        """,
        [{"n": 1}],
    )
    assert [r.data for r in out] == [{"n": 1}]
    await app.worker.stop(grace=1.0)
    await app.publish("in", {"n": 2})
    # the message stays in the queue: nobody consumes it any more
    assert await app.info("in") == (1, 0)
    assert app.consumer.held == 0
    assert app.consumer.stats.processed == 1
    assert [r.data for r in await app.drain("in")] == [{"n": 2}]


async def test_stop_an_idle_worker_is_prompt(apps: AppFactory) -> None:
    app = await apps.start(
        """
        function handle(p) end
        """
    )
    await asyncio.wait_for(app.worker.stop(grace=5.0), 1)
    assert await app.info("in") == (0, 0)


async def test_interrupted_handler_that_acked_early_is_not_requeued(apps: AppFactory) -> None:
    app = await start_busy(apps, 10.0, early_ack=True)
    await asyncio.wait_for(app.worker.stop(grace=0.05), 3)
    started_ns = {r.data["started"] for r in await app.drain("other")}
    assert len(started_ns) == 2
    # first settle wins: the two acked messages are gone, the other eight are back
    assert await app.info("in") == (N - 2, 0)
    requeued = sorted(r.data["n"] for r in await app.drain("in"))
    assert requeued == sorted(set(range(N)) - started_ns)


@pytest.mark.parametrize(
    ("seconds", "grace", "early_ack", "acked"),
    [
        (0.2, 5.0, False, 2),  # 2 finish; the buffered deliveries are given back
        (10.0, 0.05, False, 0),  # 2 interrupted and the buffered deliveries are given back
        (10.0, 0.05, True, 2),  # 2 acked early then interrupted; the buffered ones given back
    ],
    ids=["finish", "interrupted", "early-ack-interrupted"],
)
async def test_shutdown_stats_account_for_every_delivery(
    apps: AppFactory, seconds: float, grace: float, early_ack: bool, acked: int
) -> None:
    """ConsumerStats: `requeued` counts deliveries "given back at once: not started, or cut
    short, at shutdown". Every delivery the consumer held when stop() began is either acked or
    given back, and the counters must say so."""
    app = await start_busy(apps, seconds, early_ack=early_ack)
    held = app.consumer.held
    if not early_ack:
        assert held == 4  # prefetch
    await asyncio.wait_for(app.worker.stop(grace=grace), 3)
    stats = app.consumer.stats
    assert (stats.acked, stats.requeued) == (acked, held - acked)
    assert await app.info("in") == (N - acked, 0)


async def test_interrupted_handlers_to_be_closed_variables_do_not_hold_up_the_stop(
    apps: AppFactory,
) -> None:
    """Handlers cut short at the stop are closed with their budgets exhausted: their __close
    handlers, each able to run a budget of several seconds, fail at once instead of running
    one after another past the grace period."""
    app = await apps.start(
        """
        function handle(p)
          local x <close> = setmetatable({}, {__close = function()
            pcall(function() while true do end end)
          end})
          assert(queue.publish("other", {started = p.n}))
          time.sleep(100)
        end
        """,
        Settings(shutdown_timeout=5.0, max_instructions=500_000_000),
        modules=["queue", "time"],
        concurrency=4,
        prefetch=4,
    )
    for n in range(4):
        await app.publish("in", {"n": n})

    async def all_running() -> bool:
        return await app.info("other") == (4, 0)

    await eventually(all_running)
    loop = asyncio.get_running_loop()
    started = loop.time()
    await app.worker.stop(grace=0.5)
    assert loop.time() - started < 0.5 + 1, "four budgets of __close handlers ran"
    assert await app.info("in") == (4, 0)
