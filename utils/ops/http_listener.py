"""An aiohttp listener that nobody on the network can use to stall the process or exhaust its files.

Why: the webhook port faces the internet (through a balancer, or not), and aiohttp's defaults
trust the peer: it inflates a ``Content-Encoding: gzip`` body as it arrives (1 MB on the wire,
1 GB inflated, before any handler could answer 401), waits forever for a request's headers, keeps
an idle connection for an hour, accepts connections until ``accept()`` fails with "Too many open
files" (then the database and lock connections fail too, and asyncio logs an ERROR per attempt),
and names its version in a ``Server`` header. Here:

* **no inflating**: bodies are handed over as they came (``auto_decompress=False``); a handler
  refuses an encoded body (Telegram sends plain JSON), after checking the secret;
* **a connection cap** (:func:`connection_cap`, below the process's open-file limit with room for
  the database and lock connections): one more connection is accepted and closed at once, without
  an aiohttp handler; the first refusal of an episode is logged (WARNING), then nothing until a
  tenth of the slots is free again (one INFO line with how many were refused);
* **time limits**: a connection whose first request's headers have not arrived within
  :data:`HEADER_TIMEOUT` is closed; an idle keep-alive connection after :data:`KEEPALIVE_TIMEOUT`;
  a handler bounds its own body read;
* **no version**: ``Server: solobot``.

The open-file limit is raised to its hard maximum at start (what systemd's ``LimitNOFILE`` and
``ulimit -Hn`` allow): Python keeps the soft limit it inherited, often 1024.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import resource
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from utils.base.episode import FailureEpisode

log = logging.getLogger("solobot.http")

#: Seconds a new connection may take to send a complete request head.
HEADER_TIMEOUT = 5.0
#: Seconds an idle keep-alive connection is kept (a balancer reopens one when it needs it).
KEEPALIVE_TIMEOUT = 30.0
#: Seconds aiohttp keeps reading (and discarding) the rest of a body it answered without reading.
LINGERING_TIME = 2.0
#: Connections the kernel queues for a listener, and so the most asyncio accepts in one go:
#: each takes a file before any protocol can refuse it.
ACCEPT_BACKLOG = 128
#: Open files kept free of HTTP connections: database pool, LISTEN and lock connections, the
#: lock files, the Bot API session's connections, log and SQLite files, with room to spare (256),
#: plus the accept batches in flight (asyncio accepts a batch per readiness of the listening
#: socket and makes their transports in tasks of the next loop turn, and a refused batch's
#: sockets close a turn after that): a flood at the cap meets EMFILE otherwise (measured: asyncio's
#: "socket.accept() out of system resource" with a 256-file reserve and 2000 idle connections, and
#: again, 3 runs in 4 on a loaded 2-core machine, with two batches reserved).
ACCEPT_BATCHES_IN_FLIGHT = 4
RESERVED_FILES = 256 + ACCEPT_BATCHES_IN_FLIGHT * ACCEPT_BACKLOG
#: The fewest connections a listener allows, whatever the open-file limit says.
MIN_CONNECTIONS = 16
#: An episode at the cap ends when a tenth of the slots are free again (not at the first free
#: slot: under a sustained flood that would log a pair of lines per closed connection).
EPISODE_END_FRACTION = 10
#: Instead of a version, what the ``Server`` header says.
SERVER_HEADER = "solobot"


def raise_open_file_limit() -> int:
    """Raise the soft ``RLIMIT_NOFILE`` to the hard one; return the soft limit now in force."""
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if soft != hard and (hard == resource.RLIM_INFINITY or soft < hard):
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
            soft = hard
        except (ValueError, OSError) as exc:
            log.debug("could not raise the open-file limit from %d to %d: %s", soft, hard, exc)
    return soft


def connection_cap(wanted: int, open_file_limit: int) -> int:
    """Connections one listener may hold: *wanted*, but never into the files the rest needs (pure)."""
    if open_file_limit == resource.RLIM_INFINITY or open_file_limit < 0:
        return wanted
    return max(MIN_CONNECTIONS, min(wanted, open_file_limit - RESERVED_FILES))


class _Refused(asyncio.Protocol):
    """A connection over the cap: closed as soon as it is made, nothing read, nothing logged."""

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        transport.close()


class _Counted(asyncio.Protocol):
    """Wraps aiohttp's handler of one connection: counted, and closed if no request head came in time."""

    def __init__(self, inner: RequestHandler, guard: ConnectionGuard) -> None:
        self.inner = inner
        self.guard = guard
        self.transport: asyncio.Transport | None = None
        self.started = False
        self._timer: asyncio.TimerHandle | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        assert isinstance(transport, asyncio.Transport)
        self.transport = transport
        self.guard.opened(self)
        self._timer = asyncio.get_running_loop().call_later(self.guard.header_timeout, self._expire)
        self.inner.connection_made(transport)

    def _expire(self) -> None:
        if not self.started and self.transport is not None:
            self.transport.close()

    def request_started(self) -> None:
        self.started = True
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None

    def data_received(self, data: bytes) -> None:
        self.inner.data_received(data)

    def eof_received(self) -> bool | None:
        self.inner.eof_received()
        return None  # close the transport (aiohttp's handler says nothing else)

    def pause_writing(self) -> None:
        self.inner.pause_writing()

    def resume_writing(self) -> None:
        self.inner.resume_writing()

    def connection_lost(self, exc: Exception | None) -> None:
        if self._timer is not None:
            self._timer.cancel()
        self.guard.closed(self)
        self.inner.connection_lost(exc)


