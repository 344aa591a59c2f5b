"""What the broker needs to know, mapped: headers to AMQP properties and back, a message passed
on as it came, queue options to declare arguments, and reply codes to error kinds.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ...entries import AmqpDriverEntry, QueueEntry
from ...errors import ErrorKind, QueueError
from ...headers import priority
from ..base import Delivery
from .client import ChannelClosed, ChannelLimit, HeadersTable, raw_fields

# Header names that travel as AMQP properties (other clients read them there), with the
# property's name. The headers table carries everything else, and the originals of values a
# property cannot hold exactly.
PROPERTIES = {
    "correlation_id": "correlation_id",
    "reply_to": "reply_to",
    "message_type": "type",
    "expiration": "expiration",
    "priority": "priority",
}
ATTEMPTS = "x-luaq-attempts"  # attempts a retried message has had, carried in its headers
DELIVERY_COUNT = "x-delivery-count"  # a quorum queue's count of earlier deliveries
# The properties a retry or a dead letter passes on as they came (`headers` aside)
PASSED_ON = frozenset(
    {"content_type", "content_encoding", "delivery_mode", "priority", "correlation_id",
     "reply_to", "expiration", "message_id", "timestamp", "type", "user_id", "app_id",
     "cluster_id"}
)  # fmt: skip
# Broker reply codes (channel closes) as error kinds
REPLY_KINDS = {
    403: ErrorKind.PERMISSION_DENIED,  # access refused
    404: ErrorKind.NOT_FOUND,
    405: ErrorKind.CONFLICT,  # resource locked: another connection's exclusive consumer
    406: ErrorKind.CONFLICT,  # precondition failed: declared before with other options
}


def to_milliseconds(seconds: float) -> int:
    return round(seconds * 1000)


def queue_arguments(queue: QueueEntry, driver: AmqpDriverEntry) -> dict[str, Any]:
    options = queue.driver_options.amqp
    ttl = options.message_ttl if options.message_ttl is not None else driver.default_message_ttl
    expiry = (
        options.queue_expiry if options.queue_expiry is not None else (driver.default_queue_expiry)
    )
    arguments: dict[str, Any] = {}
    if ttl is not None:
        arguments["x-message-ttl"] = to_milliseconds(ttl)
    if expiry is not None:
        arguments["x-expires"] = to_milliseconds(expiry)
    if options.max_length is not None:
        arguments["x-max-length"] = options.max_length
    if options.max_priority is not None:
        arguments["x-max-priority"] = options.max_priority
    if options.type == "quorum":
        arguments["x-queue-type"] = "quorum"
    return arguments


class AmqpHeaders(dict[str, Any]):
    """A delivery's headers as its handler sees them (headers_from), and the AMQP properties
    they came from: a retry or a dead letter passes those on as they were."""

    __slots__ = ("properties",)

    properties: Mapping[str, Any]


class Properties(dict[str, Any]):
    """AMQP properties made already, for a message passed on as it came: given to `_publish`
    as its headers, properties_for takes them as they are."""


def properties_for(
    headers: Mapping[str, Any], content_type: str, message_id: str, persistent: bool
) -> dict[str, Any]:
    if type(headers) is Properties:
        return headers
    table: dict[str, Any] = {}
    properties: dict[str, Any] = {
        "content_type": content_type,
        "delivery_mode": 2 if persistent else 1,
        "message_id": message_id,
    }
    for key, value in headers.items():
        name = PROPERTIES.get(key)
        if name is None:
            table[key] = value
        elif key == "priority":
            properties[name] = priority(value)
            if not isinstance(value, int):
                table[key] = value
        elif key == "expiration":
            properties[name] = expiration(value)
            if not isinstance(value, str):
                table[key] = value
        elif isinstance(value, str):
            properties[name] = value
        else:
            table[key] = value
    if table:
        properties["headers"] = table
    return properties


# content encodings that leave the body as it is: kombu (Celery) says utf-8 for JSON and
# binary for msgpack, Spring AMQP UTF-8
PLAIN_ENCODINGS = frozenset({"", "identity", "utf-8", "utf8", "binary"})


def unreadable_encoding(properties: Mapping[str, Any]) -> str | None:
    """A body compressed by another client (gzip, ...): luaq decodes none of them, so say that
    rather than let its codec fail on the compressed bytes."""
    encoding = properties.get("content_encoding")
    if encoding is None or encoding.lower() in PLAIN_ENCODINGS:
        return None
    return f"content encoding {encoding!r}: luaq reads bodies only as they are, uncompressed"


def expiration(value: Any) -> str:
    """A per-message TTL in milliseconds; the broker closes the channel on anything else."""
    text = str(value)
    if isinstance(value, bool) or not text.isdigit():
        raise QueueError(
            ErrorKind.INVALID, f"expiration must be a number of milliseconds, not {value!r}"
        )
    return text


def headers_from(properties: Mapping[str, Any]) -> AmqpHeaders:
    headers = AmqpHeaders()
    headers.properties = properties
    for key, name in PROPERTIES.items():
        value = properties.get(name)
        if value is not None:
            headers[key] = value
    table = properties.get("headers")
    if table:
        headers.update(table)  # as decoded: bytes, decimals, timestamps kept for a republish
    return headers


def passed_on(
    delivery: Delivery, user: str, extra: Mapping[str, Any], drop: tuple[str, ...] = ()
) -> Properties:
    """The properties of `delivery` for a copy sent on (a retry, a dead letter): as it came,
    every header of the wire type it had, with `extra` headers set and `drop` left out, and
    the broker's x-delivery-count too (a retry carries x-luaq-attempts).

    Two properties cannot go on as they are. `expiration`: the copy would expire out of a
    delay queue before its backoff, and out of a dead-letter queue; it goes in the header
    x_original_expiration instead (as RabbitMQ's own dead-lettering drops it). And `user_id`,
    unless it is the user luaq publishes as: RabbitMQ refuses any other (x_original_user_id).
    Nor can one header: `x-death` (x_original_death). A message that once expired from its
    queue, or overflowed it, and was moved back would name that queue there, and when its
    retry's delay ends, RabbitMQ, taking the dead-lettering back to the queue for a cycle,
    drops it; the x-first-death-* and x-last-death-* headers that sum it up go with it."""
    original: Mapping[str, Any] | None = getattr(delivery.headers, "properties", None)
    table: dict[str, Any] = {}
    if original is None:  # not from a broker (a test's delivery): as luaq would publish it
        original = properties_for(delivery.headers, delivery.content_type, delivery.id, True)
        table.update(original.get("headers") or {})
    elif isinstance(original.get("headers"), HeadersTable):
        table.update(raw_fields(original["headers"].raw))
    else:
        table.update(original.get("headers") or {})
    properties = {k: v for k, v in original.items() if k in PASSED_ON}
    properties["message_id"] = delivery.id
    for key in (DELIVERY_COUNT, *drop):
        table.pop(key, None)
    expiration = properties.pop("expiration", None)
    if expiration is not None:
        table.setdefault("x_original_expiration", expiration)
    user_id = properties.get("user_id")
    if user_id is not None and user_id != user:
        del properties["user_id"]
        table.setdefault("x_original_user_id", user_id)
    death = table.pop("x-death", None)
    if death is not None:
        table.setdefault("x_original_death", death)
    for key in [key for key in table if key.startswith(("x-first-death-", "x-last-death-"))]:
        del table[key]
    table.update(extra)
    if table:
        properties["headers"] = table
    return Properties({k: v for k, v in properties.items() if v is not None})


def broker_error(exc: ChannelClosed, what: str) -> QueueError:
    """A channel the broker closed, as the error its reply code means."""
    kind = REPLY_KINDS.get(exc.code, ErrorKind.INTERNAL)
    return QueueError(kind, f"{what}: {exc.text}", retryable=kind is ErrorKind.INTERNAL)


def channel_limit_error(exc: ChannelLimit, needed: int, what: str = "") -> QueueError:
    """A broker whose channel_max is below what luaq opens on one connection: no reconnection
    helps, its configuration must change."""
    reason = str(exc)
    if needed > exc.limit:
        reason = (
            f"the broker allows {exc.limit} channels per connection, luaq needs {needed}: "
            "raise channel_max"
        )
    return QueueError(ErrorKind.UNAVAILABLE, f"{what}: {reason}" if what else reason)
