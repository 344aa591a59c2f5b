"""`luaq run --processes N` under its supervisor, with real processes on the real RabbitMQ: a
worker killed is replaced and leaves the pod's readiness and gauges at once, counters never go
down; workers die with a supervisor killed hard; workers that keep dying make it give up;
SIGTERM ends everything in time, and a stop while a worker starts is clean; workers that
disagree on a metric do not break /metrics."""

from __future__ import annotations

import asyncio
import itertools
import json
import os
import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiormq
import pytest
from broker import queue_depth
from luaq.runtime.flight import FlightLog
from luaq.runtime.metrics import MAX_USER_SERIES, Family, Server, Snapshots
from luaq.runtime.supervisor import Pod, Supervisor
from pamqp.commands import Basic
from processes import LUAQ, Process, Spawner, free_port, json_lines, wait_until, write_app
from test_metrics import Samples, get, scrape, value

SLEEPER = "function handle(p) if p.sleep then time.sleep(p.sleep) end end"
JOBS = {"consumer": "app:worker", "queue": "app:jobs"}


@pytest.fixture
def workers() -> Iterator[set[int]]:
    """Pids of worker processes a test saw: killed at the end, whatever became of their
    supervisor (on code without one, they outlive it)."""
    pids: set[int] = set()
    yield pids
    for pid in pids:
        if alive(pid):
            os.kill(pid, signal.SIGKILL)


def app(tmp_path: Path, url: str, source: str = SLEEPER, **consumer: Any) -> Path:
    return write_app(tmp_path / "app.yaml", [
        {"name": "broker", "kind": "queue.driver.amqp", "url": url},
        {"name": "jobs", "kind": "queue.queue", "driver": "broker"},
        {"id": "worker", "kind": "queue.consumer", "queue": "jobs", "method": "handle",
         "source": source, "modules": ["time", "metrics"], **consumer},
    ])  # fmt: skip


async def _publish(url: str, items: list[dict[str, Any]]) -> None:
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        await channel.queue_declare("jobs", durable=True)
        properties = Basic.Properties(content_type="application/json", delivery_mode=2)
        for item in items:
            await channel.basic_publish(
                json.dumps(item).encode(), routing_key="jobs", properties=properties
            )
    finally:
        await connection.close()


def publish(url: str, *items: dict[str, Any]) -> None:
    asyncio.run(_publish(url, list(items)))


def children(process: Process, seen: set[int]) -> list[int]:
    """Pids of the running processes `process` started (its workers), noted in `seen` too."""
    pids = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, ppid = stat.read_text().rsplit(")", 1)[1].split()[:2]
        except (OSError, IndexError):
            continue
        if int(ppid) == process.popen.pid and state != "Z":
            pids.append(int(stat.parent.name))
    seen.update(pids)
    return sorted(pids)


def logged(process: Process, message: str) -> list[dict[str, Any]]:
    return [line for line in process.logs() if line.get("msg") == message]


