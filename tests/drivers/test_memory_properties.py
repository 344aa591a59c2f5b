"""Property: for any sequence of publish, ack, nack, consumer crash and restart on the
memory driver, no message is lost and none is delivered again after its ack."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

from hypothesis import settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, precondition, rule
from luaq.runtime.drivers import Delivery, Subscription
from luaq.runtime.drivers.memory import MemoryDriver
from luaq.runtime.entries import ConsumerEntry, MemoryDriverEntry, QueueEntry

CONTEXT = {"namespace": "app", "base_dir": Path(".")}
FILE = Path("app.yaml")


class MemoryDriverMachine(RuleBasedStateMachine):
    def __init__(self) -> None:
        super().__init__()
        self.loop = asyncio.new_event_loop()
        self.driver = MemoryDriver(
            MemoryDriverEntry.model_validate(
                {"id": "app:broker", "kind": "queue.driver.memory", "file": FILE}, context=CONTEXT
            )
        )
        self.queue = QueueEntry.model_validate(
            {"id": "app:jobs", "kind": "queue.queue", "driver": "app:broker", "file": FILE}
            | {"driver_options": {"memory": {"max_length": 10_000}}},
            context=CONTEXT,
        )
        self.consumer = ConsumerEntry.model_validate(
            {"id": "app:c", "kind": "queue.consumer", "queue": "app:jobs", "func": "app:f"}
            | {"file": FILE, "prefetch": 3},
            context=CONTEXT,
        )
        self.run(self.driver.declare(self.queue))
        self.published: set[str] = set()
        self.acked: set[str] = set()
        self.held: list[Delivery] = []
        self.subscription: Subscription | None = None
        self.attach()

    def run(self, coroutine: Any) -> Any:
        return self.loop.run_until_complete(coroutine)

    def receive(self, delivery: Delivery) -> None:
        assert delivery.id not in self.acked, f"{delivery.id} delivered again after its ack"
        self.held.append(delivery)

    def attach(self) -> None:
        self.subscription = self.run(self.driver.consume(self.queue, self.consumer, self.receive))

    @rule(count=st.integers(1, 5))
    def publish(self, count: int) -> None:
        for _ in range(count):
            self.published.add(self.run(self.driver.publish(self.queue, b"{}", {}, "x")))

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def ack(self, data: st.DataObject) -> None:
        delivery = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.run(delivery.ack())
        self.acked.add(delivery.id)

    @precondition(lambda self: self.held)
    @rule(data=st.data())
    def nack(self, data: st.DataObject) -> None:
        delivery = self.held.pop(data.draw(st.integers(0, len(self.held) - 1)))
        self.run(delivery.nack(requeue=True))

    @precondition(lambda self: self.subscription is not None)
    @rule()
    def crash(self) -> None:
        """The consumer dies: what it held goes back; settling those later changes nothing."""
        assert self.subscription is not None
        self.run(self.subscription.close())
        self.subscription = None
        stale, self.held = self.held, []
        for delivery in stale[:1]:
            self.run(delivery.ack())  # a late ack from the dead consumer must be a no-op

    @precondition(lambda self: self.subscription is None)
    @rule()
    def restart(self) -> None:
        self.attach()

    @invariant()
    def nothing_lost(self) -> None:
        waiting = self.run(self.driver.info(self.queue)).message_count
        unsettled = {d.id for d in self.held}
        assert len(self.published) == len(self.acked) + len(unsettled) + waiting
        assert unsettled.isdisjoint(self.acked)

    def teardown(self) -> None:
        if self.subscription is None:
            self.attach()
        while self.held:  # drain: every message not yet acked must still arrive
            delivery = self.held.pop()
            self.run(delivery.ack())
            self.acked.add(delivery.id)
        assert self.acked == self.published
        self.run(self.driver.close())
        self.loop.close()


TestMemoryDriver = MemoryDriverMachine.TestCase
TestMemoryDriver.settings = settings(max_examples=150, stateful_step_count=40, deadline=None)
