"""The bot's HTTP session, gated by the lease twice: when a call starts, and at the last moment.

:class:`~utils.base.lease.LeaseGate` checks the lease as an aiogram request middleware, when a
Bot API call starts. Between that check and the bytes leaving the socket a busy event loop runs
other tasks (handlers parsing, replying) for milliseconds, and a process paused (SIGSTOP) in that
window would send a stale request when it resumes. So the lease is checked once more when aiohttp
has a connection in hand, right before it writes the request (the connector's ``connect``): what
remains is one turn of the event loop: aiohttp buffers the headers and writes them with the body
in a task of its own. A process paused in that turn would still send on resume, so the body's
write asks the lease a third time, synchronously unless it went stale (a pause longer than the
renew deadline): then it is verified again before a byte leaves, or the connection is closed
unwritten and the call fails. A stale lease is verified again at each check (one round trip on the
lock's own connection) or the request is refused with :class:`~utils.base.lease.LeaseLost`, and
the connection goes back to the pool unused.
"""

from __future__ import annotations

from typing import Any, TypeVar

from aiogram import Bot
from aiogram.client.session.aiohttp import AiohttpSession
from aiogram.client.session.middlewares.base import NextRequestMiddlewareType, RequestMiddlewareType
from aiogram.methods import Response, TelegramMethod
from aiohttp import ClientRequest, ClientSession, ClientTimeout, TCPConnector
from aiohttp.abc import AbstractStreamWriter
from aiohttp.connector import Connection

from utils.base.lease import LeaseGate, LeaseLost

T = TypeVar("T")


def gated_connector(base: type[TCPConnector], gate: LeaseGate) -> type[TCPConnector]:
    """A subclass of *base* (aiogram picks it: plain TCP, or a proxy's) that checks *gate*."""

    class GatedConnector(base):  # type: ignore[valid-type,misc]
        async def connect(self, req: ClientRequest, traces: list[Any], timeout: ClientTimeout) -> Connection:
            conn: Connection = await super().connect(req, traces, timeout)
            try:
                await gate.check()
            except BaseException:
                conn.release()
                raise
            return conn

    GatedConnector.__name__ = f"Gated{base.__name__}"
    return GatedConnector


def gated_request(gate: LeaseGate) -> type[ClientRequest]:
    """aiohttp's request whose body (with the buffered headers) is written only under a fresh lease."""

    class GatedClientRequest(ClientRequest):
        async def write_bytes(self, writer: AbstractStreamWriter, conn: Connection,
                              content_length: int | None = None) -> None:
            lease = gate.lease
            if lease is None or not lease.fresh():  # paused since the connector's check, or lost
                try:
                    await gate.check()
                except LeaseLost:
                    conn.close()  # nothing written: the call fails as a dropped connection
                    return
            await super().write_bytes(writer, conn, content_length)

    return GatedClientRequest


class ResponseModelPin:
    """Keeps aiogram's ``Response[T]`` models alive: a request middleware, first in the chain.

    aiogram parses every answer with ``Response[method.__returning__]``; pydantic caches such a
    parametrised model only weakly, so a garbage collection drops it and the next call builds the
    class again (its whole schema: about a quarter of the CPU of a busy bot, measured with
    py-spy). One strong reference per returned type ends that.
    """

    def __init__(self) -> None:
        self._models: dict[Any, Any] = {}

    async def __call__(
        self, make_request: NextRequestMiddlewareType[T], bot: Bot, method: TelegramMethod[T]
    ) -> Response[T]:
        returning = method.__returning__
        if returning not in self._models:
            self._models[returning] = Response[returning]  # type: ignore[valid-type]
        return await make_request(bot, method)


class GatedAiohttpSession(AiohttpSession):
    """aiogram's aiohttp session with the lease gate as middleware and in its connector.

    *flood* (``utils.sending.limiter.FloodControl``) runs after the gate: a standby is refused
    before it could queue a send, and a send that waited for its slot meets the gate again.
    """

    def __init__(self, gate: LeaseGate, *, flood: RequestMiddlewareType | None = None, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate
        self.middleware(ResponseModelPin())
        self.middleware(gate)
        if flood is not None:
            self.middleware(flood)
        # aiogram builds its ClientSession from these two; only the connector class changes.
        self._connector_type = gated_connector(self._connector_type, gate)
        self._request_class = gated_request(gate)

    async def create_session(self) -> ClientSession:
        """aiogram's session, with the request class that asks the lease before the body's write."""
        session = await super().create_session()
        session._request_class = self._request_class  # aiogram passes no request_class of its own
        return session
