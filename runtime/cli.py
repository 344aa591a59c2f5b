"""The `luaq` command: check entries files, run their consumers.

Exit codes: 0 ok, 1 runtime failure, 2 configuration error (nothing was started).
Every flag can also come from the environment as LUAQ_<FLAG> (the operator's way in).
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import signal
import sys
import tempfile
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import uvloop

from . import __version__, assembly, dlq, entries, inputs, logs
from .check import check
from .entries import Config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError, QueueError, failed
from .metrics import Server, Snapshots
from .settings import Settings
from .supervisor import Supervisor
from .worker import Worker


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"LUAQ_{name.upper()}", default)


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="luaq", description="Run queue consumers written in Lua.")
    parser.add_argument("--version", action="version", version=f"luaq {__version__}")
    parser.add_argument(
        "--log-level",
        default=_env("log_level", "info"),
        choices=["debug", "info", "warning", "error"],
        help="minimum level of the log lines on stderr (default: info)",
    )
    parser.add_argument(
        "--log-format",
        default=_env("log_format", "auto"),
        choices=["auto", "text", "json"],
        help="text for a person, json for a log collector; auto: text on a terminal, else json",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    check = commands.add_parser("check", help="validate entries files and their Lua sources")
    check.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="file or directory")

    run = commands.add_parser("run", help="run every consumer the entries declare")
    run.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="file or directory")
    run.add_argument(
        "--input",
        type=Path,
        metavar="FILE.jsonl",
        help='publish each line {"queue": ID, "data": ..., "headers": {...}} before consuming',
    )
    run.add_argument(
        "--until-idle",
        action="store_true",
        help="exit once every consumed queue is empty and no handler runs, with a summary",
    )
    run.add_argument(
        "--shutdown-timeout",
        type=float,
        default=float(_env("shutdown_timeout", Settings.shutdown_timeout)),
        metavar="SECONDS",
        help="grace period for running handlers on SIGTERM/SIGINT (default: %(default)s)",
    )
    run.add_argument(
        "--processes",
        type=int,
        default=int(_env("processes", 1)),
        metavar="N",
        help="worker processes, each running every consumer (broker drivers only; "
        "default: %(default)s)",
    )
    run.add_argument(
        "--max-instructions",
        type=int,
        default=int(_env("max_instructions", Settings.max_instructions)),
        metavar="N",
        help="Lua instructions one invocation may run before it is stopped (default: %(default)s)",
    )
    run.add_argument(
        "--metrics-port",
        type=int,
        default=_env("metrics_port", None),
        metavar="PORT",
        help="serve /metrics (Prometheus), /healthz and /readyz on this port (default: off); "
        "with --processes, one port for all of them",
    )
    run.add_argument(
        "--metrics-address",
        default=_env("metrics_address", "0.0.0.0"),
        metavar="ADDRESS",
        help="the address the metrics port listens on (default: %(default)s)",
    )
    run.add_argument(
        "--lua-max-memory",
        type=int,
        default=int(_env("lua_max_memory", Settings.lua_max_memory // 2**20)),
        metavar="MIB",
        help="memory limit of the process's Lua state in MiB (default: %(default)s)",
    )

    manifests = commands.add_parser(
        "manifests",
        help="print the project as Kubernetes QueueConsumer resources (and source ConfigMaps)",
        description="One QueueConsumer per consumer, a ConfigMap per Lua source file; the "
        "broker URL is read from a Secret on the cluster. Apply with `kubectl apply -f -`.",
    )
    manifests.add_argument("paths", nargs="+", type=Path, metavar="PATH", help="file or directory")
    manifests.add_argument("--namespace", metavar="NS", help="the Kubernetes namespace to set")
    manifests.add_argument(
        "--broker-secret",
        default="luaq-broker",
        metavar="NAME",
        help="the Secret holding the broker URL under the key url (default: %(default)s)",
    )

    dlq = commands.add_parser(
        "dlq",
        help="list, replay or purge the messages of a dead-letter queue",
        description="list shows each message's reason and attempts; replay moves messages "
        "back to their original queue; purge deletes them (asks first unless --yes).",
    )
    dlq.add_argument("action", choices=["list", "replay", "purge"])
    dlq.add_argument("queue_id", metavar="QUEUE_ID", help="namespace:name of the queue entry")
    dlq.add_argument(
        "--entries", type=Path, action="append", required=True, metavar="PATH",
        help="entries file or directory declaring the queue (repeatable)",
    )  # fmt: skip
    dlq.add_argument("--yes", action="store_true", help="purge without asking")

    publish = commands.add_parser(
        "publish",
        help="publish one message through the driver of a declared queue",
        description="Publish one message. DATA is JSON (a bare word is sent as a string).",
    )
    publish.add_argument(
        "--entries",
        type=Path,
        action="append",
        required=True,
        metavar="PATH",
        help="entries file or directory declaring the queue (repeatable)",
    )
    publish.add_argument("queue_id", metavar="QUEUE_ID", help="namespace:name of a queue entry")
    publish.add_argument("data", metavar="DATA", help="the message data, as JSON")
    publish.add_argument(
        "-H", "--header", action="append", default=[], metavar="KEY=VALUE",
        help="a message header; VALUE is read as JSON when it parses (numbers, true), "
        "else as text (repeatable)",
    )  # fmt: skip
    return parser


SUMMARY = (
    "processed", "acked", "failed", "retried", "requeued", "dead_lettered", "rejected", "stale",
)  # fmt: skip


def _summary(worker: Worker, out: TextIO) -> None:
    """One row per consumer: invocations, then what became of the messages (see ConsumerStats:
    `stale` ones came on a connection that was lost, and the broker delivers them again)."""
    width = max([len("consumer"), *(len(c.entry.id) for c in worker.consumers)])
    lines = [f"{'consumer':<{width}}  " + "  ".join(f"{c:>7}" for c in SUMMARY) + "    msg/s"]
    for consumer in worker.consumers:
        stats = consumer.stats
        values = "  ".join(f"{getattr(stats, c):>{max(len(c), 7)}}" for c in SUMMARY)
        lines.append(f"{consumer.entry.id:<{width}}  {values}  {stats.rate:>7.1f}")
    # one write: with --processes, the tables of the processes must not interleave (stdout may
    # be unbuffered: PYTHONUNBUFFERED is common in containers)
    out.write("".join(f"{line}\n" for line in lines))
    out.flush()


async def _progress(worker: Worker, out: TextIO) -> None:
    started = time.monotonic()
    while True:
        await asyncio.sleep(1.0)
        done = sum(c.stats.processed for c in worker.consumers)
        elapsed = time.monotonic() - started
        out.write(f"\r{done} processed in {elapsed:.0f}s ({done / elapsed:.0f} msg/s)  ")
        out.flush()


async def _run(
    worker: Worker, messages: Sequence[inputs.InputMessage], until_idle: bool, grace: float
) -> int:
    loop = asyncio.get_running_loop()
    stop = asyncio.Event()

    def stopping() -> None:
        worker.lifecycle.state = "stopping"  # not ready from now on, while handlers finish
        stop.set()

    for signum in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(signum, stopping)
    progress = asyncio.create_task(_progress(worker, sys.stderr)) if sys.stderr.isatty() else None
    try:
        await worker.start()
        for message in messages:
            await worker.host.publish("", message.queue, message.data, message.headers)
        waiters: list[asyncio.Task[Any]] = [asyncio.create_task(stop.wait())]
        if until_idle:
            waiters.append(asyncio.create_task(worker.wait_idle()))
        done, pending = await asyncio.wait(waiters, return_when=asyncio.FIRST_COMPLETED)
        for task in pending:
            task.cancel()
        for task in done:
            task.result()  # a failure to tell idleness is not idleness
    except QueueError as exc:
        return failed(exc)
    finally:
        if progress is not None:
            progress.cancel()
            sys.stderr.write("\n")
        await worker.stop(grace)
    _summary(worker, sys.stdout)
    if until_idle and (left := sum(c.stats.unsettled for c in worker.consumers)):
        print(
            f"luaq: {left} message(s) left unsettled by an error in luaq (logged above): the "
            "queues look empty, but the broker delivers these again",
            file=sys.stderr,
        )
        return EXIT_FAILURE
    return EXIT_OK


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logs.configure(args.log_level, args.log_format)
    settings = Settings()
    if args.command == "run":
        settings = Settings(
            max_instructions=args.max_instructions,
            lua_max_memory=args.lua_max_memory * 2**20,
            shutdown_timeout=args.shutdown_timeout,
        )
    paths = args.entries if args.command in ("publish", "dlq") else args.paths
    try:
        if args.command in ("check", "manifests"):  # the Lua loads in a child, bounded
            config = check(paths, settings)
        else:  # what runs: the Lua loads here
            loaded = assembly.load(entries.load(paths), settings)
            config = loaded.config
        messages = inputs.read(args.input, config) if getattr(args, "input", None) else []
        if args.command == "publish":
            publish = inputs.message(config, args.queue_id, args.data, args.header)
        if args.command == "manifests":
            return _manifests(config, args)
    except ConfigError as exc:
        for problem in exc.problems:
            print(problem, file=sys.stderr)
        print(f"luaq: {len(exc.problems)} problem(s), nothing was started", file=sys.stderr)
        return EXIT_CONFIG
    if args.command == "check":
        print(
            f"ok: {len(config.files)} file(s), {len(config.drivers)} driver(s), "
            f"{len(config.queues)} queue(s), {len(config.functions)} function(s), "
            f"{len(config.consumers)} consumer(s)"
        )
        for consumer in config.consumers.values():
            function = consumer.function_id.removesuffix("#handler")
            print(
                f"  {consumer.id}: {consumer.queue} -> {function}"
                f" (concurrency {consumer.concurrency}, prefetch {consumer.prefetch})"
            )
        return EXIT_OK
    with contextlib.suppress(KeyboardInterrupt):
        if args.command == "publish":
            return uvloop.run(inputs.publish(assembly.build(loaded), [publish], show_ids=True))
        if args.command == "dlq":
            return uvloop.run(
                dlq.command(assembly.build(loaded), args.action, args.queue_id, args.yes)
            )
        if args.processes > 1:
            return _run_processes(loaded, messages, args, settings.shutdown_timeout)
        server = None
        if args.metrics_port is not None:
            server = _server(args)
            if server is None:
                return EXIT_FAILURE
        worker = assembly.build(
            loaded,
            sample_backlog=server is not None,
            metrics_address=server.address if server is not None else None,
        )
        if server is not None:
            server.start(worker.telemetry.source())
        try:
            return uvloop.run(_run(worker, messages, args.until_idle, settings.shutdown_timeout))
        finally:
            if server is not None:
                server.stop()
    return EXIT_OK


def _server(args: argparse.Namespace) -> Server | None:
    """The metrics server, its port bound; None when the port cannot be had (said on stderr)."""
    try:
        return Server(args.metrics_address, args.metrics_port)
    except OSError as exc:
        print(f"luaq: --metrics-port {args.metrics_port}: {exc.strerror or exc}", file=sys.stderr)
        return None


def _manifests(config: Config, args: argparse.Namespace) -> int:
    from luaq.operator.manifests import manifests  # pydantic models only, no cluster client

    result = manifests(config, args.namespace, args.broker_secret)
    for note in result.notes:
        print(f"note: {note}", file=sys.stderr)
    sys.stdout.write(result.yaml())
    return EXIT_OK


def _run_processes(
    loaded: assembly.Loaded,
    messages: Sequence[inputs.InputMessage],
    args: argparse.Namespace,
    grace: float,
) -> int:
    memory = [d.id for d in loaded.config.drivers.values() if d.kind == "queue.driver.memory"]
    if memory:
        print(
            f"--processes: driver {memory[0]} is in-memory and cannot be shared between "
            "processes; use a broker driver or --processes 1",
            file=sys.stderr,
        )
        return EXIT_CONFIG
    if args.metrics_port is None:
        worker = assembly.build(loaded)
        if messages and (code := uvloop.run(inputs.publish(worker, messages, show_ids=False))):
            return code
        return Supervisor(
            args.processes, _child(worker, args, grace), grace, until_idle=args.until_idle
        ).run()
    # Each process writes its metrics into a directory; the supervisor serves them on one port.
    with tempfile.TemporaryDirectory(prefix="luaq-metrics-") as directory:
        server = _server(args)
        if server is None:  # bound before forking: a busy port stops everything at once
            return EXIT_FAILURE
        snapshots = Snapshots(Path(directory))
        worker = assembly.build(
            loaded, sample_backlog=True, snapshots=snapshots, metrics_address=server.address
        )
        if messages and (code := uvloop.run(inputs.publish(worker, messages, show_ids=False))):
            server.stop()
            return code
        supervisor = Supervisor(
            args.processes,
            _child(worker, args, grace),
            grace,
            until_idle=args.until_idle,
            snapshots=snapshots,
        )
        return supervisor.run(server)


def _child(worker: Worker, args: argparse.Namespace, grace: float) -> Callable[[], int]:
    """What each worker process runs (after publishing --input, the supervisor's alone)."""

    def child() -> int:
        return uvloop.run(_run(worker, [], args.until_idle, grace))

    return child


if __name__ == "__main__":
    sys.exit(main())