def alive(pid: int) -> bool:
    """Running (a zombie waiting for its reaper is not)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def workers_up(process: Process, count: int) -> bool:
    return process.messages().count("worker started") >= count


COUNTER_SUFFIXES = ("_total", "_count", "_sum", "_bucket")


def never_decreased(history: list[Samples]) -> None:
    for before, after in itertools.pairwise(history):
        for key, was in before.items():
            if key[0].endswith(COUNTER_SUFFIXES) and key in after:
                assert after[key] >= was, f"{key} went from {was} to {after[key]}"


def test_a_killed_worker_is_replaced_and_leaves_the_gauges_at_once(
    tmp_path: Path, spawn: Spawner, url: str, workers: set[int]
) -> None:
    port = free_port()
    process = spawn("run", app(tmp_path, url, concurrency=2, prefetch=2), "--processes", "2",
                    "--metrics-port", str(port), "--shutdown-timeout", "1")  # fmt: skip
    history: list[Samples] = []

    def sample() -> Samples:
        history.append(scrape(port))
        return history[-1]

    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "both processes ready")
    publish(url, *({"n": n} for n in range(100)))
    wait_until(lambda: value(sample(), "luaq_messages_settled_total", **JOBS, outcome="ack")
               == 100, 20, "100 acks")  # fmt: skip
    publish(url, *({"sleep": 60} for _ in range(4)))  # two in each process: prefetch 2
    wait_until(lambda: value(sample(), "luaq_handlers_in_flight", **JOBS) == 4, 20, "4 running")
    victim, other = children(process, workers)
    assert value(history[-1], "luaq_worker_ready") == 1

    os.kill(victim, signal.SIGKILL)
    killed_at = time.monotonic()

    def dropped() -> bool:
        samples = sample()
        return (
            get(port, "/readyz")[0] == 503
            and value(samples, "luaq_worker_ready") == 0
            and value(samples, "luaq_handlers_in_flight", **JOBS) == 2
            and value(samples, "luaq_consumer_concurrency", **JOBS) == 2
        )

    # before its replacement starts (1 s later): the dead one's gauges are gone at once
    wait_until(dropped, 0.9, "the dead worker's gauges and readiness gone")
    assert time.monotonic() - killed_at < 0.9
    reason = "worker process 1 of 2: restarting in 1s (killed by SIGKILL)\n"
    assert get(port, "/readyz")[0::2] == (503, reason)
    assert value(history[-1], "luaq_messages_settled_total", **JOBS, outcome="ack") == 100

    # replaced: ready again, and the new worker runs the dead one's two messages again
    wait_until(lambda: len(workers | set(children(process, workers))) == 3, 10, "a new worker")
    wait_until(lambda: get(port, "/readyz")[0] == 200, 10, "ready again")
    wait_until(lambda: value(sample(), "luaq_handlers_in_flight", **JOBS) == 4, 10, "4 running")
    (replacement,) = workers - {victim, other}
    assert children(process, workers) == sorted([other, replacement])
    samples = sample()
    assert value(samples, "luaq_messages_received_total", **JOBS) == 100 + 4 + 2
    assert value(samples, "luaq_messages_settled_total", **JOBS, outcome="ack") == 100
    assert value(samples, "luaq_consumer_concurrency", **JOBS) == 4
    never_decreased(history)
    died = logged(process, "worker process died: restarting it")
    assert [(d["pid"], d["how"], d["restart_in_s"]) for d in died] == [
        (victim, "killed by SIGKILL", 1.0)
    ]
    started = {line["pid"] for line in logged(process, "worker process started")}
    assert started == {victim, other, replacement}


def test_workers_die_with_their_supervisor(
    tmp_path: Path, spawn: Spawner, url: str, workers: set[int]
) -> None:
    process = spawn("run", app(tmp_path, url), "--processes", "2")
    wait_until(lambda: workers_up(process, 2), 20, "both workers consuming")
    pids = children(process, workers)
    assert asyncio.run(queue_depth("jobs", url))[1] == 2

    process.popen.kill()
    process.wait(5)

    wait_until(lambda: not any(alive(pid) for pid in pids), 5, "the workers gone too")
    wait_until(lambda: asyncio.run(queue_depth("jobs", url))[1] == 0, 10, "no consumer left")


def test_workers_that_keep_dying_make_the_supervisor_give_up(
    tmp_path: Path, spawn: Spawner, url: str, workers: set[int]
) -> None:
    process = spawn("run", app(tmp_path, url), "--processes", "2")
    begun = time.monotonic()
    killed: set[int] = set()

    def kill_each_worker() -> bool:
        for pid in set(children(process, workers)) - killed:
            os.kill(pid, signal.SIGKILL)
            killed.add(pid)
        return process.popen.poll() is not None

    wait_until(kill_each_worker, 28, "the supervisor gone")
    assert process.wait(1) == 1, process.stderr
    assert time.monotonic() - begun < 28
    # 5 workers for the slot that gave up, 4 or 5 for the other; backoff 1, 2, 4, 8 s
    assert 9 <= len(killed) <= 10, killed
    (gave_up,) = logged(process, "worker processes keep dying: giving up")
    assert (gave_up["level"], gave_up["deaths"]) == ("error", 5)
    assert gave_up["how"] == "killed by SIGKILL"
    died = logged(process, "worker process died: restarting it")
    assert sorted({line["restart_in_s"] for line in died}) == [1.0, 2.0, 4.0, 8.0]


def test_sigterm_ends_the_pod_within_the_grace_period_and_a_second(
    tmp_path: Path, spawn: Spawner, url: str, workers: set[int]
) -> None:
    """One worker runs a handler longer than the grace period, the other is stopped (SIGSTOP)
    and cannot answer: it is killed at the deadline."""
    process = spawn("run", app(tmp_path, url, prefetch=1), "--processes", "2",
                    "--shutdown-timeout", "1")  # fmt: skip
    wait_until(lambda: workers_up(process, 2), 20, "both workers consuming")
    publish(url, {"sleep": 60})
    wait_until(lambda: asyncio.run(queue_depth("jobs", url))[0] == 0, 10, "the message taken")
    stuck, _ = children(process, workers)
    os.kill(stuck, signal.SIGSTOP)

    begun = time.monotonic()
    process.popen.send_signal(signal.SIGTERM)
    code = process.wait(5)
    elapsed = time.monotonic() - begun

    assert elapsed < 1 + 1, elapsed
    assert code == 1, "a worker had to be killed"
    assert not any(alive(pid) for pid in workers)
    killed = logged(process, "worker process still running at the deadline: killed")
    assert [line["pid"] for line in killed] == [stuck]
    assert asyncio.run(queue_depth("jobs", url))[0] == 1, "the cut-short message is back"


LOUD = """
function handle(p)
  logger:info("loud", {n = p.n, text = string.rep("x", 8000), nan = 0/0, inf = -1/0})
