"""Message body codecs, named as the entries file names them (`codec:` on a queue)."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from .errors import Kind, QueueError


@dataclass(frozen=True)
class JsonCodec:
    content_type: str = "application/json"

    def encode(self, data: Any) -> bytes:
        try:
            return json.dumps(
                data, ensure_ascii=False, allow_nan=False, separators=(",", ":")
            ).encode()
        except (TypeError, ValueError) as exc:
            raise QueueError(Kind.INVALID, f"data cannot be encoded as JSON: {exc}") from exc

    def decode(self, body: bytes) -> Any:
        """Raises ValueError (or RecursionError) for a body that is not this codec's."""
        return json.loads(body)


CODECS = {"json/plain": JsonCodec()}
