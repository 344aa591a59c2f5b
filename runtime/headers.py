"""Header rules that hold on every driver, checked before a message goes to one.

A handler writes `priority = "high"` whatever the broker: the names and the range are luaq's,
and a driver maps the number to what its broker has (an AMQP property, say).
"""

from __future__ import annotations

from typing import Any

from .errors import ErrorKind, QueueError

PRIORITY_NAMES = {"low": 1, "normal": 5, "high": 9}


def priority(value: Any) -> int:
    """The number a `priority` header stands for; INVALID for anything but a name or 0-255."""
    if isinstance(value, str) and value.lower() in PRIORITY_NAMES:
        return PRIORITY_NAMES[value.lower()]
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = -1
    if isinstance(value, bool) or not 0 <= number <= 255:
        raise QueueError(
            ErrorKind.INVALID, f"priority must be high, normal, low or 0-255, not {value!r}"
        )
    return number
