"""The `luaq` command: check entries files, run their consumers.

This module parses the arguments and hands them to what assembly.py prepares for the command.
Exit codes: 0 ok, 1 runtime failure, 2 configuration error (nothing was started).
Every flag can also come from the environment as LUAQ_<FLAG> (the operator's way in).
"""

from __future__ import annotations

import argparse
import os
import signal
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from . import __version__, assembly, logs
from .errors import EXIT_CONFIG, EXIT_OK, ConfigError
from .settings import Settings


def _env(name: str, default: Any) -> Any:
    return os.environ.get(f"LUAQ_{name.upper()}", default)


def _at_least(least: float, kind: type[int] | type[float], most: float | None = None) -> Any:
    """An argparse type: a number of `kind` no smaller than `least` (nor larger than `most`).
    A limit of 0 or below is no limit nor a meaningful one: refused (exit 2) rather than taken
    to mean unlimited. A default from the environment (LUAQ_<FLAG>, a string) goes through it
    too."""

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(
                f"{text!r} is not {'an integer' if kind is int else 'a number'}"
            ) from None
        if not value >= least:  # (NaN too)
            raise argparse.ArgumentTypeError(f"must be at least {least:g}, got {text}")
        if most is not None and value > most:
            raise argparse.ArgumentTypeError(f"must be at most {most:g}, got {text}")
        return value

    return parse


# The commands; the first of them in the arguments says whether luaq runs as a service (`run`),
# whose every line on stderr is a log line, usage errors included.
COMMANDS = ("check", "run", "manifests", "dlq", "publish")


def _parser() -> argparse.ArgumentParser:
    parser = logs.Parser(
        prog="luaq",
        description="Run queue consumers written in Lua.",
        parents=[logs.options("LUAQ_")],
    )
    parser.add_argument("--version", action="version", version=f"luaq {__version__}")
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
        type=_at_least(0, float),
        default=str(_env("shutdown_timeout", Settings.shutdown_timeout)),
        metavar="SECONDS",
        help="grace period for running handlers on SIGTERM/SIGINT (default: %(default)s)",
    )
    run.add_argument(
        "--hard-timeout",
        type=_at_least(0.001, float),
        default=str(_env("hard_timeout", Settings.hard_timeout)),
        metavar="SECONDS",
        help="on broker drivers, a handler running this long in Lua without returning (a C call "
        "that never does) has its worker process killed and replaced; a message doing it twice "
        "is dead-lettered with reason killed (default: %(default)s)",
    )
    run.add_argument(
        "--processes",
        type=_at_least(1, int),
        default=str(_env("processes", 1)),
        metavar="N",
        help="worker processes, each running every consumer (broker drivers only; "
        "default: %(default)s)",
    )
    run.add_argument(
        "--max-instructions",
        type=_at_least(1, int),
        default=str(_env("max_instructions", Settings.max_instructions)),
        metavar="N",
        help="Lua instructions one invocation may run before it is stopped (default: %(default)s)",
    )
    run.add_argument(
        "--metrics-port",
        type=_at_least(0, int, 65535),
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
        type=_at_least(1, int, 2**40),  # (a MiB count Lua's allocator can still add up)
        default=str(_env("lua_max_memory", Settings.lua_max_memory // 2**20)),
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


# The columns of each worker process's summary, by ConsumerStats' names: part of the command's
# output, which scripts read.
SUMMARY = (
    "processed", "acked", "failed", "retried", "requeued", "dead_lettered", "rejected", "stale",
)  # fmt: skip


def main(argv: Sequence[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    named = next((arg for arg in argv if arg in COMMANDS), None)
    logs.configure_from(argv, "LUAQ_", service=named == "run")
    args = _parser().parse_args(argv)
    try:
        command = _prepare(args)
    except ConfigError as exc:
        for problem in exc.problems:
            logs.report(problem, prefix="")
        logs.report(f"{len(exc.problems)} problem(s), nothing was started")
        return EXIT_CONFIG
    except KeyboardInterrupt:  # (loading the Lua, say)
        logs.report("interrupted, nothing was started")
        return 128 + signal.SIGINT
    try:
        return command()
    except KeyboardInterrupt:
        if args.command == "run":  # a stop asked before the worker's own handlers: it took nothing
            return EXIT_OK
        logs.report("interrupted")  # a publish, a replay cut short: no script may take it as done
        return 128 + signal.SIGINT


def _prepare(args: argparse.Namespace) -> assembly.Command:
    """The command `args` ask for, with what it needs loaded and checked (check and manifests
    load the Lua in a child, bounded; the others load it here, to run it)."""
    if args.command == "check":
        return assembly.prepare_check(args.paths, Settings())
    if args.command == "manifests":
        return assembly.prepare_manifests(
            args.paths, Settings(), args.namespace, args.broker_secret
        )
    if args.command == "publish":
        return assembly.prepare_publish(
            args.entries, Settings(), args.queue_id, args.data, args.header
        )
    if args.command == "dlq":
        return assembly.prepare_dlq(args.entries, Settings(), args.action, args.queue_id, args.yes)
    settings = Settings(
        max_instructions=args.max_instructions,
        lua_max_memory=args.lua_max_memory * 2**20,
        shutdown_timeout=args.shutdown_timeout,
        hard_timeout=args.hard_timeout,
    )
    return assembly.prepare_run(
        args.paths,
        settings,
        input_file=args.input,
        processes=args.processes,
        until_idle=args.until_idle,
        metrics=None if args.metrics_port is None else (args.metrics_address, args.metrics_port),
        summary=SUMMARY,
    )


if __name__ == "__main__":
    sys.exit(main())
