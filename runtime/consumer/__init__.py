"""The consumers: `loop` takes deliveries, runs handlers and settles messages (one Consumer per
queue.consumer entry, and the time slices they share), `stats` is what each counts, and `pool`
runs a process's consumers as one part of its worker."""

from .loop import Consumer, DeadLetterSink, Pace
from .pool import Pool
from .stats import ConsumerStats

__all__ = ["Consumer", "ConsumerStats", "DeadLetterSink", "Pace", "Pool"]
