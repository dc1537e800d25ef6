"""The bot's HTTP session, gated by the lease twice: when a call starts, and at the last moment.

:class:`~utils.locking.lease.LeaseGate` checks the lease as an aiogram request middleware, when a
Bot API call starts. Between that check and the bytes leaving the socket a busy event loop runs
other tasks (handlers parsing, replying) for milliseconds, and a process paused (SIGSTOP) in that
window would send a stale request when it resumes. So the lease is checked once more when aiohttp
has a connection in hand, right before it writes the request: what remains is a few microseconds
of code with no wait in it. A stale lease is verified again there (one round trip on the lock's own
connection) or the request is refused with :class:`~utils.locking.lease.LeaseLost`.
"""

from __future__ import annotations

from types import SimpleNamespace
from typing import Any

import aiohttp
from aiogram.client.session.aiohttp import AiohttpSession

from utils.locking.lease import LeaseGate


class GatedAiohttpSession(AiohttpSession):
    """aiogram's aiohttp session with the lease gate as middleware and as a pre-write check."""

    def __init__(self, gate: LeaseGate, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.gate = gate
        self.middleware(gate)
        trace = aiohttp.TraceConfig()
        # Reused connections (the usual case) are checked right before the write; new ones
        # before connecting (a check after connecting could not give the socket back).
        trace.on_connection_reuseconn.append(self._last_moment)
        trace.on_connection_create_start.append(self._last_moment)
        trace.freeze()
        self._trace = trace
        self._traced: aiohttp.ClientSession | None = None

    async def create_session(self) -> aiohttp.ClientSession:
        session = await super().create_session()
        if session is not self._traced:
            # aiogram builds the ClientSession itself, without trace_configs; aiohttp reads the
            # list at each request, so adding ours to a fresh session is enough.
            session._trace_configs.append(self._trace)
            self._traced = session
        return session

    async def _last_moment(self, _session: aiohttp.ClientSession, _ctx: SimpleNamespace,
                           _params: object) -> None:
        await self.gate.check()
