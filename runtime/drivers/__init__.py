"""The drivers: the interface the runtime codes against (base), and one driver per entry kind.

`create` is the one place that knows which class runs a driver entry: the worker and the
operator's backlog reader both build drivers through it.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from ..entries import DriverEntry
from .amqp import AmqpDriver
from .base import (
    CLOSE_TIMEOUT,
    Delivery,
    Driver,
    MessageIds,
    OnDelivery,
    QueueInfo,
    Settlement,
    Subscription,
)
from .memory import MemoryDriver

__all__ = [
    "CLOSE_TIMEOUT",
    "DRIVERS",
    "Delivery",
    "Driver",
    "MessageIds",
    "OnDelivery",
    "QueueInfo",
    "Settlement",
    "Subscription",
    "create",
]

# The class that runs each driver entry kind, given the entry.
DRIVERS: dict[str, Callable[[Any], Driver]] = {
    "queue.driver.memory": MemoryDriver,
    "queue.driver.amqp": AmqpDriver,
}


def create(entry: DriverEntry) -> Driver:
    """The driver of a (validated) driver entry, not yet started."""
    return DRIVERS[entry.kind](entry)