end
"""


def test_the_json_lines_of_every_worker_process_stay_whole(tmp_path: Path, url: str) -> None:
    """Four processes writing lines over a pipe's 4 KiB at once (a container's stderr is a
    pipe) cut into each other's: a review found 853 of 20,012 lines no JSON. And a handler's
    0/0 was written as NaN, which no strict JSON reader takes."""
    publish(url, *({"n": n} for n in range(1000)))
    entries = app(tmp_path, url, LOUD, concurrency=4, prefetch=50, modules=["logger"])
    done = subprocess.run(
        [*LUAQ, "--log-format", "json", "run", str(entries), "--processes", "4", "--until-idle"],
        capture_output=True, text=True, timeout=120, check=False,
    )  # fmt: skip
    assert done.returncode == 0, done.stderr[-2000:]
    loud = [line for line in json_lines(done.stderr) if line["msg"] == "loud"]
    assert sorted(line["fields"]["n"] for line in loud) == list(range(1000))
    assert {(line["fields"]["nan"], line["fields"]["inf"]) for line in loud} == {("nan", "-inf")}


DRAWER = """
local drawn
function handle(p)
  if not drawn then
    drawn = math.random(1, 1 << 53)
    logger:info("first draw", {value = drawn})
  end
  time.sleep(p.sleep)
