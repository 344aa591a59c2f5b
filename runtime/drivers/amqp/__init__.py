"""RabbitMQ and any AMQP 0-9-1 broker, on luaq's own AMQP client (client.py).

`mapping` says what the broker needs to know (headers to properties and back, queue options to
declare arguments, reply codes to error kinds: nothing else leaves the driver); `link` keeps a
connection up and maps the client's failures; `subscription` consumes, coalescing consecutive
acks into one `multiple` ack per loop iteration; `driver` puts them together.
"""

from .driver import AmqpDriver

__all__ = ["AmqpDriver"]