class ConnectionGuard:
    """The cap and the head timeout of one listener, and its once-per-episode refusal log."""

    def __init__(self, name: str, cap: int, *, header_timeout: float = HEADER_TIMEOUT) -> None:
        self.name = name
        self.cap = cap
        self.header_timeout = header_timeout
        self.open: dict[asyncio.Transport, _Counted] = {}
        self.refused = 0  # over the whole life (for /metrics and tests)
        self._refusals = FailureEpisode()  # refused connections of the current episode at the cap

    def protocol_factory(self, server: Callable[[], RequestHandler]) -> Callable[[], asyncio.Protocol]:
        def make() -> asyncio.Protocol:
            if len(self.open) >= self.cap:
                self.refused += 1
                if self._refusals.failed():
                    log.warning("%s: %d connections open, the cap; refusing new ones until some close",
                                self.name, self.cap)
                return _Refused()
            return _Counted(server(), self)
        return make

    def opened(self, conn: _Counted) -> None:
        assert conn.transport is not None
        self.open[conn.transport] = conn

    def closed(self, conn: _Counted) -> None:
        if conn.transport is not None:
            self.open.pop(conn.transport, None)
        if self._refusals.ongoing and len(self.open) <= self.cap - max(1, self.cap // EPISODE_END_FRACTION):
            log.info("%s: below the connection cap again; %d connection(s) refused meanwhile",
                     self.name, self._refusals.recovered())

    @web.middleware
    async def middleware(self, request: web.Request,
                         handler: Callable[[web.Request], Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        conn = self.open.get(request.transport) if request.transport is not None else None
        if conn is not None:
            conn.request_started()
        return await handler(request)


class _NoVersionRequest(web.Request):
    """A request whose every response says ``Server: solobot``: also the 400s aiohttp writes
    itself for malformed requests, which no application signal sees."""

    async def _prepare_hook(self, response: web.StreamResponse) -> None:
        response.headers["Server"] = SERVER_HEADER
        await super()._prepare_hook(response)


class _GuardedSite(web.TCPSite):
    """``TCPSite`` whose connections go through a :class:`ConnectionGuard`."""

    def __init__(self, runner: web.AppRunner, host: str, port: int, guard: ConnectionGuard) -> None:
        super().__init__(runner, host, port)
        self.guard = guard

    async def start(self) -> None:
        await web.BaseSite.start(self)  # registers the site with the runner
        server = self._runner.server
        assert server is not None and isinstance(self._runner, web.AppRunner)
        # aiohttp's own hook for the request class (``_cls``): every response, errors included.
        server.request_factory = functools.partial(self._runner.app._make_request, _cls=_NoVersionRequest)
        self._server = await asyncio.get_running_loop().create_server(
            self.guard.protocol_factory(server), self._host, self._port, backlog=ACCEPT_BACKLOG)


class ListenError(Exception):
    """The port cannot be bound (in use, no permission)."""


class GuardedListener:
    """One aiohttp application on *host*:*port*, behind the guards above."""

    def __init__(self, name: str, host: str, port: int, *, max_connections: int) -> None:
        self.name = name
        self.host = host
        self.port = port
        self.guard = ConnectionGuard(f"{name} on {host}:{port}",
                                     connection_cap(max_connections, raise_open_file_limit()))
        self._runner: web.AppRunner | None = None

    def application(self, **kwargs: Any) -> web.Application:
        """An application with the guard's middleware."""
        return web.Application(middlewares=[self.guard.middleware], **kwargs)

    async def start(self, app: web.Application) -> None:
        runner = web.AppRunner(app, access_log=None, auto_decompress=False,
                               keepalive_timeout=KEEPALIVE_TIMEOUT, lingering_time=LINGERING_TIME)
        await runner.setup()
        try:
            await _GuardedSite(runner, self.host, self.port, self.guard).start()
        except OSError as exc:
            await runner.cleanup()
            raise ListenError(f"{self.name} {self.port} on {self.host}: cannot listen ({exc.strerror})") from exc
        self._runner = runner
        log.debug("%s listening on %s:%d (at most %d connections)", self.name, self.host, self.port,
                  self.guard.cap)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
