"""Log lines on stderr: JSON for a log collector, or text for a person at a terminal. Both
carry the same fields: time, level, logger, message, and whatever the call site added.

One event is one line, and what a handler logs reaches a terminal as text to read: line breaks
and terminal controls in it are escaped, in both formats (JSON escapes only some of them).

A line is at most MAX_LINE bytes whatever a handler logs or fails with: past that, long strings
are cut to MAX_FIELD characters (saying how much was left out), and what still does not fit
is cut as a whole (a JSON line keeps its head and puts the rest in a cut `truncated` field).
And a line that may repeat without end (a message failing forever) goes out within a LogBudget.
A service (`luaq run`, the operator) writes nothing on stderr but such lines: see `configure`.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import json
import logging
import math
import os
import re
import sys
import threading
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Literal, NoReturn

MAX_LINE = 65536  # bytes, the newline excluded
MAX_FIELD = 4096  # characters of one string in a line that had to be cut
_HEAD = ("ts", "level", "logger", "msg")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}
Format = Literal["json", "text", "auto"]
# What a terminal acts on or shows as a line break: C0 and C1 controls (ESC, and CSI as one
# character), DEL, the Unicode line and paragraph separators, and the bidirectional overrides and
# isolates that reorder what is shown.
_UNPRINTABLE = re.compile("[\x00-\x1f\x7f-\x9f\u2028\u2029\u202a-\u202e\u2066-\u2069]")
_ESCAPES = {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _fields(record: logging.LogRecord) -> dict[str, Any]:
    return {key: value for key, value in vars(record).items() if key not in _STANDARD}


def _time(record: logging.LogRecord) -> str:
    return datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")


def _dumps(entry: Any) -> str:
    try:
        text = json.dumps(entry, ensure_ascii=False, default=str, allow_nan=False)
    except ValueError:  # NaN or an infinity (a handler's 0/0): no JSON number, so text
        text = json.dumps(_finite(entry), ensure_ascii=False, default=str)
    return _UNPRINTABLE.sub(_json_escape, text)


def _finite(value: Any) -> Any:
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    if isinstance(value, dict):
        return {key: _finite(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_finite(item) for item in value]
    return value


def _json_escape(match: re.Match[str]) -> str:
    return f"\\u{ord(match.group()):04x}"  # (JSON escapes the C0 controls itself)


def _printable(text: str) -> str:
    return _UNPRINTABLE.sub(_text_escape, text)


def _text_escape(match: re.Match[str]) -> str:
    char = match.group()
    code = ord(char)
    return _ESCAPES.get(char) or (f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}")


def _fits(line: str) -> bool:
    # a character is at most 4 bytes in UTF-8: most lines need no encoding to be measured
    return len(line) <= MAX_LINE // 4 or len(line.encode()) <= MAX_LINE


def _cut(text: str, limit: int = MAX_FIELD) -> str:
    if len(text) <= limit:
        return text
    return f"{text[:limit]}... ({len(text) - limit} more characters)"


def _shortened(value: Any) -> Any:
    if isinstance(value, str):
        return _cut(value)
    if isinstance(value, dict):
        return {_cut(str(key)): _shortened(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return [_shortened(item) for item in value]
    return value


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": _time(record),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in _fields(record).items():
            entry.setdefault(key, value)
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        line = _dumps(entry)
        if _fits(line):
            return line
        entry = _shortened(entry)
        line = _dumps(entry)
        if _fits(line):
            return line
        head = {key: entry[key] for key in _HEAD}
        head["truncated"] = _cut(_dumps({k: v for k, v in entry.items() if k not in _HEAD}))
        return _dumps(head)


class TextFormatter(logging.Formatter):
    """`12:04:05.123 WARNING luaq.consumer: handler failed  consumer=app:worker attempt=2`"""

    def format(self, record: logging.LogRecord) -> str:
        message, fields = record.getMessage(), _fields(record)
        line = self._line(record, message, fields)
        if _fits(line):
            return line
        line = self._line(record, _cut(message), _shortened(fields))
        return line if _fits(line) else _cut(line, MAX_LINE // 4)

    def _line(self, record: logging.LogRecord, message: str, fields: dict[str, Any]) -> str:
        text = " ".join(f"{key}={_text(value)}" for key, value in fields.items())
        line = f"{_time(record)[11:23]} {record.levelname:<7} {record.name}: {message}"
        if text:
            line = f"{line}  {text}"
        line = _printable(line)
        if record.exc_info:  # a traceback's lines are its own, and luaq's
            line = f"{line}\n{self.formatException(record.exc_info)}"
        return line


def _text(value: Any) -> str:
    if isinstance(value, str) and value and " " not in value and "=" not in value:
        return value
    return _dumps(value)


class StderrHandler(logging.StreamHandler[Any]):
    """Writes to sys.stderr as it is at each line, as logging's own last-resort handler does:
    where something swaps sys.stderr (a test's capture, an application embedding luaq), a
    handler bound to the old stream would write to a closed file."""

    def __init__(self, service: bool = False) -> None:
        logging.Handler.__init__(self)
        self.service = service
        self.shared_lock: int | None = None  # see share_lines

    @property
    def stream(self) -> Any:
        return sys.stderr

    def emit(self, record: logging.LogRecord) -> None:
        lock = self.shared_lock
        if lock is None:
            super().emit(record)
            return
        locked = _lock(lock)
        try:
            super().emit(record)
        finally:
            if locked:
                fcntl.lockf(lock, fcntl.LOCK_UN)

    def handleError(self, record: logging.LogRecord) -> None:
        """A line that cannot be made or written (bad arguments, Python out of memory) becomes
        a short line in the same format, not logging's plain traceback amid JSON lines."""
        failure = sys.exc_info()[1]
        with contextlib.suppress(Exception):
            stand_in = logging.LogRecord(
                "luaq", logging.ERROR, __file__, 0, "a line of %s could not be written: %.200r",
                (record.name, failure), None,
            )  # fmt: skip
            self.stream.write(self.format(stand_in) + self.terminator)
            self.flush()


def share_lines() -> None:
    """Before forking processes that log to one stderr. A container's is a pipe, which keeps a
    write whole only up to 4 KiB: longer lines of two processes cut into each other's. From now
    on each line is written holding a POSIX lock (one per process; the kernel drops a dead
    process's) on an anonymous file all of them share: no directory is needed for it, the root
    filesystem may be read-only. (Linux's memfd; elsewhere lines go unlocked.)"""
    if not hasattr(os, "memfd_create"):
        return
    for handler in logging.getLogger().handlers:
        if isinstance(handler, StderrHandler) and handler.shared_lock is None:
            handler.shared_lock = os.memfd_create("luaq-log-lines", os.MFD_CLOEXEC)


def _lock(fd: int) -> bool:
    """Whether the line's lock was had within LOCK_WAIT seconds: a process stopped (SIGSTOP)
    while it held it must not stop every other one's logging with it."""
    deadline = time.monotonic() + LOCK_WAIT
    while True:
        try:
            fcntl.lockf(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except OSError:
            if time.monotonic() > deadline:
                return False
            time.sleep(0.001)


LOCK_WAIT = 1.0
_command = logging.getLogger("luaq")
LEVELS = ("debug", "info", "warning", "error")
FORMATS = ("auto", "text", "json")


def options(environ_prefix: str) -> argparse.ArgumentParser:
    """--log-level and --log-format, as a parent parser, their defaults from the environment
    (<prefix>LOG_LEVEL, <prefix>LOG_FORMAT) checked as the flags are."""
    parser = argparse.ArgumentParser(add_help=False)
    for name, choices, default, help in (
        ("level", LEVELS, "info", "minimum level of the log lines on stderr"),
        ("format", FORMATS, "auto", "text for a person, json for a log collector; auto: text on "
         "a terminal, else json"),
    ):  # fmt: skip
        parser.add_argument(
            f"--log-{name}",
            default=os.environ.get(f"{environ_prefix}LOG_{name.upper()}", default),
            type=_one_of(choices),
            metavar="{" + ",".join(choices) + "}",
            help=f"{help} (default: {default})",
        )
    return parser


def _one_of(choices: tuple[str, ...]) -> Callable[[str], str]:
    def parse(text: str) -> str:
        if text not in choices:
            raise argparse.ArgumentTypeError(
                f"invalid choice: {text!r} (choose from {', '.join(choices)})"
            )
        return text

    return parse


def configure_from(argv: Sequence[str], environ_prefix: str, *, service: bool) -> None:
    """`configure` as argv's and the environment's logging options say, read before the rest
    of argv: a usage error is then said in the log format (see Parser). Options that cannot be
    read are taken as their defaults; the parser says what is wrong with them."""
    parser = options(environ_prefix)
    parser.exit_on_error = False
    try:
        known, _ = parser.parse_known_args(argv)
        level, format = known.log_level, known.log_format
    except argparse.ArgumentError:
        level, format = "info", "auto"
    configure(level, format, service=service)


class Parser(argparse.ArgumentParser):
    """A service's usage error is said as its other reports are: in JSON mode, a pod whose
    flags are wrong says so in a line its log pipeline keeps. A one-shot command's is
    argparse's own: the usage, then the error, for a person."""

    def error(self, message: str) -> NoReturn:
        if not reports_logged():
            super().error(message)
        report(f"{self.prog}: {message}")
        self.exit(2)  # (a configuration error: nothing was started)


def configure(level: str, format: Format = "auto", *, service: bool = False) -> None:
    """Log lines at `level` and up on stderr, in `format`. A `service` (`luaq run`, the
    operator) writes nothing else there: its reports (see `report`), uncaught exceptions in any
    thread and Python's warnings are log lines too, so that a JSON log pipeline keeps even the
    line that says why a pod is crash-looping."""
    if format == "auto":
        format = "text" if sys.stderr.isatty() else "json"
    handler = StderrHandler(service)
    handler.setFormatter(TextFormatter() if format == "text" else JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    if service:
        sys.excepthook = _uncaught
        threading.excepthook = _uncaught_in_thread
        logging.captureWarnings(True)


def report(text: str, *, prefix: str = "luaq: ") -> None:
    """Why a command stopped or will not start. A one-shot command (check, publish, dlq) says it
    in plain text, `prefix` first, to the person or script that ran it; a service logs it as an
    error of logger `luaq`, in the format of its other lines."""
    if reports_logged():
        _command.error(text)
    else:
        print(f"{prefix}{text}", file=sys.stderr)


def reports_logged() -> bool:
    """Whether `report` logs (a service) or prints."""
    return any(isinstance(h, StderrHandler) and h.service for h in logging.getLogger().handlers)


def _uncaught(
    kind: type[BaseException], value: BaseException, traceback: TracebackType | None
) -> None:
    if issubclass(kind, KeyboardInterrupt):
        sys.__excepthook__(kind, value, traceback)
    else:
        _command.critical("uncaught exception", exc_info=(kind, value, traceback))


def _uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_value is not None and not issubclass(args.exc_type, SystemExit):
        thread = args.thread.name if args.thread is not None else "?"
        _command.critical(
            f"uncaught exception in thread {thread}",
            exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
        )


class LogBudget:
    """At most `burst` lines per `interval` seconds of one kind (a consumer's per-message lines:
    as many failures as messages would make log volume the failure rate). What is held back is
    counted, and the count goes out with the next line as `suppressed`, or with `flush`."""

    def __init__(self, burst: int = 10, interval: float = 10.0) -> None:
        self.burst = burst
        self.interval = interval
        self._window = -interval
        self._spent = 0
        self._suppressed = 0

    def take(self) -> int | None:
        """None: hold this line back. Otherwise: how many were held back before it."""
        now = time.monotonic()
        if now - self._window >= self.interval:
            self._window, self._spent = now, 0
        if self._spent >= self.burst:
            self._suppressed += 1
            return None
        self._spent += 1
        suppressed, self._suppressed = self._suppressed, 0
        return suppressed

    def log(
        self,
        logger: logging.Logger,
        level: int,
        msg: str,
        extra: dict[str, Any],
        exc_info: bool = False,
    ) -> None:
        suppressed = self.take()
        if suppressed is None:
            return
        if suppressed:
            extra = {**extra, "suppressed": suppressed}
        logger.log(level, msg, extra=extra, exc_info=exc_info)

    def flush(self, logger: logging.Logger, extra: dict[str, Any]) -> None:
        """Say how many lines were held back since the last one (at shutdown: none follows)."""
        if self._suppressed:
            suppressed, self._suppressed = self._suppressed, 0
            logger.warning(
                "lines held back by the log budget", extra={**extra, "suppressed": suppressed}
            )
