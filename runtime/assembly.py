"""The composition root: the only module that knows every part of a worker process.

`load` loads every Lua function of validated entries into one Lua state, without building
anything that runs: it is what `luaq check` does (in a child process, check.py) and what the
operator's check does through it. `build` turns what was loaded into a Worker: it builds the
drivers, the access policies, the dead-letter sinks, the consumers, the handlers' host and the
process's telemetry, and hands the Worker its parts in start order.
"""

from __future__ import annotations

from dataclasses import dataclass

from . import dlq
from .codecs import decoder
from .consumer import Consumer, Pace, Pool
from .drivers import Drivers
from .entries import Config
from .errors import ConfigError
from .host import Host
from .lua import LuaHandler, LuaLoadError, LuaRuntime
from .metrics import Snapshots
from .security import access_for
from .settings import Settings
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
) -> Worker:
    """The worker process for what was loaded. With metrics served: `sample_backlog` (the queues'
    depth, now and then), `snapshots` (a pod's worker process reports through them) and
    `metrics_address` (where they are served, for the start-up line)."""
    config, lua = loaded.config, loaded.lua
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
                lua.invoker(loaded.handlers[entry.function_id], entry.id),
                decoder(queue.codec),
                dlq.sink(queue, config.queues, drivers),
                config.drivers[queue.driver].max_message_size,
                pace,
            )
        )
    pool = Pool(consumers)
    lifecycle = Lifecycle()
    host = Host(
        config,
        drivers,
        {entry.id: access_for(entry, config) for entry in config.consumers.values()},
        {consumer.entry.id: consumer.stats.denials for consumer in consumers},
        lifecycle.alive,
    )
    lua.serve(host)
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
