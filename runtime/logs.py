"""JSON-lines logging on stderr: one object per line, ready for any log pipeline.

A line is at most MAX_LINE bytes whatever a handler logs or fails with: past that, long strings
are cut to MAX_FIELD characters (saying how much was left out), and what still does not fit
goes into a cut `truncated` field.
"""

from __future__ import annotations

import json
import logging
import sys
from datetime import UTC, datetime
from typing import Any

MAX_LINE = 65536  # bytes, the newline excluded
MAX_FIELD = 4096  # characters of one string in a line that had to be cut
_HEAD = ("ts", "level", "logger", "msg")
_STANDARD = set(vars(logging.makeLogRecord({}))) | {"message", "asctime", "taskName"}


def _dumps(entry: dict[str, Any]) -> str:
    return json.dumps(entry, ensure_ascii=False, default=str)


def _fits(line: str) -> bool:
    # a character is at most 4 bytes in UTF-8: most lines need no encoding to be measured
    return len(line) <= MAX_LINE // 4 or len(line.encode()) <= MAX_LINE


def _cut(text: str) -> str:
    if len(text) <= MAX_FIELD:
        return text
    return f"{text[:MAX_FIELD]}... ({len(text) - MAX_FIELD} more characters)"


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
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in vars(record).items():
            if key not in _STANDARD and key not in entry:
                entry[key] = value
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


def configure(level: str) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
