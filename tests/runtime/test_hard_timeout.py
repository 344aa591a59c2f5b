"""What no limit inside a process can stop: a handler stuck where the instruction budget and the
memory limit never get control back (a C call that does not return). On broker drivers `luaq
run` is a supervisor and its worker processes, even with one; a worker whose handler stays in
Lua past --hard-timeout, or that dies by a signal in a handler, is replaced, its message is
blamed, and a message blamed twice is dead-lettered with reason killed: the pod goes on with the
rest. A worker whose event loop stops beating (SIGSTOP here) is replaced too, blaming nobody.

The stuck C call is stood in for by a Lua loop under a budget it never reaches: to the
supervisor the two look the same, a handler that does not come back from Lua."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import aiormq
import pytest
from processes import Process, Spawner, wait_until, write_app
from test_supervisor import alive, children, logged, publish

SPINNER = """
function handle(p)
  if p.spin then
    logger.info("spinning")
    local x = 0
    while true do x = x + 1 end
  end
  queue.publish("done", p)
end
"""


def app(tmp_path: Path, url: str) -> Path:
    return write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.amqp", "url": url},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker",
         "dead_letter": {"queue": "dead", "max_attempts": 5}},
        {"name": "dead", "kind": "queue.queue", "driver": "broker"},
        {"name": "done", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": SPINNER, "modules": ["queue", "logger"], "concurrency": 4},
    ])  # fmt: skip


def run(spawn: Spawner, path: Path, *flags: str) -> Process:
    # a budget the spinning handler never reaches: only the supervisor can stop it
    return spawn("run", path, "--max-instructions", str(10**15), *flags)


async def _take(url: str, queue: str) -> list[tuple[dict[str, Any], Any]]:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_declare(queue, durable=True)
        taken = []
        while (message := await channel.basic_get(queue, no_ack=True)).delivery_tag:
            taken.append((json.loads(message.body), message.header.properties.headers or {}))
            if message.delivery.message_count == 0:
                break
        return taken
    finally:
        await connection.close()


def take(url: str, queue: str) -> list[tuple[dict[str, Any], Any]]:
    return asyncio.run(_take(url, queue))


def spinning_worker(process: Process, seen: set[int], spins: int) -> int:
    """The worker process running the spinning handler for the `spins`-th time."""
    wait_until(lambda: process.messages().count("spinning") >= spins, 30, f"spin {spins}")
    (pid,) = children(process, seen)
    return pid


def test_a_stuck_handler_is_killed_and_its_message_dead_lettered_after_two_deaths(
    spawn: Spawner, tmp_path: Path, url: str
) -> None:
    seen: set[int] = set()
    process = run(spawn, app(tmp_path, url), "--hard-timeout", "1")
    try:
        wait_until(lambda: "worker started" in process.messages(), 30, "worker started")
        publish(url, {"spin": True})
        frozen = spinning_worker(process, seen, 1)
        wait_until(lambda: logged(process, "worker process stuck: killing it"), 10, "kill")
        wait_until(lambda: not alive(frozen), 10, "the stuck worker gone")
        # its replacement takes the message again (the broker gives it back): it dies by a
        # signal in the handler this time, the message's second death
        crashed = spinning_worker(process, seen, 2)
        assert crashed != frozen
        os.kill(crashed, signal.SIGSEGV)
        wait_until(lambda: logged(process, "a message killed worker processes: it is poison "
                   "now, and dead-lettered (reason killed) or dropped when it comes again"),
                   10, "poisoned")  # fmt: skip
        publish(url, {"n": 1}, {"n": 2})
        dead: list[tuple[dict[str, Any], Any]] = []
        wait_until(lambda: bool(dead.extend(take(url, "dead")) or dead), 30, "dead letter")
        done: list[tuple[dict[str, Any], Any]] = []
        wait_until(lambda: len(done.extend(take(url, "done")) or done) == 2, 30, "the others")
        assert process.popen.poll() is None, process.stderr[-3000:]
    finally:
        process.popen.terminate()
        process.wait(20)
    ((body, headers),) = dead
    assert body == {"spin": True}
    assert headers["x_dead_letter_reason"] == "killed"
    assert sorted(b["n"] for b, _ in done) == [1, 2]
    assert process.messages().count("spinning") == 2  # never run a third time
    stuck = logged(process, "worker process stuck: killing it")
    assert len(stuck) == 1, stuck
    assert "handler ran" in stuck[0]["why"], stuck


def test_sigterm_ends_a_pod_whose_worker_is_stuck_within_the_shutdown_timeout(
    spawn: Spawner, tmp_path: Path, url: str
) -> None:
    seen: set[int] = set()
    process = run(spawn, app(tmp_path, url), "--shutdown-timeout", "1")  # hard timeout: 60 s
    wait_until(lambda: "worker started" in process.messages(), 30, "worker started")
    publish(url, {"spin": True})
    frozen = spinning_worker(process, seen, 1)  # it cannot even see the SIGTERM it gets
    started = time.monotonic()
    process.popen.terminate()
    process.wait(10)
    took = time.monotonic() - started
    assert took < 1 + 1, f"{took:.1f}s"
    assert not alive(frozen)


def test_a_worker_that_stops_beating_is_replaced_blaming_no_message(
    spawn: Spawner, tmp_path: Path, url: str
) -> None:
    seen: set[int] = set()
    process = run(spawn, app(tmp_path, url), "--hard-timeout", "1")
    try:
        wait_until(lambda: "worker started" in process.messages(), 30, "worker started")
        (frozen,) = children(process, seen)
        os.kill(frozen, signal.SIGSTOP)
        wait_until(lambda: process.messages().count("worker started") == 2, 30, "replaced")
        publish(url, {"n": 1})
        done: list[tuple[dict[str, Any], Any]] = []
        wait_until(lambda: bool(done.extend(take(url, "done")) or done), 30, "handled")
    finally:
        process.popen.terminate()
        process.wait(20)
    (stuck,) = logged(process, "worker process stuck: killing it")
    assert "no sign of life" in stuck["why"]
    assert not alive(frozen)


def test_a_handler_computing_within_the_hard_timeout_is_not_killed(
    spawn: Spawner, tmp_path: Path, url: str
) -> None:
    """A second and a half of CPU in Lua at once, under a hard timeout of twenty (room for a
    loaded machine): the loop misses its beats meanwhile, which is no sign of a stuck worker
    either."""
    source = """
    function handle(p)
      local started = os.clock()
      while os.clock() - started < p.seconds do end
      queue.publish("done", p)
    end
    """
    path = write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.amqp", "url": url},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
        {"name": "done", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": source, "modules": ["queue"]},
    ])  # fmt: skip
    process = run(spawn, path, "--hard-timeout", "20")
    try:
        wait_until(lambda: "worker started" in process.messages(), 30, "worker started")
        publish(url, {"seconds": 1.5})
        done: list[tuple[dict[str, Any], Any]] = []
        wait_until(lambda: bool(done.extend(take(url, "done")) or done), 30, "handled")
    finally:
        process.popen.terminate()
        process.wait(20)
    assert not logged(process, "worker process stuck: killing it")


@pytest.mark.parametrize(
    ("flag", "value"),
    [
        ("--hard-timeout", "0"),
        ("--max-instructions", "0"),
        ("--max-instructions", "-1"),
        ("--lua-max-memory", "0"),
        ("--shutdown-timeout", "-1"),
        ("--processes", "0"),
        ("--hard-timeout", "soon"),
    ],
)
def test_a_limit_that_means_nothing_is_refused(
    spawn: Spawner, tmp_path: Path, url: str, flag: str, value: str
) -> None:
    process = spawn("run", app(tmp_path, url), flag, value)
    assert process.wait(30) == 2
    assert f"argument {flag}:" in process.stderr, process.stderr
    assert value in process.stderr
