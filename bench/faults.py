"""Nothing lost under faults, in figures: a restart, a partition, an alarm, a killed worker on
RabbitMQ.

    python bench/faults.py [--messages 20000] [--scenarios baseline,restart,partition,alarm,kill]

Each scenario runs on a RabbitMQ node of its own, which the script starts from the installed
rabbitmq-server on free ports (never the shared node on 5672) and stops afterwards. It fills
queue `in` with N JSON messages `{"n": i}`, runs `luaq run` (the command line, as a child
process) with a handler that publishes `{n = p.n}` to `out` (concurrency 32, prefetch 200,
reconnect_delay 200ms), injects the fault once a quarter of the outputs are there, waits until
`in` and its delay queues are drained and the outputs stop coming, stops the worker (SIGTERM),
then drains `out` and counts: every n must be there at least once (at-least-once: duplicates
are counted, a loss is a bug).

  baseline   no fault: the drain time the others compare with
  restart    `rabbitmqctl stop_app`, then `start_app` on the node
  partition  luaq reaches the broker through a TCP proxy that holds every byte, both ways, new
             connections included, for 10 s (heartbeat 2s), no FIN, then lets them through
  alarm      `rabbitmqctl set_vm_memory_high_watermark 0.0001` for 10 s (the broker blocks
             publishers), then back to 0.4
  kill       SIGKILL to the worker, then `luaq run --until-idle` finishes the job

Prints one JSON object on stdout, progress on stderr. Per scenario: `published`, `processed`
(handler runs, as the summaries count them: a killed worker prints none), `outputs` (messages
in `out`), `distinct` n among them, `duplicates` (outputs - distinct), `lost` (n never in
`out`: must be 0), `seconds_to_drain` (from starting `luaq run` to the last output),
`seconds_after_fault` (from the fault's end to the last output), `fault_seconds`,
`outputs_at_fault`, and `workers`: each luaq process's exit code, summary table and what it
logged of its connections. Exits 1 when a scenario lost a message or failed; its directory
(entries, luaq's stdout and stderr, the node's logs) is kept and named in the JSON (`kept`).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import json
import logging
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import aiormq
import yaml
from pamqp.commands import Basic

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests" / "support"))

from broker import queue_totals  # noqa: E402
from rabbit_node import RabbitNode, rabbit_node  # noqa: E402

HANDLER = 'function handle(p) return queue.publish("app:out", {n = p.n}) end'
SCENARIOS = ("baseline", "restart", "partition", "alarm", "kill")
FAULT_AT = 0.25  # the fault comes once this share of the outputs is in `out`
STALL = 10.0  # seconds the partition holds every byte
ALARM = 10.0  # seconds the memory alarm lasts
HEARTBEAT = 2  # seconds, in the partition scenario
QUIET = 30.0  # seconds drained without a new output before the missing ones count as lost
DEADLINE = 900.0  # seconds a scenario may take from the worker's start to drained
DRIVER = {"reconnect_delay": "200ms", "reconnect_max_delay": "2s", "connection_timeout": "20s"}
CONSUMER = {"concurrency": 32, "prefetch": 200}
STARTED = time.monotonic()


def luaq_command() -> list[str]:
    for candidate in (ROOT / ".venv/bin/luaq", Path(sys.executable).with_name("luaq")):
        if candidate.exists():
            return [str(candidate)]
    found = shutil.which("luaq")
    if found is None:
        raise SystemExit("faults.py: no luaq command (make the venv: `make demo`)")
    return [found]


def note(message: str) -> None:
    print(f"[{time.monotonic() - STARTED:7.1f}s] {message}", file=sys.stderr, flush=True)


@contextlib.asynccontextmanager
async def private_node() -> AsyncIterator[RabbitNode]:
    """rabbit_node, started and stopped in a thread: the event loop runs meanwhile, so what
    was connected to the node sees it go and closes before asyncio.run ends."""
    starting = rabbit_node()
    node = await asyncio.to_thread(starting.__enter__)
    try:
        yield node
    finally:
        await asyncio.to_thread(starting.__exit__, None, None, None)


async def ctl(node: RabbitNode, *args: str, seconds: float = 120) -> str:
    """rabbitmqctl against the scenario's node, in a thread: the watch, the partition's proxy
    and the workers go on meanwhile."""
    return await asyncio.to_thread(node.ctl, *args, timeout=seconds)


# --- a network partition ----------------------------------------------------------------------


class Partition:
    """A TCP proxy to the broker that can hold every byte, both ways, and new connections too,
    closing nothing: what both ends see of a partition (no FIN, no RST, just silence)."""

    def __init__(self, target: int) -> None:
        self.target = target
        self.port = 0
        self.accepted = 0
        self.flowing = asyncio.Event()
        self.flowing.set()
        self.writers: set[asyncio.StreamWriter] = set()
        self.server: asyncio.Server | None = None

    async def start(self) -> None:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self.server.sockets[0].getsockname()[1]

    async def close(self) -> None:
        self.flowing.set()
        if self.server is not None:
            self.server.close()
        for writer in self.writers:
            writer.transport.abort()
        if self.server is not None:
            await self.server.wait_closed()

    def stall(self) -> None:
        self.flowing.clear()

    def resume(self) -> None:
        self.flowing.set()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        self.writers.add(writer)
        try:
            await self.flowing.wait()  # a new connection gets no further than the proxy
            upstream_reader, upstream_writer = await asyncio.open_connection(
                "127.0.0.1", self.target
            )
        except OSError:
            writer.transport.abort()
            self.writers.discard(writer)
            return
        self.writers.add(upstream_writer)
        await asyncio.gather(
            self._pipe(reader, upstream_writer, writer),
            self._pipe(upstream_reader, writer, upstream_writer),
        )
        self.writers.difference_update((writer, upstream_writer))

    async def _pipe(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter, own: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self.flowing.wait()
                writer.write(data)
                await writer.drain()
            await self.flowing.wait()
            if writer.can_write_eof():
                writer.write_eof()  # half-close, as the other side did
        except (OSError, RuntimeError):
            writer.transport.abort()
            own.transport.abort()


# --- the broker's queues, seen from outside -----------------------------------------------------


async def fill(url: str, count: int) -> None:
    """`{"n": i}` for i in 0..count-1 into `in`, persistent, confirmed, 1,000 in flight."""
    connection = await aiormq.connect(url)
    channel = await connection.channel()
    await channel.queue_declare("in", durable=True)
    properties = Basic.Properties(content_type="application/json", delivery_mode=2)
    for start in range(0, count, 1000):
        await asyncio.gather(
            *(
                channel.basic_publish(
                    json.dumps({"n": n}).encode(), routing_key="in", properties=properties
                )
                for n in range(start, min(start + 1000, count))
            )
        )
    await connection.close()


async def drain(url: str) -> list[int]:
    """Every message in `out`, taken off the queue, as its n."""
    connection = await aiormq.connect(url)
    try:
        channel = await connection.channel()
        declared = await channel.queue_declare("out", passive=True)
        expected = int(declared.message_count or 0)
        seen: list[int] = []
        done = asyncio.Event()

        async def take(message: aiormq.abc.DeliveredMessage) -> None:
            seen.append(json.loads(message.body)["n"])
            if len(seen) >= expected:
                done.set()

        if expected:
            await channel.basic_consume("out", take, no_ack=True)
            await asyncio.wait_for(done.wait(), 120)
        return seen
    finally:
        await connection.close()


@dataclass
class Watch:
    """Polls `out` and `in` on the node itself (never through the proxy) every 0.2 s, over one
    connection, made again when the node drops it."""

    url: str
    outputs: int = 0
    last_output: float = field(default_factory=time.monotonic)
    in_ready: int = -1
    in_consumers: int = -1

    async def run(self) -> None:
        connection: aiormq.abc.AbstractConnection | None = None
        channel: aiormq.abc.AbstractChannel | None = None
        while True:
            try:
                if connection is None or connection.is_closed:
                    connection = await asyncio.wait_for(aiormq.connect(self.url), 5)
                    channel = None
                if channel is None or channel.is_closed:
                    channel = await asyncio.wait_for(connection.channel(), 5)
                out = await asyncio.wait_for(channel.queue_declare("out", passive=True), 5)
                if (count := int(out.message_count or 0)) != self.outputs:
                    self.outputs, self.last_output = count, time.monotonic()
                source = await asyncio.wait_for(channel.queue_declare("in", passive=True), 5)
                self.in_ready = int(source.message_count or 0)
                self.in_consumers = int(source.consumer_count or 0)
            except asyncio.CancelledError:
                if connection is not None and not connection.is_closed:
                    with contextlib.suppress(Exception):
                        await asyncio.wait_for(connection.close(), 5)
                raise
            except (aiormq.exceptions.AMQPError, OSError, TimeoutError):
                # the node is down, or `out` not declared yet (a 404 closes the channel)
                self.in_ready = self.in_consumers = -1
                if connection is not None and connection.is_closed:
                    connection = None
            await asyncio.sleep(0.2)


# --- luaq, through its command line -------------------------------------------------------------


@dataclass
class Luaq:
    args: list[str]
    popen: subprocess.Popen[bytes]
    stdout_path: Path
    stderr_path: Path
    files: tuple[IO[bytes], IO[bytes]]

    @classmethod
    def start(cls, directory: Path, *args: str) -> Luaq:
        n = len(list(directory.glob("stdout*.txt")))
        out, err = directory / f"stdout{n}.txt", directory / f"stderr{n}.txt"
        files = (out.open("wb"), err.open("wb"))
        command = [*luaq_command(), "--log-format", "json", *args]
        popen = subprocess.Popen(
            command, stdout=files[0], stderr=files[1], stdin=subprocess.DEVNULL, cwd=directory
        )
        return cls(["luaq", *args], popen, out, err, files)

    def running(self) -> bool:
        return self.popen.poll() is None

    def check(self) -> None:
        if not self.running():
            raise RuntimeError(
                f"luaq exited ({self.popen.returncode}):\n{self.stderr_path.read_text()[-3000:]}"
            )

    async def wait(self, seconds: float) -> int:
        code = await asyncio.to_thread(self.popen.wait, seconds)
        for file in self.files:
            file.close()
        return code

    async def stop(self) -> int:
        self.popen.send_signal(signal.SIGTERM)
        return await self.wait(60)

    def kill(self) -> None:
        if self.running():
            self.popen.kill()
            self.popen.wait(10)
        for file in self.files:
            file.close()

    def report(self) -> dict[str, Any]:
        """Exit code, the summary table it printed, and what it logged of the link."""
        logs = []
        for line in self.stderr_path.read_text().splitlines():
            with contextlib.suppress(json.JSONDecodeError):
                if isinstance(item := json.loads(line), dict):
                    logs.append(item)
        messages = [str(item.get("msg")) for item in logs]
        warnings: dict[str, int] = {}
        for item in logs:
            if item.get("level") in ("warning", "error", "critical"):
                text = str(item.get("msg"))[:160]
                warnings[text] = warnings.get(text, 0) + 1
        return {
            "command": " ".join(self.args),
            "exit_code": self.popen.returncode,
            "summary": summary(self.stdout_path.read_text()),
            "connections_lost": messages.count("connection lost, reconnecting"),
            "connections_restored": messages.count("connection restored"),
            "warnings": dict(sorted(warnings.items(), key=lambda kv: -kv[1])[:10]),
        }


def summary(out: str) -> dict[str, dict[str, float]] | None:
    """The per-consumer table `luaq run` prints when it stops: {consumer: {column: value}}."""
    table: dict[str, dict[str, float]] | None = None
    columns: list[str] = []
    for line in out.splitlines():
        fields = line.split()
        if fields[:1] == ["consumer"]:
            table, columns = {}, [*fields[1:-1], "msg_per_s"]
        elif table is not None and len(fields) == len(columns) + 1:
            values = [float(value) for value in fields[1:]]
            table[fields[0]] = {c: int(v) if v.is_integer() and c != "msg_per_s" else v
                                for c, v in zip(columns, values, strict=True)}  # fmt: skip
    return table


def write_app(directory: Path, url: str, heartbeat: int | None) -> Path:
    driver = {"name": "broker", "kind": "queue.driver.amqp", "url": url, **DRIVER}
    if heartbeat is not None:
        driver["heartbeat"] = f"{heartbeat}s"
    document = {
        "version": "1.0",
        "namespace": "app",
        "entries": [
            driver,
            {"name": "in", "kind": "queue.queue", "driver": "broker"},
            {"name": "out", "kind": "queue.queue", "driver": "broker"},
            {"id": "worker", "kind": "queue.consumer", "queue": "in", "method": "handle",
             "source": HANDLER, **CONSUMER},
        ],
    }  # fmt: skip
    path = directory / "app.yaml"
    path.write_text(yaml.safe_dump(document, sort_keys=False))
    return path


# --- the scenarios ------------------------------------------------------------------------------


@dataclass
class Run:
    name: str
    messages: int
    node: RabbitNode
    directory: Path
    app: Path
    watch: Watch
    workers: list[Luaq] = field(default_factory=list)
    proxy: Partition | None = None
    fault: dict[str, Any] = field(default_factory=dict)

    @property
    def worker(self) -> Luaq:
        return self.workers[-1]

    async def until(self, check: Callable[[], bool], what: str, seconds: float = 300) -> None:
        deadline = time.monotonic() + seconds
        while not check():
            self.worker.check()
            if time.monotonic() > deadline:
                raise TimeoutError(f"{what}: not within {seconds:.0f}s")
            await asyncio.sleep(0.1)


async def no_fault(run: Run) -> None:
    pass


async def restart(run: Run) -> None:
    note("stop_app")
    await ctl(run.node, "stop_app")
    run.fault["stopped_at"] = time.monotonic()
    note("start_app")
    await ctl(run.node, "start_app")
    await ctl(run.node, "await_startup", "--timeout", "60", seconds=90)


async def partition(run: Run) -> None:
    assert run.proxy is not None
    accepted = run.proxy.accepted
    note(f"partition: every byte held for {STALL:g}s")
    run.proxy.stall()
    await asyncio.sleep(STALL)
    run.proxy.resume()
    note("partition over")
    run.fault["connections_during_stall"] = run.proxy.accepted - accepted


async def alarm(run: Run) -> None:
    note(f"memory alarm for {ALARM:g}s")
    started = time.monotonic()
    await ctl(run.node, "set_vm_memory_high_watermark", "0.0001")
    run.fault["alarm_raised"] = "memory" in await ctl(
        run.node, "eval", "rabbit_alarm:get_alarms()."
    )
    await asyncio.sleep(max(0.0, ALARM - (time.monotonic() - started)))
    await ctl(run.node, "set_vm_memory_high_watermark", "0.4")
    run.fault["alarm_cleared"] = "memory" not in await ctl(
        run.node, "eval", "rabbit_alarm:get_alarms()."
    )
    note("memory alarm cleared")


async def kill(run: Run) -> None:
    note("SIGKILL to the worker")
    run.worker.kill()
    run.fault["killed_exit_code"] = run.worker.popen.returncode
    run.workers.append(Luaq.start(run.directory, "run", str(run.app), "--until-idle"))
    note("luaq run --until-idle")


FAULTS: dict[str, Callable[[Run], Awaitable[None]]] = {
    "baseline": no_fault,
    "restart": restart,
    "partition": partition,
    "alarm": alarm,
    "kill": kill,
}


async def drained(run: Run) -> bool:
    """Wait until nothing is left in any queue but `out`, ready or unacked (the delay queues of
    `in` included), twice in a row, with a worker consuming `in` (or the --until-idle one gone)
    and every input's output there; False when it stays drained for QUIET seconds without
    them (an output lost)."""
    deadline = time.monotonic() + DEADLINE
    empty_since: float | None = None
    while True:
        if time.monotonic() > deadline:
            raise TimeoutError(f"not drained within {DEADLINE:.0f}s")
        until_idle = run.name == "kill"
        if until_idle and not run.worker.running():
            if code := await run.worker.wait(1):
                raise RuntimeError(f"luaq run --until-idle exited {code}")
        elif not until_idle:
            run.worker.check()
        if run.watch.outputs >= run.messages or run.watch.in_ready == 0:
            totals = await asyncio.to_thread(queue_totals, "/", run.node.ctl)
            busy = {
                name: counts for name, counts in totals.items() if name != "out" and any(counts)
            }
            attached = not run.worker.running() if until_idle else run.watch.in_consumers >= 1
            if not busy and attached:
                if empty_since is None:
                    empty_since = time.monotonic()
                elif run.watch.outputs >= run.messages:
                    return True
                elif time.monotonic() - max(empty_since, run.watch.last_output) > QUIET:
                    return False
            else:
                empty_since = None
        await asyncio.sleep(0.5)


async def scenario(name: str, messages: int) -> dict[str, Any]:
    directory = Path(tempfile.mkdtemp(prefix=f"luaq-faults-{name}-"))
    result: dict[str, Any] = {}
    keep = False
    async with private_node() as node:
        note(f"{name}: node {node.name} on port {node.port}; filling `in` with {messages}")
        run: Run | None = None
        watching: asyncio.Task[None] | None = None
        try:
            await fill(node.url, messages)
            proxy = None
            url = node.url
            if name == "partition":
                proxy = Partition(node.port)
                await proxy.start()
                url = f"amqp://guest:guest@127.0.0.1:{proxy.port}/"
            heartbeat = HEARTBEAT if name == "partition" else None
            app = write_app(directory, url, heartbeat)
            watch = Watch(node.url)
            watching = asyncio.create_task(watch.run())
            run = Run(name, messages, node, directory, app, watch, proxy=proxy)
            started = time.monotonic()
            run.workers.append(Luaq.start(directory, "run", str(app), "--shutdown-timeout", "10"))
            note(f"{name}: luaq run started")
            await run.until(lambda: watch.outputs >= messages * FAULT_AT, "the fault's moment")
            outputs_at_fault = watch.outputs
            fault_started = time.monotonic()
            await FAULTS[name](run)
            fault_ended = time.monotonic()
            complete = await drained(run)
            note(f"{name}: drained, {watch.outputs} outputs" + ("" if complete else " (LOSS)"))
            if run.worker.running():
                code = await run.worker.stop()
                if code:
                    raise RuntimeError(f"luaq exited {code} on SIGTERM")
            watching.cancel()
            outputs = await drain(node.url)
            distinct = set(outputs)
            lost = sorted(set(range(messages)) - distinct)
            reports = [worker.report() for worker in run.workers]
            processed = [
                sum(row.get("processed", 0) for row in report["summary"].values())
                for report in reports
                if report["summary"] is not None
            ]
            result = {
                "published": messages,
                "processed": sum(processed),
                "outputs": len(outputs),
                "distinct": len(distinct),
                "duplicates": len(outputs) - len(distinct),
                "lost": len(lost),
                "seconds_to_drain": round(watch.last_output - started, 2),
                "seconds_after_fault": round(watch.last_output - fault_ended, 2),
                "fault_seconds": round(fault_ended - fault_started, 2),
                "outputs_at_fault": outputs_at_fault,
                **run.fault,
                "workers": reports,
            }
            if "stopped_at" in result:
                result["stopped_at"] = round(result["stopped_at"] - fault_started, 2)
            if lost:
                result["lost_n"] = lost[:50]
                keep = True
            if unexpected := sorted(distinct - set(range(messages))):
                result["unexpected_n"] = unexpected[:50]
                keep = True
        except Exception as exc:
            note(f"{name}: failed: {exc!r}")
            result = {"error": f"{type(exc).__name__}: {exc}"}
            if run is not None:
                with contextlib.suppress(Exception):
                    result["workers"] = [worker.report() for worker in run.workers]
            keep = True
        finally:
            if watching is not None:
                watching.cancel()
                with contextlib.suppress(BaseException):
                    await watching
            if run is not None:
                for worker in run.workers:
                    worker.kill()
                if run.proxy is not None:
                    await run.proxy.close()
            if keep:
                log = Path(node.env["RABBITMQ_LOG_BASE"])
                shutil.copytree(log, directory / "rabbitmq-log", dirs_exist_ok=True)
    if keep:
        result["kept"] = str(directory)
        note(f"{name}: kept {directory}")
    else:
        shutil.rmtree(directory, ignore_errors=True)
    return result


def version(*command: str) -> str:
    with contextlib.suppress(OSError, subprocess.SubprocessError):
        done = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
        return done.stdout.strip()
    return "unknown"


def commit() -> str:
    """HEAD, and whether luaq's runtime in the work tree differs from it (`-dirty`)."""
    head = version("git", "rev-parse", "--short", "HEAD")
    changed = subprocess.run(
        ["git", "diff", "--quiet", "HEAD", "--", "runtime"], cwd=ROOT, check=False
    ).returncode
    return f"{head}-dirty" if changed else head


