"""Message body codecs: named in the entries file (`codec:` on a queue), chosen by content
type on receipt, so a consumer decodes whatever a publisher chose."""

from __future__ import annotations

import json
from typing import Any, Protocol

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
    content_type = "application/msgpack"

    def encode(self, data: Any) -> bytes:
        try:
            return bytes(msgpack.packb(data, use_bin_type=True))
        except (TypeError, ValueError, OverflowError) as exc:
            raise QueueError(Kind.INVALID, f"data cannot be encoded as msgpack: {exc}") from exc

    def decode(self, body: bytes) -> Any:
        try:
            return msgpack.unpackb(body, raw=False, strict_map_key=False)
        except (msgpack.UnpackException, TypeError, ValueError) as exc:
            raise ValueError(f"not valid msgpack: {exc}") from exc


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
