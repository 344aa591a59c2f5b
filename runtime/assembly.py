"""The composition root: the only module that knows every part of a worker process, and of each
command of `luaq` (the CLI parses the arguments and runs what a `prepare_*` returns).

`load` loads every Lua function of validated entries into one Lua state, without building
anything that runs: it is what `luaq check` does (in a child process, check.py) and what the
operator's check does through it. `build` turns what was loaded into a Worker: it builds the
drivers, the access policies, the dead-letter sinks, the consumers, the handlers' host and the
process's telemetry, and hands the Worker its parts in start order. `prepare_*` load and check
what a command needs (a ConfigError before anything starts) and return what runs it.
"""

from __future__ import annotations

import functools
import sys
import tempfile
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import uvloop

from . import check, dlq, entries, inputs, logs, process
from .codecs import decoder
from .consumer import Consumer, Pace, Pool
from .drivers import Drivers
from .entries import Config
from .errors import EXIT_CONFIG, EXIT_FAILURE, EXIT_OK, ConfigError
from .flight import FlightLog
from .host import Host
from .inputs import InputMessage
from .lua import LuaHandler, LuaLoadError, LuaRuntime
from .metrics import Server, Snapshots
from .security import access_for
from .settings import Settings
from .supervisor import Supervisor
from .telemetry import Lifecycle, Telemetry
from .worker import Worker


@dataclass(frozen=True)
class Loaded:
    """Validated entries, and their Lua functions loaded in the process's Lua state."""

    config: Config
    lua: LuaRuntime
    handlers: dict[str, LuaHandler]  # by function id


def load(config: Config, settings: Settings) -> Loaded:
    """Load every Lua function of `config` (entries.load's); ConfigError with every problem,
    the entries' own among them."""
    lua = LuaRuntime(settings)
    problems = list(config.problems)
    handlers: dict[str, LuaHandler] = {}
    for function in config.functions.values():
        try:
            with lua.user_metrics.acting_for(function.id):
                handlers[function.id] = lua.load(
                    function.id,
                    function.source_text,
                    function.method,
                    function.modules,
                    function.source_name,
                )
        except LuaLoadError as exc:
            owner = function.id.removesuffix("#handler")
            problems.append(f"{function.file}: {owner}: source: {exc}")
    if problems:
        raise ConfigError(problems)
    return Loaded(config, lua, handlers)


def build(
    loaded: Loaded,
    *,
    sample_backlog: bool = False,
    snapshots: Snapshots | None = None,
    metrics_address: str | None = None,
    watch: FlightLog | None = None,
) -> Worker:
    """The worker process for what was loaded. With metrics served: `sample_backlog` (the queues'
    depth, now and then), `snapshots` (a pod's worker process reports through them) and
    `metrics_address` (where they are served, for the start-up line); `watch`: where a
    supervised worker process reports its handlers' runs to its supervisor."""
    config, lua = loaded.config, loaded.lua
    lua.reseed()  # (in the process that runs it)
    drivers = Drivers(config)
    pace = Pace()  # one for every consumer of the process
    consumers = []
    for entry in config.consumers.values():
        queue = config.queues[entry.queue]
        consumers.append(
            Consumer(
                entry,
                queue,
                drivers[queue.driver],
                lua.user_metrics.scoped(
                    entry.function_id, lua.invoker(loaded.handlers[entry.function_id], entry.id)
                ),
                decoder(queue.codec),
                dlq.sink(queue, config.queues, drivers),
                config.drivers[queue.driver].max_message_size,
                pace,
                watch,
            )
        )
    pool = Pool(consumers)
    lifecycle = Lifecycle()
    host = Host(
        config,
        drivers,
        {entry.id: access_for(entry, config) for entry in config.consumers.values()},
        {consumer.entry.id: consumer.stats.denials for consumer in consumers},
        {consumer.entry.id: consumer.log_budget.log for consumer in consumers},
        lifecycle.alive,
    )
    lua.serve(host, watch)
    telemetry = Telemetry(
        config,
        drivers,
        lifecycle,
        lua.user_metrics,
        reports=(pool.families, host.families),
        checks=(pool.unready,),
        sample_backlog=sample_backlog,
        snapshots=snapshots,
        address=metrics_address,
    )
    return Worker(
        config,
        [telemetry, drivers, pool],
        drivers=drivers,
        pool=pool,
        host=host,
        telemetry=telemetry,
    )


Command = Callable[[], int]  # what a command runs once what it needs is loaded: its exit code


def prepare_check(paths: Sequence[Path], settings: Settings) -> Command:
    """`luaq check`: the entries checked, their Lua loaded in a child process (check.py)."""
    config = check.check(paths, settings)

    def report() -> int:
        print(check.report(config))
        return EXIT_OK

    return report