end
"""


def test_each_worker_process_draws_numbers_of_its_own(
    tmp_path: Path, spawn: Spawner, url: str, workers: set[int]
) -> None:
    """Forked from one load, every worker process drew the same numbers from math.random, and
    a restarted one the numbers of the first: ids or tokens made of them collided."""
    entries = app(tmp_path, url, DRAWER, prefetch=1, modules=["time", "logger"])
    process = spawn("run", entries, "--processes", "2")
    wait_until(lambda: workers_up(process, 2), 20, "both workers consuming")
    publish(url, *({"sleep": 0.2} for _ in range(10)))
    wait_until(lambda: len(logged(process, "first draw")) == 2, 20, "a draw in each process")
    victim, _ = children(process, workers)
    os.kill(victim, signal.SIGKILL)
    wait_until(lambda: workers_up(process, 3), 20, "its replacement consuming")
    publish(url, *({"sleep": 0.2} for _ in range(10)))
    wait_until(lambda: len(logged(process, "first draw")) == 3, 20, "a draw in the replacement")
    draws = [line["fields"]["value"] for line in logged(process, "first draw")]
    assert len(set(draws)) == 3, draws


@pytest.mark.parametrize("signum", [signal.SIGTERM, signal.SIGINT], ids=["SIGTERM", "SIGINT"])
def test_a_stop_while_a_worker_starts_is_a_clean_stop(signum: signal.Signals) -> None:
    """A worker takes its stop signals once its event loop runs; one passed on before (while
    it builds, connects) killed it or raised KeyboardInterrupt in it, and the pod exited 1 for
    a stop it was asked for, with nothing taken."""

    def starting(_: FlightLog) -> int:  # (the forked worker) its pod is stopped as it starts
        os.kill(os.getppid(), signum)
        time.sleep(30)
        return 0

    # as `luaq run` has them when it starts its supervisor (an earlier test may have left others)
    previous = signal.signal(signal.SIGTERM, signal.SIG_DFL), signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, signal.default_int_handler)
    begun = time.monotonic()
    try:
        assert Supervisor(1, starting, grace=5, hard_timeout=60).run() == 0
    finally:
        signal.signal(signal.SIGTERM, previous[0])
        signal.signal(signal.SIGINT, previous[1])
    assert time.monotonic() - begun < 5, "the worker did not wait for the deadline"


def test_workers_that_disagree_on_a_metric_do_not_break_metrics(
    tmp_path: Path, spawn: Spawner, url: str, workers: set[int]
) -> None:
    """Each worker takes one message (prefetch 1, the handler keeps running), so that one
    registers `x` as a counter and the other as a gauge."""
    source = """
    function handle(p)
      if p.kind == "counter" then metrics.counter("x", {}) else metrics.gauge("x", {}, 1) end
      metrics.counter("handled", {})
      time.sleep(60)
    end
    """
    port = free_port()
    process = spawn("run", app(tmp_path, url, source, prefetch=1), "--processes", "2",
                    "--metrics-port", str(port), "--shutdown-timeout", "1")  # fmt: skip
    wait_until(lambda: get(port, "/readyz")[0] == 200, 20, "both processes ready")
    children(process, workers)
    publish(url, {"kind": "counter"})
    wait_until(lambda: value(scrape(port), "luaq_handlers_in_flight", **JOBS) == 1, 10, "one")
    publish(url, {"kind": "gauge"})

    def both_reported() -> bool:
        samples = scrape(port)  # 200 every time
        return value(samples, "luaq_user_handled_total", function="app:worker#handler") == 2

    wait_until(both_reported, 10, "both workers' snapshots merged")
    for _ in range(3):
        samples = scrape(port)
        assert value(samples, "luaq_handlers_in_flight", **JOBS) == 2
        assert value(samples, "luaq_messages_received_total", **JOBS) == 2
        assert not any(name.startswith("luaq_user_x") for name, _ in samples)
    assert get(port, "/readyz")[0] == 200
    said = [line for line in process.logs() if line.get("metric") == "luaq_user_x"]
    assert [(line["level"], line["msg"]) for line in said] == [
        ("error", "metric left out: worker processes disagree on its type, labels or buckets")
    ]


# -- the pod's view, from snapshots written by hand ---------------------------------------------


def snapshot(directory: Path, pid: int, families: list[Any], unready: str | None = None) -> None:
    data = {"pid": pid, "beat": time.monotonic(), "unready": unready, "families": families}
    (directory / f"{pid}.json").write_text(json.dumps(data))


def test_dead_workers_handler_metrics_keep_a_processs_bounds(tmp_path: Path) -> None:
    """Each worker killed with new label sets of a handler's metric added them to the pod's
    sums, up to 10,000 series in all: a review's kills made 1,462 label sets of one metric and
    a /metrics of 3.9 MB. A metric keeps at most MAX_USER_SERIES of them, as in a process."""
    pod = Pod(1, Snapshots(tmp_path))
    for death, pid in enumerate((101, 102, 103)):
        keys = [("app:f#handler", f"tag-{death}-{n}") for n in range(MAX_USER_SERIES)]
        family = Family("luaq_user_tagged", "counter", "c", ("function", "tag"),
                        series=dict.fromkeys(keys, 1))  # fmt: skip
        pod.started(0, pid)
        snapshot(tmp_path, pid, [family.to_json()])
        pod.source().families()  # (read, as a scrape would)
        pod.ended(0, pid, "killed by SIGKILL")
    families = {family.name: family for family in pod.source().families()}
    tagged = families["luaq_user_tagged"].series
    assert len(tagged) == MAX_USER_SERIES
    assert all(tag.startswith("tag-0-") for _, tag in tagged)  # the first kept, as a process does


def test_a_bad_snapshot_never_breaks_a_scrape_and_dead_counters_stay(tmp_path: Path) -> None:
    counter = Family("luaq_c", "counter", "c", ("q",), series={("a",): 5}).to_json()
    gauge = Family("luaq_g", "gauge", "g", series={(): 3}).to_json()
    pod = Pod(3, Snapshots(tmp_path))
    for index, pid in enumerate((101, 102, 103)):
        pod.started(index, pid)
    snapshot(tmp_path, 101, [counter, gauge])
    snapshot(tmp_path, 102, [counter, gauge, {**gauge, "series": [[[], "many"]]},
                             {"name": "luaq_c", "type": "gauge"}, "not a family"])  # fmt: skip
    (tmp_path / "103.json").write_text('{"pid": 103, "families": 7}')
    source = pod.source()

    families = {family.name: family for family in source.families()}
    assert families["luaq_c"].series == {("a",): 10}
    assert families["luaq_g"].series == {(): 6}
    assert families["luaq_worker_ready"].series == {(): 0}
    assert source.unready() == "starting (2 of 3 processes up)"
    server = Server("127.0.0.1", 0)
    server.start(source)
    try:
        status, _, body = get(int(server.address.rsplit(":", 1)[1]), "/metrics")
    finally:
        server.stop()
    assert status == 200
    assert 'luaq_c_total{q="a"} 10.0' in body

    pod.ended(0, 101, "killed by SIGKILL")
    assert not (tmp_path / "101.json").exists()
    families = {family.name: family for family in source.families()}
    assert families["luaq_c"].series == {("a",): 10}, "the dead one's counter is retired"
    assert families["luaq_g"].series == {(): 3}, "its gauge is gone"
    assert source.unready() == "worker process 1 of 3: killed by SIGKILL"
