"""The Python half of the async Lua bridge (see bridge.lua for the Lua half).

One lupa `lua54` state per process, used only from the event-loop thread. An invocation is a
Lua coroutine; when it yields a host request, `invoke` awaits the work and resumes it. Only
plain values cross the boundary: no Python object is ever reachable from handler code.
"""

from __future__ import annotations

import asyncio
import itertools
import json
import logging
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from enum import IntEnum
from importlib import resources
from typing import Any, NoReturn, Protocol

import lupa.lua54 as lupa

from ..drivers import Delivery
from ..errors import Kind, QueueError
from ..settings import Settings

MAX_DEPTH = 100
BUDGET_STEP = 1000  # instructions between two charges to an invocation's budget
_CONTAINERS = (dict, list)
_log = logging.getLogger("luaq.lua")


class Verdict(IntEnum):
    """What the handler's outcome asks for; the consumer turns it into a settlement."""

    ACK = 0
    NACK = 1
    FAIL = 2


@dataclass(frozen=True, slots=True)
class Outcome:
    verdict: Verdict
    kind: str | None = None
    error: str | None = None


ACKED = Outcome(Verdict.ACK)
NACKED = Outcome(Verdict.NACK)


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


Invoke = Callable[[Any, "Delivery"], Awaitable[Outcome]]
_ACK, _NACK, _CALL = 0, 1, 3  # step results, as bridge.lua defines them


@dataclass(frozen=True, slots=True)
class LuaHandler:
    function_id: str
    fn: Any


class LuaLoadError(Exception):
    """A function entry whose source does not compile, fails at load, or lacks its method."""


class ConversionError(QueueError):
    def __init__(self, message: str) -> None:
        super().__init__(Kind.INVALID, message)


def _deny_attributes(obj: object, name: object, *rest: object) -> NoReturn:
    raise AttributeError("Python objects are not accessible from Lua")


