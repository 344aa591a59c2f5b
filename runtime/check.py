"""What `luaq check` does, as one function: the CLI and the Kubernetes operator both call it, so
a QueueConsumer is accepted by the operator exactly when its files pass `luaq check`.

Loading a Lua function runs its module's top level, which is the handler author's code: it may
spin, allocate without end or crash the interpreter. So the entries are validated here, and the
Lua is loaded in a child process with a wall-clock limit and a cap on how far its memory may
grow: whatever the module does, the check fails with a problem that says so, and the caller (a
long-running operator among them) is untouched.
"""

from __future__ import annotations

import multiprocessing
import resource
import threading
from collections.abc import Iterable, Mapping
from multiprocessing.connection import Connection
from pathlib import Path

from . import entries
from .entries import Config
from .errors import ConfigError
from .settings import Settings

# How long loading every Lua function may take; how far past its Lua memory limit the child's
# address space may grow (the interpreter's own allocations while it loads).
CHECK_TIMEOUT = 20.0
CHECK_MARGIN = 256 * 2**20


def check(
    paths: Iterable[Path | str],
    settings: Settings,
    environ: Mapping[str, str] | None = None,
    timeout: float = CHECK_TIMEOUT,
) -> Config:
    """Validate the entries files, then load every Lua function in a child process.

    Raises ConfigError with every problem found. `environ` stands for the process environment
    when `${env:NAME}` is expanded (the operator passes the pod's)."""
    paths = list(paths)
    config = entries.load(paths, environ)
    try:  # the child reports every problem, the entries' own among them (it loads them too)
        problems = _in_child(paths, settings, environ, timeout)
    except _NoAnswer as exc:
        problems = [*config.problems, str(exc)]
    if problems:
        raise ConfigError(problems)
    return config


def report(config: Config) -> str:
    """What `luaq check` says of entries that passed: what they declare, and each consumer's
    queue and function."""
    lines = [
        f"ok: {len(config.files)} file(s), {len(config.drivers)} driver(s), "
        f"{len(config.queues)} queue(s), {len(config.functions)} function(s), "
        f"{len(config.consumers)} consumer(s)"
    ]
    for consumer in config.consumers.values():
        function = consumer.function_id.removesuffix("#handler")
        lines.append(
            f"  {consumer.id}: {consumer.queue} -> {function}"
            f" (concurrency {consumer.concurrency}, prefetch {consumer.prefetch})"
        )
    return "\n".join(lines)


def _in_child(
    paths: list[Path | str],
    settings: Settings,
    environ: Mapping[str, str] | None,
    timeout: float,
) -> list[str]:
    # fork is cheapest but unsafe in a process with threads (the operator): there, children
    # come from a fork server that has already imported the runtime.
    method = "fork" if threading.active_count() == 1 else "forkserver"
    context = multiprocessing.get_context(method)
    if method == "forkserver":
        context.set_forkserver_preload([__name__])
    receive, send = context.Pipe(duplex=False)
    child = context.Process(  # type: ignore[attr-defined]
        target=_load_lua,
        args=(paths, settings, None if environ is None else dict(environ), send),
        name="luaq-check",
        daemon=True,
    )
    child.start()
    send.close()
    try:
        if not receive.poll(timeout):
            raise _NoAnswer(f"loading the Lua source took longer than {timeout:g}s")
        try:
            problems: list[str] = receive.recv()
            return problems
        except EOFError:  # it died before it could say
            raise _NoAnswer("loading the Lua source killed the process that checked it") from None
    finally:
        receive.close()
        child.kill()
        child.join()


class _NoAnswer(Exception):
    pass


def _load_lua(
    paths: list[Path | str],
    settings: Settings,
    environ: dict[str, str] | None,
    send: Connection,
) -> None:
    """In the child: cap the address space, load every function as a worker would."""
    from .assembly import load  # the Lua runtime, only in the child

    grown = _address_space() + settings.lua_max_memory + CHECK_MARGIN
    resource.setrlimit(resource.RLIMIT_AS, (grown, grown))
    try:
        load(entries.load(paths, environ), settings)
        problems: list[str] = []
    except ConfigError as exc:
        problems = exc.problems
    except MemoryError:
        problems = ["loading the Lua source ran out of memory"]
    send.send(problems)
    send.close()


def _address_space() -> int:
    """This process's virtual memory size, in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError("no VmSize in /proc/self/status")
