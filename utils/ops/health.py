"""HTTP health endpoint (aiohttp): ``/health`` always 200 in both modes, ``/ready`` 200 only when
active and polling is healthy (for load balancers and Kubernetes), ``/metrics`` Prometheus text.

It only reads: what it reports is the status snapshot (``utils/ops/status_report.py``), the same
one /metrics and the /status command read.
Other parts may mount their own routes on the same port (*routes*: the webhook receiver, when a
PaaS exposes one port per process); the default for webhook mode is a port of their own
(``WEBHOOK_PORT``, :class:`RouteServer`), so that what operators read is not what the internet
reaches. Both listen behind :class:`utils.ops.http_listener.GuardedListener` (connection cap, time
limits, no inflating, no version header).

Everything ``/health`` says passes through *scrub* (the configuration's redaction: no token, no
password; on a port shared with the webhook, no database user either).
"""

from __future__ import annotations

import json
import logging
import re
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

from utils.ops.http_listener import GuardedListener, ListenError

log = logging.getLogger("solobot.health")

#: Connections the operators' port holds at once (probes and scrapers); with the webhook's routes
#: on it too, the webhook's allowance.
OPS_HTTP_CONNECTIONS = 64


#: ``(user u)`` in a database location: the user name is for operators, not for the internet.
DATABASE_USER = re.compile(r" \(user [^)]*\)")


def scrubber(redact: Callable[[str], str], *, public: bool) -> Callable[[str], str]:
    """What /health and /ready pass their text through: the redaction, and on a *public* port
    (shared with the webhook) no database user name either."""
    if not public:
        return redact
    return lambda text: DATABASE_USER.sub("", redact(text))


class HealthPortError(ListenError):
    """The health port cannot be bound (in use, no permission)."""


class RouteServer:
    """Other routes (the webhook's) on a port of their own, behind the same guards."""

    def __init__(self, setting: str, host: str, port: int, routes: Sequence[web.AbstractRouteDef], *,
                 max_connections: int) -> None:
        self.listener = GuardedListener(setting, host, port, max_connections=max_connections)
        self._routes = list(routes)

    async def start(self) -> None:
        app = self.listener.application()
        app.router.add_routes(self._routes)
        await self.listener.start(app)

    async def stop(self) -> None:
        await self.listener.stop()


class HealthServer:
    def __init__(
        self,
        host: str,
        port: int,
        *,
        status: Callable[[], Awaitable[dict[str, Any]]],
        ready: Callable[[], tuple[bool, str]],
        metrics: Callable[[], Awaitable[tuple[bytes, str]]] | None = None,
        routes: Sequence[web.AbstractRouteDef] = (),
        scrub: Callable[[str], str] = lambda text: text,
        max_connections: int = OPS_HTTP_CONNECTIONS,
    ) -> None:
        self.host = host
        self.port = port
        self._status = status
        self._ready = ready
        self._metrics = metrics
        self._routes = list(routes)
        self._scrub = scrub
        self.listener = GuardedListener("HEALTH_PORT", host, port, max_connections=max_connections)

    async def start(self) -> None:
        app = self.listener.application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready_handler)
        if self._metrics is not None:
            app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_routes(self._routes)
        try:
            await self.listener.start(app)
        except ListenError as exc:
            raise HealthPortError(
                f"{exc}; another process uses it? Pick another HEALTH_PORT or set HEALTH_PORT=0 to disable"
            ) from exc
        log.debug("health endpoint on http://%s:%d/health", self.host, self.port)

    async def stop(self) -> None:
        await self.listener.stop()

    async def _health(self, _request: web.Request) -> web.Response:
        body = await self._status()
        return web.Response(text=self._scrub(json.dumps(body)), content_type="application/json")

    async def _ready_handler(self, _request: web.Request) -> web.Response:
        ok, why = self._ready()
        body = {"ready": ok, "reason": self._scrub(why)}
        return web.Response(
            status=200 if ok else 503, text=json.dumps(body), content_type="application/json"
        )

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        assert self._metrics is not None
        payload, content_type = await self._metrics()
        response = web.Response(body=payload)
        response.headers["Content-Type"] = content_type
        return response
