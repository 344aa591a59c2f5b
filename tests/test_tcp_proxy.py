"""tests/support/tcp_proxy.py, the network faults the operator and broker tests inject, against an
echo server."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio
from tcp_proxy import TcpProxy

QUIET = 0.2  # how long a stalled connection is watched for bytes that must not come


async def _echo(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    while data := await reader.read(1024):
        writer.write(data)
        await writer.drain()
    writer.close()


@pytest_asyncio.fixture
async def proxy() -> AsyncIterator[TcpProxy]:
    server = await asyncio.start_server(_echo, "127.0.0.1", 0)
    async with server, TcpProxy("127.0.0.1", server.sockets[0].getsockname()[1]) as running:
        yield running


async def connect(proxy: TcpProxy) -> tuple[asyncio.StreamReader, asyncio.StreamWriter]:
    return await asyncio.open_connection("127.0.0.1", proxy.port)


async def echoes(reader: asyncio.StreamReader, writer: asyncio.StreamWriter, data: bytes) -> bytes:
    writer.write(data)
    return await asyncio.wait_for(reader.readexactly(len(data)), 5)


async def test_bytes_go_through_both_ways(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    assert await echoes(reader, writer, b"ping") == b"ping"
    assert proxy.accepted == 1


async def test_a_stall_holds_the_bytes_and_resume_delivers_them(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    assert await echoes(reader, writer, b"before") == b"before"
    proxy.stall()
    writer.write(b"held")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET)
    late_reader, late_writer = await connect(proxy)  # accepted, but stalled as well
    late_writer.write(b"late")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(late_reader.read(1), QUIET)
    proxy.resume()
    assert await asyncio.wait_for(reader.readexactly(4), 5) == b"held"
    assert await asyncio.wait_for(late_reader.readexactly(4), 5) == b"late"


async def test_a_stall_of_the_open_connections_only_lets_new_ones_work(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    proxy.stall(new=False)
    writer.write(b"lost")
    with pytest.raises(TimeoutError):
        await asyncio.wait_for(reader.read(1), QUIET)
    new_reader, new_writer = await connect(proxy)
    assert await echoes(new_reader, new_writer, b"fresh") == b"fresh"


async def test_cut_closes_the_open_connections(proxy: TcpProxy) -> None:
    reader, writer = await connect(proxy)
    assert await echoes(reader, writer, b"x") == b"x"
    proxy.cut()
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    new_reader, new_writer = await connect(proxy)
    assert await echoes(new_reader, new_writer, b"y") == b"y"


async def test_refused_connections_close_at_once_until_accepted_again(proxy: TcpProxy) -> None:
    proxy.refuse()
    reader, _ = await connect(proxy)
    with pytest.raises((ConnectionError, asyncio.IncompleteReadError)):
        await asyncio.wait_for(reader.readexactly(1), 5)
    proxy.accept()
    reader, writer = await connect(proxy)
    assert await echoes(reader, writer, b"z") == b"z"
