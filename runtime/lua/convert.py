"""Values between Python and Lua: decoded data and message headers into Lua, and Lua data read
back as plain Python data (JSON-like).

Reading a Lua value into Python (publish, json.encode, logger fields) uses raw access only, so no
handler metamethod runs outside the handler's budget, and counts what it reads: at most
MAX_VALUES values and MAX_TEXT characters, each value charged VALUE_COST instructions to the
invocation, and each key bridge.shape looks at to tell an array from a map SCAN_COST.
"""

from __future__ import annotations

import datetime
import decimal
from collections.abc import Callable, Mapping
from typing import Any

import lupa.lua54 as lupa

from ..codecs import INT64
from ..errors import ErrorKind, QueueError

MAX_DEPTH = 100
MAX_VALUES = 1_000_000  # values in one piece of data read from Lua or decoded for it
MAX_TEXT = 64 * 2**20  # characters of text in it
VALUE_COST = 100  # instructions charged per value converted between Lua and Python
TEXT_COST = 16  # characters of text converted per instruction charged
SCAN_COST = 10  # instructions charged per key bridge.shape looks at (about what its loops run)
MAX_HEADER_DEPTH = 32  # nesting of header tables and arrays handed to Lua
_CONTAINERS = frozenset((dict, list))
_AS_IS = frozenset((str, float, bool, bytes, type(None)))  # what to_lua hands Lua unchanged
_NUMBERS = frozenset((int, float, bool))  # what lupa makes of Lua numbers and booleans
_SCALARS = _NUMBERS | {str}
_lua_type = lupa.lua_type


class ConversionError(QueueError):
    def __init__(self, message: str) -> None:
        super().__init__(ErrorKind.INVALID, message)


