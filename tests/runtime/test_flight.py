"""The table a supervisor shares with its worker processes (runtime/flight.py), across a real
fork: what a worker writes, the supervisor reads, and the poison list reaches every worker."""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from luaq.runtime.flight import POISON_CAPACITY, Flights, message_key


def in_child(action: Callable[[], None]) -> None:
    """Run `action` in a forked process, as a worker runs, and wait for it."""
    pid = os.fork()
    if pid == 0:
        try:
            action()
        finally:
            os._exit(0)
    os.waitpid(pid, 0)


def test_what_a_worker_process_writes_its_supervisor_reads() -> None:
    flights = Flights(2)
    key = message_key("in", b'{"n": 1}')
    before = time.monotonic()
    in_child(lambda: flights.log(1).enter(key))
    beat, since, running = flights.read(1)
    assert before <= since <= time.monotonic()
    assert running == key
    assert flights.read(0)[1] == 0.0  # the other slot: not in Lua

    def leave() -> None:
        log = flights.log(1)
        log.enter(key)
        log.leave()
        log.beat()

    in_child(leave)
    beat, since, _ = flights.read(1)
    assert since == 0.0
    assert beat >= before


def test_a_message_is_known_by_its_queue_and_body() -> None:
    assert message_key("in", b"x") == message_key("in", b"x")
    assert message_key("in", b"x") != message_key("in", b"y")
    assert message_key("in", b"x") != message_key("other", b"x")


def test_the_poison_list_reaches_a_running_worker_and_keeps_the_newest() -> None:
    flights = Flights(1)
    log = flights.log(0)
    bad = message_key("in", b"bad")
    assert not log.is_poison(bad)
    flights.poison(bad)
    assert log.is_poison(bad)  # the cached list is read again once a key is added
    for n in range(POISON_CAPACITY):
        flights.poison(message_key("in", str(n).encode()))
    assert not log.is_poison(bad)  # the oldest made room
    assert log.is_poison(message_key("in", str(POISON_CAPACITY - 1).encode()))
