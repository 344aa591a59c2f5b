"""The Python half of the async Lua bridge (see bridge.lua for the Lua half).

One lupa `lua54` state per process, used only from the event-loop thread. An invocation is a
Lua coroutine; when it yields a host request, `invoke` awaits the work and resumes it. Only
plain values cross the boundary: no Python object is ever reachable from handler code.

Values cross through convert.py. lupa makes Lua values from Python, and references to Lua values
for it, outside Lua's protected mode, where an allocation that fails aborts the process or
crosses Python's frames (a deadlock). So MEMORY_MARGIN bytes of --lua-max-memory are kept for
them: Lua is entered only with that much to spare, Lua hands control to Python only with that
much to spare (bridge.lua), big conversions to Lua run with the limit lifted, and what Python
hands back (results, error messages, which are cut to MAX_MESSAGE) fits in the margin or is
checked to fit.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import itertools
import logging
import math
import os
import signal
import sys
import threading
import time
from collections.abc import Awaitable, Callable, Iterator
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, NoReturn, Protocol, TypeVar

import lupa.lua54 as lupa

from ..codecs import CODECS
from ..drivers import Delivery
from ..errors import ErrorKind, QueueError
from ..metrics import UserMetrics
from ..settings import Settings
from .convert import MAX_TEXT, MAX_VALUES, TEXT_COST, VALUE_COST, ConversionError, Converter

MEMORY_MARGIN = 2**20  # bytes of --lua-max-memory kept free for lupa's unprotected allocations
MAX_MESSAGE = 8192  # characters of an error message handed to Lua (it may quote a handler's text)
BUDGET_STEP = 1000  # instructions between two charges to an invocation's budget
KEEPALIVE_EVERY = 1_000_000  # instructions between two calls to Host.keepalive (a few ms)
_log = logging.getLogger("luaq.lua")
_JSON = CODECS["json/plain"]
_T = TypeVar("_T")


class Verdict(IntEnum):
    """What the handler's outcome asks for; the consumer turns it into a settlement."""

    ACK = 0
    NACK = 1
    FAIL = 2
    POISON = 3  # the message's data cannot be handed to the handler: no attempt can succeed


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    kind: str | None = None
    error: str | None = None


ACKED = Outcome(Verdict.ACK)
NACKED = Outcome(Verdict.NACK)
NO_MEMORY = "not enough memory: the Lua state is at its --lua-max-memory limit"
OUT_OF_MEMORY = Outcome(Verdict.FAIL, ErrorKind.UNKNOWN, NO_MEMORY)


class Host(Protocol):
    """What handlers may ask of the process around them (the worker implements it)."""

    async def publish(
        self,
        namespace: str,
        queue_id: str,
        data: Any,
        headers: dict[str, Any],
        consumer: str | None = None,
    ) -> str:
        """`consumer`: whose handler publishes (its actor's policies apply); None for luaq
        itself (--input, luaq publish)."""

    async def info(self, namespace: str, queue_id: str) -> tuple[int, int]: ...

    def keepalive(self) -> None:
        """Called every KEEPALIVE_EVERY instructions of Lua: a handler that computes for a
        long time keeps the event loop from running, and the drivers' heartbeats with it."""


class Watch(Protocol):
    """What a supervised worker process reports to its supervisor (flight.FlightLog): which
    message a handler runs in Lua, from when, so that one stuck there can be blamed."""

    def key(self, queue: str, body: bytes) -> bytes: ...

    def is_poison(self, key: bytes) -> bool: ...

    def enter(self, key: bytes) -> None: ...

    def leave(self) -> None: ...


SettleEarly = Callable[[Delivery, bool], Awaitable[None]]  # the delivery, ack (or give back)
# an invocation, for a consumer: the payload, its delivery, how to settle early, and the
# message's key (Watch.key) in a supervised worker, else None
Invoke = Callable[[Any, Delivery, SettleEarly, bytes | None], Awaitable[Outcome]]
_ACK, _NACK, _CALL = 0, 1, 3  # step results, as bridge.lua defines them


@dataclass(frozen=True, slots=True)
class LuaHandler:
    function_id: str
    fn: Any


class LuaLoadError(Exception):
    """A function entry whose source does not compile, fails at load, or lacks its method."""


def _deny_attributes(obj: object, name: object, *rest: object) -> NoReturn:
    raise AttributeError("Python objects are not accessible from Lua")


