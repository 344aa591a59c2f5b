"""Message body codecs: named in the entries file (`codec:` on a queue), chosen by content
type on receipt, so a consumer decodes whatever a publisher chose."""

from __future__ import annotations

import json
import math
from collections.abc import Callable
from typing import Any, NoReturn, Protocol

import msgpack
import orjson

from .errors import ErrorKind, QueueError


class Codec(Protocol):
    content_type: str

    def encode(self, data: Any) -> bytes: ...

    def decode(self, body: bytes) -> Any:
        """Raises ValueError (or RecursionError) for a body that is not this codec's."""


def _integer(text: str) -> int | float:
    """A JSON integer as orjson reads it: beyond 64 bits the nearest float, beyond a float's
    range refused (no float or Lua number holds it). The digits are never made into a Python
    integer, whose parsing takes quadratic time (a few thousand digits, a millisecond)."""
    if len(text) <= 20:  # a sign and 19 digits: all 64-bit integers
        value = int(text)
        if value in INT64:
            return value
    number = float(text)
    if math.isinf(number):
        raise ValueError(f"the integer {text[:20]}... is beyond the range of a float")
    return number


class JsonCodec:
    """orjson reads and writes the common case in a fraction of the standard library's time.
    What it refuses but JSON (or Python's json, as Python clients write it) allows goes to the
    standard library: a byte order mark, UTF-16, UTF-32, NaN and Infinity when reading, integers
    beyond 64 bits when writing. orjson writes NaN as null: the standard library refuses it.
    Integers are read as orjson reads them (see _integer)."""

    content_type = "application/json"
    _encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    _decoder = json.JSONDecoder(parse_int=_integer)

    def encode(self, data: Any) -> bytes:
        try:
            body = orjson.dumps(data)
        except TypeError:
            return self._encode(data)
        if body.find(b"null") >= 0:  # (perhaps a NaN; `in` would first try b"null" as an int)
            return self._encode(data)
        return body

    def _encode(self, data: Any) -> bytes:
        try:
            return self._encoder.encode(data).encode()
        except (TypeError, ValueError) as exc:
            raise QueueError(ErrorKind.INVALID, f"data cannot be encoded as JSON: {exc}") from exc

    def decode(self, body: bytes) -> Any:
        try:
            return orjson.loads(body)
        except orjson.JSONDecodeError:
            pass
        try:
            text = body.decode()
        except UnicodeDecodeError:
            data = json.loads(body, parse_int=_integer)  # UTF-16 or UTF-32
        else:
            data = self._decoder.decode(text.removeprefix("\ufeff"))  # (a UTF-8 byte order mark)
        _no_lone_surrogates(data)
        return data


def _no_lone_surrogates(data: Any) -> None:
    """Python's json reads an escape such as \\ud800 alone into a string that is no text: it has
    no UTF-8 form, so Lua cannot hold it (orjson refuses such a body)."""
    pending = [data]
    while pending:
        value = pending.pop()
        kind = type(value)
        if kind is str:
            try:
                value.encode()
            except UnicodeEncodeError as exc:
                raise ValueError(f"a string is not valid Unicode: {exc}") from exc
        elif kind is dict:
            pending.extend(value)
            pending.extend(value.values())
        elif kind is list:
            pending.extend(value)


class MsgpackCodec:
    """Reads plain values only, as JSON has: timestamps as seconds since the epoch (a float),
    map keys that are text, bytes or 64-bit integers. Another client may send anything else
    msgpack has (an extension type, a float, nil or NaN as a key): no Lua value stands for it,
    so such a body cannot be decoded."""

    content_type = "application/msgpack"

    def encode(self, data: Any) -> bytes:
        try:
            return bytes(msgpack.packb(data, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise QueueError(
                ErrorKind.INVALID, f"data cannot be encoded as msgpack: {exc}"
            ) from exc

    def decode(self, body: bytes) -> Any:
        try:
            return msgpack.unpackb(
                body,
                raw=False,
                strict_map_key=False,
                timestamp=1,
                ext_hook=_no_extension,
                object_pairs_hook=_plain_map,
            )
        except (msgpack.UnpackException, TypeError, ValueError) as exc:
            raise ValueError(f"cannot read the msgpack body: {exc}") from exc


def _no_extension(code: int, data: bytes) -> NoReturn:
    raise ValueError(f"extension type {code} has no plain value")


INT64 = range(-(2**63), 2**63)  # the integers a Lua integer holds


def _plain_map(pairs: list[tuple[Any, Any]]) -> dict[Any, Any]:
    for key, _ in pairs:
        kind = type(key)
        if kind is not str and kind is not bytes and not (kind is int and key in INT64):
            raise ValueError(f"map key {key!r} is not text, bytes or a 64-bit integer")
    return dict(pairs)


CODECS: dict[str, Codec] = {"json/plain": JsonCodec(), "application/msgpack": MsgpackCodec()}
BY_CONTENT_TYPE: dict[str, Codec] = {codec.content_type: codec for codec in CODECS.values()}
# what other clients call the same formats (kombu, and so Celery, says application/x-msgpack)
BY_CONTENT_TYPE_ALIAS: dict[str, Codec] = {"application/x-msgpack": CODECS["application/msgpack"]}


def codec_for(content_type: str, default: Codec) -> Codec:
    """The codec that reads a received body. luaq's own publishes name it exactly; other
    clients add parameters (`application/json; charset=utf-8`), write it in capitals, or send
    no content type at all, which means the queue's own codec (`default`). Raises ValueError
    for a type no codec reads."""
    codec = BY_CONTENT_TYPE.get(content_type)
    if codec is not None:
        return codec
    media = content_type.partition(";")[0].strip().lower()
    if not media:
        return default
    codec = BY_CONTENT_TYPE.get(media) or BY_CONTENT_TYPE_ALIAS.get(media)
    if codec is None:
        raise ValueError(f"unknown content type {content_type!r}")
    return codec


def decoder(name: str) -> Callable[[bytes, str], Any]:
    """How the consumers of a queue whose codec is `name` read a body: by the content type it
    came with (codec_for), that codec when it came with none."""
    default = CODECS[name]

    def decode(body: bytes, content_type: str) -> Any:
        return codec_for(content_type, default).decode(body)

    return decode