class Reader:
    """Reads Lua values as plain Python data (JSON-like) for one caller, raw: no metamethod
    runs (they are handler code, and this is no budgeted coroutine). Counts the values and
    text it reads against the limits and what is left of the invocation's budget; `cost` is
    what the invocation is then charged."""

    __slots__ = ("_shape", "limit", "scanned", "text", "values")

    def __init__(self, shape: Any, allowance: int) -> None:
        self._shape = shape
        self.limit = min(MAX_VALUES, allowance // VALUE_COST)
        self.values = 0
        self.text = 0
        self.scanned = 0

    @property
    def cost(self) -> int:
        return self.values * VALUE_COST + self.text // TEXT_COST + self.scanned * SCAN_COST

    def read(self, value: Any) -> Any:
        try:
            return self._read(value, 0)
        except UnicodeDecodeError as exc:
            raise ConversionError(f"a string in the data is not valid UTF-8 text: {exc}") from exc

    def _over(self) -> ConversionError:
        return ConversionError(f"data has more than {self.limit} values")

    def _read(self, value: Any, depth: int) -> Any:
        self.values += 1
        if self.values > self.limit:
            raise self._over()
        cls = type(value)
        if cls is str:
            self.text += len(value)
            if self.text > MAX_TEXT:
                raise ConversionError(f"data has more than {MAX_TEXT} characters of text")
            return value
        if cls in _NUMBERS:
            return value
        lua_type = _lua_type(value)
        if lua_type != "table":
            raise ConversionError(f"a Lua {lua_type} cannot be sent as data")
        if depth >= MAX_DEPTH:
            raise ConversionError(
                f"data is nested deeper than {MAX_DEPTH} levels or a table contains itself"
            )
        depth += 1
        # (no more keys than values left to read: they would be read after the scan)
        kind, n = self._shape(value, self.limit - self.values)
        if kind == "map":
            self.scanned += n
            result: dict[str, Any] = {}
            for key, item in value.items():
                if type(key) is int:
                    key = str(key)
                elif type(key) is str:
                    self.text += len(key)
                else:
                    what = _lua_type(key) or type(key).__name__
                    raise ConversionError(f"table keys must be strings or integers, not a {what}")
                result[key] = self._read(item, depth)
            return result
        if kind == "array":  # keys 1..n and no other, each looked at twice
            self.scanned += 2 * n
            array: list[Any] = [None] * n
            for index, item in value.items():
                array[index - 1] = self._read(item, depth)
            return array
        if kind == "marked":
            return self._marked(value, n, depth)
        self.scanned += n
        raise self._over()

    def _marked(self, value: Any, length: int, depth: int) -> list[Any]:
        """A table marked as an array: its length is a border, which may lie far past its keys,
        and it may have other keys, which are left out. Each element is a value, a hole (None)
        as much as an item, and each key left out is looked at."""
        if length > self.limit - self.values:
            raise self._over()
        array: list[Any] = [None] * length
        holes = length
        for index, item in value.items():
            if type(index) is int and 0 < index <= length:
                array[index - 1] = self._read(item, depth)
                holes -= 1
            else:
                self.scanned += 1
        self.values += holes
        return array


def _float(value: int) -> float:
    """An integer beyond Lua's 64 bits, as the float nearest to it (a JSON number can be any
    size); ConversionError beyond a float's range, where there is none."""
    try:
        return float(value)
    except OverflowError:
        raise ConversionError("an integer in the data is beyond the range of a float") from None


def _deeper(depth: int) -> int:
    if depth >= MAX_DEPTH - 1:
        raise ConversionError(f"data is nested deeper than {MAX_DEPTH} levels")
    return depth + 1


class Converter:
    """Conversions for one Lua state, through its table constructor and the bridge's `array`
    (marks a table as an array) and `shape` (tells an array from a map) functions."""

    def __init__(
        self,
        table_from: Callable[..., Any],
        array: Callable[[Any], Any],
        shape: Callable[[Any], tuple[str, int]],
    ) -> None:
        self._table_from = table_from
        self._array = array
        self._shape = shape

    def to_lua(self, value: Any, depth: int = 0) -> Any:
        """Decoded data as Lua values: dicts and lists as tables (lists marked as arrays),
        integers beyond Lua's 64 bits as floats (a JSON number can be any size). Raises
        ConversionError for data nested deeper than MAX_DEPTH, as deep as luaq reads Lua data."""
        kind = type(value)
        if kind is dict:
            if _CONTAINERS.isdisjoint(map(type, value.values())):
                try:
                    return self._table_from(value)
                except OverflowError:  # a big integer: converted one by one below
                    pass
            depth = _deeper(depth)
            return self._table_from(
                {k: v if type(v) in _AS_IS else self.to_lua(v, depth) for k, v in value.items()}
            )
        if kind is list:
            if _CONTAINERS.isdisjoint(map(type, value)):
                try:
                    return self._array(self._table_from(value))
                except OverflowError:
                    pass
            depth = _deeper(depth)
            return self._array(
                self._table_from([v if type(v) in _AS_IS else self.to_lua(v, depth) for v in value])
            )
        if kind is int and value not in INT64:
            return _float(value)
        return value

    def headers_to_lua(self, headers: Mapping[str, Any]) -> Any:
        """Message headers as a Lua table of plain values, whatever another client sent:
        tables and arrays as tables, timestamps as integer seconds since the epoch (UTC),
        decimals as numbers (integers when they have no fraction digits), byte arrays as
        strings, integers beyond 64 bits as floats. Void values, integers beyond a float's
        range, and anything nested deeper than MAX_HEADER_DEPTH, are left out."""
        if _SCALARS.issuperset(map(type, headers.values())):
            try:
                return self._table_from(headers)
            except OverflowError:  # an integer beyond Lua's 64 bits: below, as a float
                pass
        return self._header_value(headers, 0)

    def _header_value(self, value: Any, depth: int) -> Any:
        kind = type(value)
        if kind is int:
            if value in INT64:
                return value
            try:
                return _float(value)
            except ConversionError:
                return None
        if kind in _SCALARS:
            return value
        if depth > MAX_HEADER_DEPTH:
            return None
        if isinstance(value, Mapping):
            table = {}
            for key, item in value.items():
                converted = self._header_value(item, depth + 1)
                if converted is not None:
                    table[str(key)] = converted
            return self._table_from(table)
        if isinstance(value, list | tuple):
            items = [self._header_value(item, depth + 1) for item in value]
            return self._array(self._table_from(items))
        if isinstance(value, bytes | bytearray):
            return bytes(value)
        if isinstance(value, datetime.datetime):
            if value.tzinfo is None:
                value = value.replace(tzinfo=datetime.UTC)
            return int(value.timestamp())
        if isinstance(value, decimal.Decimal) and value.is_finite():
            exponent = value.as_tuple().exponent
            if isinstance(exponent, int) and exponent >= 0:
                return self._header_value(int(value), depth)
            return float(value)
        if isinstance(value, str | int | float):  # subclasses: enums and the like
            return value
        return None

    def reader(self, allowance: int = MAX_VALUES * VALUE_COST) -> Reader:
        """Reads Lua values as plain Python data; ConversionError for one that has no such
        form or is over the limits."""
        return Reader(self._shape, allowance)