class LuaRuntime:
    """The process's Lua state: loads function entries and runs their invocations."""

    def __init__(self, settings: Settings, host: Host | None = None) -> None:
        self._lua = lupa.LuaRuntime(
            register_eval=False,
            register_builtins=False,
            unpack_returned_tuples=True,
            max_memory=settings.lua_max_memory,
            attribute_handlers=(_deny_attributes, _deny_attributes),
        )
        self.host = host
        self._ids = itertools.count(1)
        files = resources.files(__package__)
        bounded = files.joinpath("bounded.lua").read_text("utf-8")
        source = files.joinpath("bridge.lua").read_text("utf-8")
        helpers = self._lua.table_from(
            {
                "log": self._log,
                "json_encode": self._json_encode,
                "json_decode": self._json_decode,
                "now": time.time,
            }
        )
        budget = settings.max_instructions
        bridge = self._lua.execute(source, helpers, budget, min(BUDGET_STEP, budget), bounded)
        self._load = bridge.load
        self._starter = bridge.starter
        self._resume = bridge.resume
        self._cancel = bridge.cancel
        self._array = bridge.array
        self._shape = bridge.shape
        self._table_from = self._lua.table_from

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
        try:
            fn, problem = self._load(source, chunk, namespace, self._table_from(modules), method)
        except lupa.LuaError as exc:
            raise LuaLoadError(str(exc)) from exc
        if fn is None:
            raise LuaLoadError(str(problem))
        return LuaHandler(function_id, fn)

    # -- conversion -----------------------------------------------------------------------

    def to_lua(self, value: Any) -> Any:
        kind = type(value)
        if kind is dict:
            for item in value.values():
                if type(item) in _CONTAINERS:
                    break
            else:
                return self._table_from(value)
            return self._table_from(
                {k: self.to_lua(v) if type(v) in _CONTAINERS else v for k, v in value.items()}
            )
        if kind is list:
            return self._array(
                self._table_from([self.to_lua(v) if type(v) in _CONTAINERS else v for v in value])
            )
        return value

    def to_python(self, value: Any) -> Any:
        """A Lua value as plain Python data (JSON-like); ConversionError when it has no such
        form."""
        try:
            return self._to_python(value, 0)
        except UnicodeDecodeError as exc:
            raise ConversionError(f"a string in the data is not valid UTF-8 text: {exc}") from exc

    def _to_python(self, value: Any, depth: int) -> Any:
        lua_type = lupa.lua_type(value)
        if lua_type is None:
            return value
        if lua_type != "table":
            raise ConversionError(f"a Lua {lua_type} cannot be sent as data")
        if depth >= MAX_DEPTH:
            raise ConversionError(
                f"data is nested deeper than {MAX_DEPTH} levels or a table contains itself"
            )
        # raw reads only (shape, items): value[i] would run the table's __index, handler code,
        # here outside any budget
        shape, length = self._shape(value)
        if shape == "array":
            array: list[Any] = [None] * length
            for index, item in value.items():
                if type(index) is int and 0 < index <= length:
                    array[index - 1] = self._to_python(item, depth + 1)
            return array
        result: dict[str, Any] = {}
        for key, item in value.items():
            if isinstance(key, int) and not isinstance(key, bool):
                key = str(key)
            elif not isinstance(key, str):
                kind = lupa.lua_type(key) or type(key).__name__
                raise ConversionError(f"table keys must be strings or integers, not a {kind}")
            result[key] = self._to_python(item, depth + 1)
        return result

    # -- helpers called synchronously from Lua -------------------------------------------------

    def _log(
        self,
        level: str,
        message: str,
        fields: Any,
        namespace: str,
        consumer: str | None,
        message_id: str | None,
    ) -> None:
        extra: dict[str, Any] = {"namespace": namespace}
        if consumer is not None:
            extra["consumer"] = consumer
        if message_id is not None:
            extra["message_id"] = message_id
        if fields is not None:
            try:
                extra["fields"] = self.to_python(fields)
            except QueueError as exc:
                extra["fields_error"] = exc.message
        _log.log(_LEVELS[level], message, extra=extra)

    def _json_encode(self, value: Any) -> tuple[bool, str | None, str | None]:
        try:
            text = json.dumps(
                self.to_python(value), ensure_ascii=False, allow_nan=False, separators=(",", ":")
            )
        except (QueueError, ValueError, TypeError) as exc:
            return False, None, f"json.encode: {exc}"
        return True, text, None

    def _json_decode(self, text: str) -> tuple[bool, Any, str | None]:
        try:
            return True, self.to_lua(json.loads(text)), None
        except (ValueError, RecursionError) as exc:
            return False, None, f"json.decode: {exc}"

    # -- invocations -------------------------------------------------------------------------

    def invoker(self, handler: LuaHandler, consumer: str) -> Invoke:
        """The coroutine function a consumer calls per delivery to run `handler` to the end."""
        start = self._starter(handler.fn, consumer)
        ids = self._ids
        to_lua = self.to_lua
        table_from = self._table_from

        async def invoke(payload: Any, delivery: Delivery) -> Outcome:
            invocation = next(ids)
            headers = delivery.headers
            try:
                result = start(
                    invocation,
                    to_lua(payload),
                    delivery.id,
                    table_from(headers) if headers else None,
                )
                if result == _ACK:
                    return ACKED
                if type(result) is tuple and result[0] == _CALL:
                    result = await self._serve(invocation, delivery, consumer, result)
            except asyncio.CancelledError:
                self._cancel(invocation)
                raise
            except Exception as exc:
                # lupa failing to convert a result, a memory error outside any coroutine, a
                # bug in luaq: this invocation fails, the worker does not.
                self._cancel(invocation)
                _log.exception("invocation failed in the bridge", extra={"consumer": consumer})
                return Outcome(Verdict.FAIL, Kind.INTERNAL, f"internal error: {exc}")
            if result == _ACK:
                return ACKED
            if result == _NACK:
                return NACKED
            return Outcome(Verdict.FAIL, result[1], result[2])

        return invoke

    async def _serve(self, invocation: int, delivery: Delivery, consumer: str, result: Any) -> Any:
        """Answer host requests until the invocation finishes."""
        while type(result) is tuple and result[0] == _CALL:
            try:
                answer = await self._answer(result[1], result[2:], delivery, consumer)
            except QueueError as exc:
                answer = (None, str(exc.kind), exc.message, exc.retryable)
            result = self._resume(invocation, *answer)
        return result

    async def _answer(
        self, op: str, args: tuple[Any, ...], delivery: Delivery, consumer: str
    ) -> tuple[Any, ...]:
        assert self.host is not None, "no host: this runtime only checks sources"
        if op == "publish":
            namespace, queue_id, data, headers = args
            await self.host.publish(
                namespace,
                queue_id,
                self.to_python(data),
                {} if headers is None else self.to_python(headers),
                consumer,
            )
            return (True,)
        if op == "settle":
            await (delivery.ack() if args[0] == "ack" else delivery.nack())
            return (True,)
        if op == "info":
            return await self.host.info(*args)
        await asyncio.sleep(args[0])  # "sleep"
        return (True,)


_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warn": logging.WARNING,
    "error": logging.ERROR,
}
