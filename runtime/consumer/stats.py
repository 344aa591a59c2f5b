"""What a consumer counts: its deliveries, invocations and settlements, which the pool's metric
families and the run's summary read."""

from __future__ import annotations

from dataclasses import dataclass, field

from ..drivers import Settlement
from ..metrics import DURATION_BUCKETS, SIZE_BUCKETS, Histogram


@dataclass
class ConsumerStats:
    received: int = 0  # deliveries taken from the driver
    processed: int = 0  # handler invocations that finished, whatever their outcome
    failed: int = 0  # invocations that ended in an error
    # Deliveries by how they were settled: retried after a backoff (`false`, errors), requeued
    # at once (not started, or cut short, at shutdown), rejected (out of attempts or
    # undecodable, with no dead-letter queue), stale (their channel closed before they were
    # settled: redelivered there).
    settled: dict[Settlement, int] = field(default_factory=lambda: dict.fromkeys(Settlement, 0))
    unsettled: int = 0  # left unsettled by an error in luaq: redelivered once their channel closes
    first_at: float | None = None
    last_at: float | None = None
    errors: dict[str, int] = field(default_factory=dict)  # failed invocations by error kind
    denials: dict[str, int] = field(default_factory=dict)  # refused publishes, by action
    durations: Histogram = field(default_factory=lambda: Histogram(DURATION_BUCKETS))
    sizes: Histogram = field(default_factory=lambda: Histogram(SIZE_BUCKETS))

    def count(self, settlement: Settlement, reached: bool = True) -> None:
        """One delivery settled so; stale when the settlement did not reach the broker."""
        self.settled[settlement if reached else Settlement.STALE] += 1

    # the settlements by the names of the summary's columns (cli.SUMMARY)
    @property
    def acked(self) -> int:
        return self.settled[Settlement.ACK]

    @property
    def retried(self) -> int:
        return self.settled[Settlement.RETRY]

    @property
    def requeued(self) -> int:
        return self.settled[Settlement.REQUEUE]

    @property
    def dead_lettered(self) -> int:
        return self.settled[Settlement.DEAD_LETTER]

    @property
    def rejected(self) -> int:
        return self.settled[Settlement.REJECT]

    @property
    def stale(self) -> int:
        return self.settled[Settlement.STALE]

    @property
    def denied(self) -> int:
        return sum(self.denials.values())

    @property
    def rate(self) -> float:
        """Messages per second while the consumer was busy."""
        if self.first_at is None or self.last_at is None or self.last_at <= self.first_at:
            return 0.0
        return self.processed / (self.last_at - self.first_at)
