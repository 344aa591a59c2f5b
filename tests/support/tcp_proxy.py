"""A TCP proxy for network faults in tests: put it between a client and a server (the Kubernetes
API, a broker) and break the network under the client at will.

    async with TcpProxy("127.0.0.1", server_port) as proxy:
        ...connect the client to proxy.port...
        proxy.stall()    # a dead network: connections stay open, no byte goes through
        proxy.resume()   # the network is back: what was held goes through, in order
        proxy.cut()      # every open connection is closed (the client sees them end)
        proxy.refuse()   # every new connection is closed as soon as it is accepted
        proxy.accept()   # new connections work again

`stall(new=False)` stalls only the connections open now, while new ones work: the connections
a NAT or load balancer forgot, silent forever, without a FIN. It runs on the test's event loop;
the client may run anywhere (another thread or process).
"""

from __future__ import annotations

import asyncio
from types import TracebackType


class _Connection:
    def __init__(self, flowing: asyncio.Event) -> None:
        self.flowing = flowing  # set: bytes go through
        self.writers: list[asyncio.StreamWriter] = []
        self.tasks: list[asyncio.Task[None]] = []

    def close(self) -> None:
        for writer in self.writers:
            writer.transport.abort()
        for task in self.tasks:
            task.cancel()


class TcpProxy:
    def __init__(self, host: str, port: int) -> None:
        self.target = (host, port)
        self.port = 0  # where clients connect (127.0.0.1), once started
        self.accepted = 0  # connections accepted so far
        self._flowing = asyncio.Event()  # for the connections to come
        self._flowing.set()
        self._refusing = False
        self._connections: set[_Connection] = set()
        self._server: asyncio.Server | None = None

    async def __aenter__(self) -> TcpProxy:
        self._server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        self.port = self._server.sockets[0].getsockname()[1]
        return self

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        assert self._server is not None
        self._server.close()
        self.cut()
        await self._server.wait_closed()

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def stall(self, new: bool = True) -> None:
        """Hold every byte of the open connections (and of new ones, unless `new` is False)."""
        for connection in self._connections:
            if connection.flowing is self._flowing:  # not already stalled on its own
                connection.flowing = asyncio.Event()
        if new:
            self._flowing.clear()

    def resume(self) -> None:
        """Let bytes through again, on every connection."""
        self._flowing.set()
        for connection in self._connections:
            connection.flowing.set()
            connection.flowing = self._flowing

    def cut(self) -> None:
        """Close every open connection at once (held bytes are dropped)."""
        for connection in list(self._connections):
            connection.close()
        self._connections.clear()

    def refuse(self) -> None:
        self._refusing = True

    def accept(self) -> None:
        self._refusing = False

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.accepted += 1
        if self._refusing:
            writer.transport.abort()
            return
        connection = _Connection(self._flowing)
        connection.writers.append(writer)
        this = asyncio.current_task()
        assert this is not None
        connection.tasks.append(this)  # cut() cancels the connecting too
        self._connections.add(connection)
        try:
            await self._wait(connection)  # a stalled network does not reach the server either
            upstream_reader, upstream_writer = await asyncio.open_connection(*self.target)
        except OSError:
            connection.close()
            self._connections.discard(connection)
            return
        connection.writers.append(upstream_writer)
        connection.tasks = [
            asyncio.create_task(self._pipe(connection, reader, upstream_writer)),
            asyncio.create_task(self._pipe(connection, upstream_reader, writer)),
        ]

    async def _wait(self, connection: _Connection) -> None:
        while not connection.flowing.is_set():
            event = connection.flowing
            await event.wait()  # resume() swaps the event: look again

    async def _pipe(
        self, connection: _Connection, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        try:
            while data := await reader.read(65536):
                await self._wait(connection)
                writer.write(data)
                await writer.drain()
            await self._wait(connection)
            if writer.can_write_eof():
                writer.write_eof()  # half-close, as the other side did
        except (OSError, asyncio.CancelledError):
            connection.close()
        finally:
            if all(task.done() or task is asyncio.current_task() for task in connection.tasks):
                connection.close()
                self._connections.discard(connection)