async def main_async(args: argparse.Namespace) -> dict[str, Any]:
    names = [name.strip() for name in args.scenarios.split(",") if name.strip()]
    if unknown := [name for name in names if name not in FAULTS]:
        raise SystemExit(f"faults.py: unknown scenarios {unknown}, known: {', '.join(FAULTS)}")
    results: dict[str, Any] = {}
    for name in names:
        results[name] = await scenario(name, args.messages)
        if "error" not in results[name]:
            r = results[name]
            note(f"{name}: lost {r['lost']}, duplicates {r['duplicates']}, "
                 f"drained in {r['seconds_to_drain']}s")  # fmt: skip
    return {
        "benchmark": "faults",
        "messages": args.messages,
        "settings": {
            "handler": HANDLER,
            "driver": DRIVER,
            "consumer": CONSUMER,
            "fault_at_outputs": FAULT_AT,
            "partition": {"stall_seconds": STALL, "heartbeat_seconds": HEARTBEAT},
            "alarm": {"seconds": ALARM, "vm_memory_high_watermark": 0.0001},
        },
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "luaq": version(*luaq_command(), "--version"),
            "commit": commit(),
            "rabbitmq": version("dpkg-query", "-W", "-f", "${Version}", "rabbitmq-server"),
            "load_average": [round(x, 2) for x in os.getloadavg()],
        },
        "scenarios": results,
    }


def main() -> int:
    parser = argparse.ArgumentParser(
        description="Run luaq through RabbitMQ faults (node restart, partition, memory alarm, "
        "kill -9) on a private node and count what reached the sink; prints one JSON object."
    )
    parser.add_argument("--messages", type=int, default=20_000, help="per scenario (20000)")
    parser.add_argument(
        "--scenarios", default=",".join(SCENARIOS), help=f"comma list ({','.join(SCENARIOS)})"
    )
    args = parser.parse_args()
    if args.messages < 4:
        parser.error("--messages: at least 4")
    logging.getLogger("aiormq").setLevel(logging.CRITICAL)  # the watch's drops are expected
    report = asyncio.run(main_async(args))
    print(json.dumps(report, indent=2))
    bad = [r for r in report["scenarios"].values() if "error" in r or r["lost"]]
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
