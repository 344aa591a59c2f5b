"""What `luaq check` does, as one function: the CLI and the Kubernetes operator both call it, so
a QueueConsumer is accepted by the operator exactly when its files pass `luaq check`."""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from pathlib import Path

from . import entries
from .settings import Settings
from .worker import Worker


def check(
    paths: Iterable[Path | str],
    settings: Settings,
    environ: Mapping[str, str] | None = None,
) -> Worker:
    """Validate the entries files and load every Lua function into a worker that is not started.

    Raises ConfigError with every problem found. `environ` stands for the process environment
    when `${env:NAME}` is expanded (the operator passes the pod's)."""
    return Worker(entries.load(paths, environ), settings)