class LuaRuntime:
    """The process's Lua state: loads function entries and runs their invocations."""

    def __init__(self, settings: Settings) -> None:
        self._lua = lupa.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            max_memory=settings.lua_max_memory,
            attribute_handlers=(_deny_attributes, _deny_attributes),
        )
        self.host: Host | None = None  # until `serve`
        self._watch: Watch | None = None
        self.user_metrics = UserMetrics()
        self._ids = itertools.count(1)
        self._max_memory = settings.lua_max_memory
        self._lifted = 2 * self._max_memory + 2**40 if self._max_memory else 0  # (0: no limit)
        files = resources.files(__package__)
        bounded = files.joinpath("bounded.lua").read_text("utf-8")
        source = files.joinpath("bridge.lua").read_text("utf-8")
        self._helpers = helpers = self._lua.table_from(
            {
                "log": self._log,
                "json_encode": self._json_encode,
                "json_decode": self._json_decode,
                "now": time.time,
                "keepalive": _nothing,
                "metric": self._metric,
                "seed": _seed,
            }
        )
        budget = settings.max_instructions
        step = min(BUDGET_STEP, budget)
        keepalive_every = max(KEEPALIVE_EVERY // step, 1)
        # Lua's own count of the KiB in use, past which it does not hand Python a table
        margin = (self._lua.get_max_memory(total=True) - MEMORY_MARGIN) / 1024
        if not self._max_memory:
            margin = math.inf
        bridge = self._lua.execute(source, helpers, budget, step, keepalive_every, bounded, margin)
        self._load = bridge.load
        self._starter = bridge.starter
        self._resume = bridge.resume
        self._cancel = bridge.cancel
        self._reseed = bridge.reseed
        self._table_from = self._lua.table_from
        self.convert = Converter(self._table_from, bridge.array, bridge.shape)

    def reseed(self) -> None:
        """Fresh seeds for every function's generator that the function did not seed itself,
        in a new worker process: forked from one load, every process would draw the same
        numbers, and a restarted one the numbers of the first."""
        self._reseed()

    def serve(self, host: Host, watch: Watch | None = None) -> None:
        """Answer the handlers' requests with `host` from now on. A runtime that only loads
        sources (`luaq check`'s) has none. `watch`: a supervised worker's, told when a handler
        runs in Lua and when it is back."""
        self.host = host
        self._watch = watch
        self._helpers["keepalive"] = functools.partial(_keepalive, host)

    def load(
        self,
        function_id: str,
        source: str,
        method: str,
        modules: tuple[str, ...],
        chunkname: str = "",
    ) -> LuaHandler:
        """Compile the source in a fresh sandbox and run its top-level chunk once."""
        namespace = function_id.split(":", 1)[0]
        chunk = "@" + chunkname if chunkname else "=" + function_id
        if not self._room(len(source)):
            raise LuaLoadError(NO_MEMORY)
        try:
            with _interrupts_after_lua():
                fn, problem = self._load(
                    source, chunk, namespace, self._table_from(modules), method
                )
        except lupa.LuaError as exc:
            raise LuaLoadError(str(exc)) from exc
        if fn is None:
            raise LuaLoadError(str(problem))
        return LuaHandler(function_id, fn)

    def _unlimited(self, convert: Callable[..., _T], *args: Any) -> _T:
        """Runs a conversion to Lua with the memory limit lifted (see the module's docstring):
        callers then check with _room that Lua may be entered."""
        self._lua.set_max_memory(self._lifted)
        try:
            return convert(*args)
        finally:
            self._lua.set_max_memory(self._max_memory)

    def _abandon(self, invocation: int, key: bytes | None) -> None:
        """Stops an invocation that will not be resumed, with its budget exhausted (bridge.lua:
        at a stop, the __close handlers of every abandoned invocation would run one after the
        other). With MEMORY_MARGIN more memory: a full Lua state is often why, and closing the
        coroutine is what gives its memory back. Watched as the message's, since Lua runs."""
        lua, limit = self._lua, self._max_memory
        watch = self._watch if key is not None else None
        if watch is not None:
            watch.enter(key)  # type: ignore[arg-type]
        if limit:
            lua.set_max_memory(max(limit, lua.get_memory_used()) + MEMORY_MARGIN)
        try:
            self._cancel(invocation)
        finally:
            if limit:
                lua.set_max_memory(limit)
            if watch is not None:
                watch.leave()

    def _room(self, size: int = 0, collect: bool = True) -> bool:
        """Whether Lua has MEMORY_MARGIN bytes, plus `size` for a string pushed as an argument or
        result, free for lupa's unprotected allocations (`collect`: after a full collection if
        needed; not while a Python helper called from Lua runs)."""
        if not self._max_memory:
            return True
        lua, limit = self._lua, self._max_memory - MEMORY_MARGIN - size
        if lua.get_memory_used() <= limit:
            return True
        if collect:
            lua.gccollect()
        return bool(lua.get_memory_used() <= limit)

    # -- helpers called synchronously from Lua -------------------------------------------------

    def _log(
        self,
        level: str,
        message: str,
        fields: Any,
        namespace: str,
        consumer: str | None,
        message_id: str | None,
        allowance: int,
    ) -> int:
        """Logs for a handler; returns the instructions to charge it: its fields and its text,
        which a log collector pays for by the byte as much as the fields."""
        extra: dict[str, Any] = {"namespace": namespace}
        if consumer is not None:
            extra["consumer"] = consumer
        if message_id is not None:
            extra["message_id"] = message_id
        reader = self.convert.reader(allowance)
        if fields is not None:
            try:
                extra["fields"] = reader.read(fields)
            except QueueError as exc:
                extra["fields_error"] = exc.message
        _log.log(_LEVELS[level], message, extra=extra)
        return reader.cost + len(message) // TEXT_COST

    def _json_encode(
        self, value: Any, allowance: int
    ) -> tuple[bool, bytes | None, str | None, int]:
        reader = self.convert.reader(allowance)
        try:
            text = _JSON.encode(reader.read(value))
        except QueueError as exc:
            return self._failed(f"json.encode: {exc.message}", reader.cost)
        if not self._room(len(text), collect=False):
            return False, None, None, reader.cost
        return True, text, None, reader.cost

    def _metric(
        self, kind: str, name: str, labels: Any, value: float, allowance: int
    ) -> tuple[bool, bool | None, str | None, int]:
        """Records a handler's own metric; returns the instructions to charge it."""
        reader = self.convert.reader(allowance)
        try:
            self.user_metrics.record(
                kind, name, None if labels is None else reader.read(labels), value
            )
        except QueueError as exc:
            return self._failed(exc.message, reader.cost)
        return True, True, None, reader.cost

    def _json_decode(self, text: str, allowance: int) -> tuple[bool, Any, str | None, int]:
        # the text bounds what decoding makes and costs: every value but the first follows a
        # comma or opens an array or object
        values = text.count(",") + text.count("[") + text.count("{") + 1
        cost = values * VALUE_COST + len(text) // TEXT_COST
        if cost > allowance:
            return self._failed("json.decode: over the instruction budget", cost)
        if values > MAX_VALUES or len(text) > MAX_TEXT:
            return self._failed(f"json.decode: over {MAX_VALUES} values or {MAX_TEXT} bytes", cost)
        try:
            value = self._unlimited(self.convert.to_lua, _JSON.decode(text.encode()))
        except (ValueError, RecursionError, MemoryError, ConversionError) as exc:
            return self._failed(f"json.decode: {exc}", cost)
        if not self._room(collect=False):
            return False, None, None, cost
        return True, value, None, cost

    def _failed(self, message: str, cost: int) -> tuple[bool, None, str | None, int]:
        """A helper's failure, with its message cut, if the state has room for that (it may not:
        only a table handed to Python makes Lua check it has MEMORY_MARGIN to spare). Without a
        message, the bridge raises "not enough memory"."""
        message = _cut(message)
        if not self._room(len(message), collect=False):
            return False, None, None, cost
        return False, None, message, cost

    # -- invocations -------------------------------------------------------------------------

    def invoker(self, handler: LuaHandler, consumer: str) -> Invoke:
        """The coroutine function a consumer calls per delivery to run `handler` to the end."""
        start = self._starter(handler.fn, consumer)
        ids = self._ids
        to_lua = self.convert.to_lua
        headers_to_lua = self.convert.headers_to_lua
        set_max_memory, limit, lifted = self._lua.set_max_memory, self._max_memory, self._lifted
        memory_used, room = self._lua.get_memory_used, self._room
        roomy = limit - MEMORY_MARGIN if limit else sys.maxsize  # (a fast first check)

        async def invoke(
            payload: Any, delivery: Delivery, settle: SettleEarly, key: bytes | None
        ) -> Outcome:
            invocation = next(ids)
            watch = self._watch if key is not None else None
            headers = delivery.headers
            try:
                # the arguments are made with the memory limit lifted (see the module docstring)
                set_max_memory(lifted)
                try:
                    lua_payload = to_lua(payload)
                    lua_headers = headers_to_lua(headers) if headers else None
                finally:
                    set_max_memory(limit)
                size = len(payload) if type(payload) in _STRINGS else 0  # (pushed as is)
                if memory_used() > roomy - size and not room(size):
                    return OUT_OF_MEMORY
                if watch is not None:
                    watch.enter(key)  # type: ignore[arg-type]
                try:
                    result = start(invocation, lua_payload, delivery.id, lua_headers)
                finally:
                    if watch is not None:
                        watch.leave()
                if result == _ACK:
                    return ACKED
                if type(result) is tuple and result[0] == _CALL:
                    result = await self._serve(invocation, delivery, settle, consumer, result, key)
            except asyncio.CancelledError:
                self._abandon(invocation, key)
                raise
            except lupa.LuaMemoryError:
                # the bridge's own code, after the handler's, found the state full
                self._abandon(invocation, key)
                return OUT_OF_MEMORY
            except ConversionError as exc:  # (the payload: the handler did not start)
                return Outcome(Verdict.POISON, ErrorKind.INVALID, f"the message's {exc.message}")
            except Exception as exc:
                # lupa failing to convert a result, a bug in luaq: this invocation fails, the
                # worker does not.
                self._abandon(invocation, key)
                _log.exception("invocation failed in the bridge", extra={"consumer": consumer})
                return Outcome(Verdict.FAIL, ErrorKind.INTERNAL, f"internal error: {exc}")
            if result == _ACK:
                return ACKED
            if result == _NACK:
                return NACKED
            return Outcome(Verdict.FAIL, result[1], result[2])

        return invoke

    async def _serve(
        self,
        invocation: int,
        delivery: Delivery,
        settle: SettleEarly,
        consumer: str,
        result: Any,
        key: bytes | None,
    ) -> Any:
        """Answer host requests until the invocation finishes."""
        watch = self._watch if key is not None else None
        while type(result) is tuple and result[0] == _CALL:
            try:
                answer = await self._answer(result[1], result[2:], delivery, settle, consumer)
            except QueueError as exc:
                answer = (None, str(exc.kind), _cut(exc.message), exc.retryable)
            # only a failure's answer has strings (to make in Lua), and short ones: the margin
            if answer[0] is None and not self._room():
                self._abandon(invocation, key)
                return (Verdict.FAIL, OUT_OF_MEMORY.kind, OUT_OF_MEMORY.error)
            if watch is not None:
                watch.enter(key)  # type: ignore[arg-type]
            try:
                result = self._resume(invocation, *answer)
            finally:
                if watch is not None:
                    watch.leave()
        return result

    async def _answer(
        self,
        op: str,
        args: tuple[Any, ...],
        delivery: Delivery,
        settle: SettleEarly,
        consumer: str,
    ) -> tuple[Any, ...]:
        assert self.host is not None, "no host: this runtime only checks sources"
        if op == "publish":
            namespace, queue_id, data, headers, allowance = args
            reader = self.convert.reader(allowance)
            try:
                await self.host.publish(
                    namespace,
                    queue_id,
                    reader.read(data),
                    {} if headers is None else reader.read(headers),
                    consumer,
                )
            except QueueError as exc:
                return (None, reader.cost, str(exc.kind), _cut(exc.message), exc.retryable)
            return (True, reader.cost)
        if op == "settle":
            await settle(delivery, args[0] == "ack")
            return (True,)
        if op == "info":
            return await self.host.info(*args)
        await asyncio.sleep(args[0])  # "sleep"
        return (True,)


def _nothing() -> None:
    return None


@contextlib.contextmanager
def _interrupts_after_lua() -> Iterator[None]:
    """Ctrl-C while a module loads would raise KeyboardInterrupt in whatever Python function Lua
    called then, where a pcall (the bridge's around keepalive, or the module's own) swallows it
    and luaq starts anyway: the signal is noted instead, and raised once Lua has returned (a
    load is bounded by its instruction budget). Only where Python's own handler would act."""
    if (
        threading.current_thread() is not threading.main_thread()
        or signal.getsignal(signal.SIGINT) is not signal.default_int_handler
    ):
        yield
        return
    noted: list[int] = []
    signal.signal(signal.SIGINT, lambda signum, _: noted.append(signum))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if noted:
        raise KeyboardInterrupt


def _seed() -> int:
    """64 bits of the operating system's randomness, as a Lua integer."""
    return int.from_bytes(os.urandom(8), "little", signed=True)


def _keepalive(host: Host) -> None:
    """Host.keepalive for the bridge, which calls it at any time, the Lua state full to the byte
    maybe: an exception would have to be made into a Lua value there."""
    try:
        host.keepalive()
    except Exception:
        _log.exception("keepalive failed")


def _cut(message: str) -> str:
    """An error message for Lua: it may quote a handler's text (a queue id, a metric name) of
    any size, and must fit in MEMORY_MARGIN."""
    if len(message) <= MAX_MESSAGE:
        return message
    return f"{message[:MAX_MESSAGE]}... ({len(message) - MAX_MESSAGE} more characters)"


_STRINGS = (str, bytes)
_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