def prepare_manifests(
    paths: Sequence[Path], settings: Settings, namespace: str | None, broker_secret: str
) -> Command:
    """`luaq manifests`: the checked project as the operator's resources."""
    from luaq.operator.manifests import manifests  # pydantic models only, no cluster client

    result = manifests(check.check(paths, settings), namespace, broker_secret)

    def write() -> int:
        for note in result.notes:
            print(f"note: {note}", file=sys.stderr)
        sys.stdout.write(result.yaml())
        return EXIT_OK

    return write


def prepare_publish(
    paths: Sequence[Path], settings: Settings, queue_id: str, data: str, headers: Sequence[str]
) -> Command:
    """`luaq publish`: one message (inputs.message) through the queue's driver."""
    loaded = load(entries.load(paths), settings)
    message = inputs.message(loaded.config, queue_id, data, headers)
    return lambda: uvloop.run(inputs.publish(build(loaded), [message], show_ids=True))


def prepare_dlq(
    paths: Sequence[Path], settings: Settings, action: str, queue_id: str, yes: bool
) -> Command:
    """`luaq dlq`: list, replay or purge a dead-letter queue (dlq.command)."""
    loaded = load(entries.load(paths), settings)
    return lambda: uvloop.run(dlq.command(build(loaded), action, queue_id, yes))


def prepare_run(
    paths: Sequence[Path],
    settings: Settings,
    *,
    input_file: Path | None,
    processes: int,
    until_idle: bool,
    metrics: tuple[str, int] | None,
    summary: Sequence[str],
) -> Command:
    """`luaq run`: `input_file` (--input) read and checked here, published once started;
    `metrics`: the address and port the metrics are served on; `summary`: the columns of each
    process's summary."""
    loaded = load(entries.load(paths), settings)
    messages = inputs.read(input_file, loaded.config) if input_file else []
    return functools.partial(
        _run,
        loaded,
        messages,
        processes=processes,
        until_idle=until_idle,
        grace=settings.shutdown_timeout,
        hard_timeout=settings.hard_timeout,
        metrics=metrics,
        summary=summary,
    )


def _run(
    loaded: Loaded,
    messages: Sequence[InputMessage],
    *,
    processes: int,
    until_idle: bool,
    grace: float,
    hard_timeout: float,
    metrics: tuple[str, int] | None,
    summary: Sequence[str],
) -> int:
    """On broker drivers, `processes` worker processes under a supervisor (one by default: the
    supervisor is what stops a handler stuck where the process's own limits cannot reach); on
    an in-memory driver, whose queues live in the process, this process alone. `messages` are
    published first, once. Its exit code."""
    memory = [d.id for d in loaded.config.drivers.values() if d.kind == "queue.driver.memory"]
    if memory and processes > 1:
        logs.report(
            f"--processes: driver {memory[0]} is in-memory and cannot be shared between "
            "processes; use a broker driver or --processes 1"
        )
        return EXIT_CONFIG
    server = None
    if metrics is not None:
        server = _server(*metrics)  # bound before forking: a busy port stops everything at once
        if server is None:
            return EXIT_FAILURE
    try:
        if memory:
            worker = build(
                loaded,
                sample_backlog=server is not None,
                metrics_address=server.address if server is not None else None,
            )
            if server is not None:
                server.start(worker.telemetry.source())
            return process.run(
                worker, messages, until_idle=until_idle, grace=grace, summary=summary
            )
        if messages and (
            code := uvloop.run(inputs.publish(build(loaded), messages, show_ids=False))
        ):
            return code
        with tempfile.TemporaryDirectory(prefix="luaq-metrics-") as directory:
            # each process writes its metrics into the directory; the supervisor serves them
            snapshots = Snapshots(Path(directory)) if server is not None else None
            make = functools.partial(
                build,
                loaded,
                sample_backlog=server is not None,
                snapshots=snapshots,
                metrics_address=server.address if server is not None else None,
            )
            supervisor = Supervisor(
                processes,
                _child(make, until_idle, grace, summary),
                grace,
                hard_timeout=hard_timeout,
                until_idle=until_idle,
                snapshots=snapshots,
            )
            return supervisor.run(server)
    finally:
        if server is not None:
            server.stop()


def _child(
    make: Callable[..., Worker], until_idle: bool, grace: float, summary: Sequence[str]
) -> Callable[[FlightLog], int]:
    """What each worker process runs: its worker, built in the process (after the supervisor
    published --input alone), reporting its handlers' runs into `watch`."""

    def child(watch: FlightLog) -> int:
        worker = make(watch=watch)
        return process.run(
            worker, [], until_idle=until_idle, grace=grace, summary=summary, watch=watch
        )

    return child


def _server(address: str, port: int) -> Server | None:
    """The metrics server, its port bound; None when the port cannot be had (said on stderr)."""
    try:
        return Server(address, port)
    except OSError as exc:
        logs.report(f"--metrics-port {port}: {exc.strerror or exc}")
        return None
