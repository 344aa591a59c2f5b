"""Message body codecs: named in the entries file (`codec:` on a queue), chosen by content
type on receipt, so a consumer decodes whatever a publisher chose."""

from __future__ import annotations

import json
from typing import Any, NoReturn, Protocol

import msgpack

from .errors import Kind, QueueError


class Codec(Protocol):
    content_type: str

    def encode(self, data: Any) -> bytes: ...

    def decode(self, body: bytes) -> Any:
        """Raises ValueError (or RecursionError) for a body that is not this codec's."""


class JsonCodec:
    content_type = "application/json"
    # made once: json.dumps and json.loads with bytes spend more on their arguments than on a
    # small message
    _encoder = json.JSONEncoder(ensure_ascii=False, allow_nan=False, separators=(",", ":"))
    _decoder = json.JSONDecoder()

    def encode(self, data: Any) -> bytes:
        try:
            return self._encoder.encode(data).encode()
        except (TypeError, ValueError) as exc:
            raise QueueError(Kind.INVALID, f"data cannot be encoded as JSON: {exc}") from exc

    def decode(self, body: bytes) -> Any:
        try:
            text = body.decode()
        except UnicodeDecodeError:
            return json.loads(body)  # UTF-16 or UTF-32, which JSON allows too
        return self._decoder.decode(text.removeprefix("\ufeff"))  # (a UTF-8 byte order mark)


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
            raise QueueError(Kind.INVALID, f"data cannot be encoded as msgpack: {exc}") from exc

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


INT64 = range(-(2**63), 2**63)  # the integers msgpack and Lua hold


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
