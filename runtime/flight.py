"""What the supervisor knows of its workers' invocations without asking them: a table in
anonymous shared memory, made before the forks, that each worker process writes and the
supervisor reads.

A worker stuck in a C call that does not return cannot answer anything, so it reports ahead:
its event loop's last beat, and the message whose handler runs in Lua right now with the
moment it entered (every resume of a handler's coroutine enters and leaves; awaiting the broker
is not running). The supervisor kills a worker whose handler has been in Lua longer than the
hard timeout, or whose loop gave no beat for as long, and blames that message; a message blamed
for two deaths is poison, and the supervisor writes it into the table's poison list, which every
worker checks before it runs a handler (Celery's hard time limit, with a memory of the culprit).

Lock-free: each slot has one writer (its worker) and the poison list one (the supervisor). A
reader may see a key and a time from two different moments; the worst outcome is a wrong blame
for a message that was in flight anyway, and it takes two to poison a message.
"""

from __future__ import annotations

import asyncio
import hashlib
import mmap
import struct
import time

KEY_SIZE = 16  # bytes of a message's key (blake2b)
POISON_CAPACITY = 1024  # poison keys kept; past that the oldest make room
BEAT_EVERY = 1.0  # seconds between two beats of a worker's event loop
_SLOT = struct.Struct(f"=dd{KEY_SIZE}s")  # beat, in Lua since (0: not), key
_COUNT = struct.Struct("=Q")  # poison keys ever written
_TIME = struct.Struct("=d")
_KEY = struct.Struct(f"={KEY_SIZE}s")
_SINCE_AT, _KEY_AT = 8, 16  # offsets in a slot


def message_key(queue: str, body: bytes) -> bytes:
    """How the supervisor knows a message across redeliveries and processes: its queue and its
    body (a broker gives a redelivered message the same body, not always the same id)."""
    digest = hashlib.blake2b(body, digest_size=KEY_SIZE, person=b"luaq.flight")
    digest.update(queue.encode())
    return digest.digest()


class Flights:
    """The whole table: `slots` worker slots, then the poison list."""

    def __init__(self, slots: int) -> None:
        self.slots = slots
        self._poison_at = slots * _SLOT.size
        size = self._poison_at + _COUNT.size + POISON_CAPACITY * KEY_SIZE
        self._memory = mmap.mmap(-1, size, flags=mmap.MAP_SHARED)

    def log(self, slot: int) -> FlightLog:
        """The view of the worker process in `slot` (in the forked process)."""
        return FlightLog(self, slot)

    def reset(self, slot: int) -> None:
        """A new worker process takes the slot (before its fork): as if it had just beaten, and
        not in Lua."""
        _SLOT.pack_into(self._memory, slot * _SLOT.size, time.monotonic(), 0.0, bytes(KEY_SIZE))

    def read(self, slot: int) -> tuple[float, float, bytes]:
        """The slot's last beat, since when its worker has been in Lua (0.0: it is not) and the
        key of the message it runs."""
        beat, since, key = _SLOT.unpack_from(self._memory, slot * _SLOT.size)
        return beat, since, key

    def poison(self, key: bytes) -> None:
        (count,) = _COUNT.unpack_from(self._memory, self._poison_at)
        at = self._poison_at + _COUNT.size + (count % POISON_CAPACITY) * KEY_SIZE
        self._memory[at : at + KEY_SIZE] = key
        _COUNT.pack_into(self._memory, self._poison_at, count + 1)

    def poisoned(self) -> tuple[int, frozenset[bytes]]:
        (count,) = _COUNT.unpack_from(self._memory, self._poison_at)
        start = self._poison_at + _COUNT.size
        keys = frozenset(
            bytes(self._memory[start + i * KEY_SIZE : start + (i + 1) * KEY_SIZE])
            for i in range(min(count, POISON_CAPACITY))
        )
        return count, keys


class FlightLog:
    """A worker process's writes into its slot, and its reads of the poison list (cached until
    the supervisor adds a key)."""

    __slots__ = ("_at", "_count", "_flights", "_memory", "_poison")

    def __init__(self, flights: Flights, slot: int) -> None:
        self._flights = flights
        self._memory = flights._memory
        self._at = slot * _SLOT.size
        self._count = 0
        self._poison: frozenset[bytes] = frozenset()

    def beat(self) -> None:
        _TIME.pack_into(self._memory, self._at, time.monotonic())

    async def beating(self) -> None:
        """The event loop's sign of life, until cancelled: it awaits nothing but the clock, so
        a broker that does not answer cannot make a live loop look dead."""
        while True:
            self.beat()
            await asyncio.sleep(BEAT_EVERY)

    def key(self, queue: str, body: bytes) -> bytes:
        return message_key(queue, body)

    def enter(self, key: bytes) -> None:
        """A handler's coroutine is about to run (the key first: `since` makes the slot count)."""
        _KEY.pack_into(self._memory, self._at + _KEY_AT, key)
        _TIME.pack_into(self._memory, self._at + _SINCE_AT, time.monotonic())

    def leave(self) -> None:
        _TIME.pack_into(self._memory, self._at + _SINCE_AT, 0.0)

    def is_poison(self, key: bytes) -> bool:
        (count,) = _COUNT.unpack_from(self._memory, self._flights._poison_at)
        if count != self._count:
            self._count, self._poison = self._flights.poisoned()
        return key in self._poison
