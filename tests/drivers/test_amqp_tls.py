"""The AMQP driver over TLS: `amqps://` and the entry's `tls` options.

The RabbitMQ under test listens in plain TCP only, and giving it a TLS listener would mean
rewriting its configuration and restarting it under the other tests. So a TLS terminator with
certificates from a test CA (trustme) sits in front of it: everything past the handshake is the
real broker.
"""

from __future__ import annotations

import asyncio
import contextlib
import ssl
from collections.abc import AsyncIterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from uuid import uuid4

import pytest
import trustme
from broker import delete_queues, driver_entry, queue_entry
from luaq.runtime.drivers.amqp import AmqpDriver
from luaq.runtime.errors import ErrorKind, QueueError

SERVER_NAME = "broker.test"  # the name on the terminator's certificate, not 127.0.0.1


@dataclass
class Terminator:
    port: int
    ca: trustme.CA
    url: str


async def _relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(OSError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    writer.close()


@contextlib.asynccontextmanager
async def terminator(client_certs: bool = False) -> AsyncIterator[Terminator]:
    """TLS in front of the broker on 127.0.0.1:5672; with `client_certs`, only clients with a
    certificate from the same CA get through."""
    ca = trustme.CA()
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    ca.issue_cert(SERVER_NAME).configure_cert(context)
    if client_certs:
        ca.configure_trust(context)
        context.verify_mode = ssl.CERT_REQUIRED
    tasks: set[asyncio.Task[None]] = set()

    async def relay(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", 5672)
        except OSError:
            writer.close()
            return
        for pipe in (_relay(reader, up_writer), _relay(up_reader, writer)):
            task = asyncio.create_task(pipe)
            tasks.add(task)
            task.add_done_callback(tasks.discard)

    server = await asyncio.start_server(relay, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    try:
        yield Terminator(port, ca, f"amqps://guest:guest@127.0.0.1:{port}/")
    finally:
        server.close()
        for task in list(tasks):
            task.cancel()


def driver_for(url: str, **tls: Any) -> AmqpDriver:
    return AmqpDriver(driver_entry(url=url, tls=tls))


async def round_trip(driver: AmqpDriver) -> None:
    """Start, declare, publish (confirmed by the broker), count it; then clean up."""
    name = f"luaq-test-tls-{uuid4().hex[:12]}"
    queue = queue_entry(name)
    await driver.start()
    try:
        await driver.declare(queue)
        await driver.publish(queue, b'{"n": 1}', {"message_id": "tls-1"}, "application/json")
        assert (await driver.info(queue)).message_count == 1
    finally:
        await driver.close()
        await delete_queues(name)


async def test_verified_tls_with_an_inline_ca_and_a_server_name() -> None:
    async with terminator() as tls:
        ca = tls.ca.cert_pem.bytes().decode()
        await round_trip(driver_for(tls.url, ca=ca, server_name=SERVER_NAME))


async def test_a_ca_from_a_file_and_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    async with terminator() as tls:
        path = tmp_path / "ca.pem"
        tls.ca.cert_pem.write_to_path(str(path))
        await round_trip(driver_for(tls.url, ca=f"file://{path}", server_name=SERVER_NAME))
        monkeypatch.setenv("LUAQ_TEST_CA", tls.ca.cert_pem.bytes().decode())
        driver = driver_for(tls.url, ca="${env:LUAQ_TEST_CA}", server_name=SERVER_NAME)
        await round_trip(driver)


async def test_a_certificate_for_another_name_is_refused() -> None:
    async with terminator() as tls:
        driver = driver_for(tls.url, ca=tls.ca.cert_pem.bytes().decode())  # no server_name
        with pytest.raises(QueueError, match="certificate") as refused:
            await driver.start()
        assert refused.value.kind is ErrorKind.UNAVAILABLE


async def test_an_unknown_ca_is_refused_unless_verification_is_off() -> None:
    async with terminator() as tls:
        with pytest.raises(QueueError, match="certificate verify failed"):
            await driver_for(tls.url, server_name=SERVER_NAME).start()
        await round_trip(driver_for(tls.url, insecure_skip_verify=True))


async def test_client_certificates_inline(monkeypatch: pytest.MonkeyPatch) -> None:
    async with terminator(client_certs=True) as tls:
        ca = tls.ca.cert_pem.bytes().decode()
        with pytest.raises(QueueError, match="before the AMQP handshake") as refused:
            await driver_for(tls.url, ca=ca, server_name=SERVER_NAME).start()
        assert refused.value.kind is ErrorKind.UNAVAILABLE

        client = tls.ca.issue_cert("worker.test")
        monkeypatch.setenv("LUAQ_TEST_KEY", client.private_key_pem.bytes().decode())
        cert = "".join(blob.bytes().decode() for blob in client.cert_chain_pems)
        driver = driver_for(
            tls.url, ca=ca, server_name=SERVER_NAME, cert=cert, key="${env:LUAQ_TEST_KEY}"
        )
        await round_trip(driver)
