"""The error model shared by drivers, the Lua bridge and the CLI.

Lua handlers see these as `errors` objects (`err:kind()`, `err:retryable()`); Python code raises
`QueueError` so a driver failure keeps its kind on the way back into Lua. A command of `luaq`
ends with EXIT_OK, EXIT_FAILURE (a failure at run time, said by `failed`) or EXIT_CONFIG (a
configuration that cannot run: nothing was started).
"""

from __future__ import annotations

from enum import StrEnum

from .logs import report

EXIT_OK, EXIT_FAILURE, EXIT_CONFIG = 0, 1, 2


class ErrorKind(StrEnum):
    """What went wrong, as Lua handlers see it (`err:kind()`, the `errors` constants)."""

    INVALID = "INVALID"
    NOT_FOUND = "NOT_FOUND"
    ALREADY_EXISTS = "ALREADY_EXISTS"
    PERMISSION_DENIED = "PERMISSION_DENIED"
    UNAVAILABLE = "UNAVAILABLE"
    INTERNAL = "INTERNAL"
    CANCELED = "CANCELED"
    CONFLICT = "CONFLICT"
    TIMEOUT = "TIMEOUT"
    RATE_LIMITED = "RATE_LIMITED"
    UNKNOWN = "UNKNOWN"


class QueueError(Exception):
    """A failure with a kind and a retry hint, as the Lua `errors` module models it."""

    def __init__(self, kind: ErrorKind, message: str, *, retryable: bool = False) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message
        self.retryable = retryable


def failed(exc: QueueError) -> int:
    """Say on stderr what stopped a command; its exit code."""
    report(f"{exc.kind}: {exc.message}")
    return EXIT_FAILURE


class MaybePublished(QueueError):
    """A publish that failed after the message was sent: the broker never said whether it took
    it, so it may have been published (and may still arrive). A caller that publishes it again
    may make a duplicate (at-least-once); one that reports it must not say "nothing"."""


class ConfigError(Exception):
    """Configuration that cannot run; carries every problem found, one per line."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems
