"""HTTP health endpoint (aiohttp): ``/health`` always 200 in both modes, ``/ready`` 200 only when
active and polling is healthy (for load balancers and Kubernetes), ``/metrics`` Prometheus text.

It only reads: the state it reports comes from the leadership controller and the polling stats.
Other parts mount their own routes on the same port (*routes*: the webhook receiver), because a
PaaS exposes one port per process.
"""

from __future__ import annotations

import json
import logging
from collections.abc import Awaitable, Callable, Sequence
from typing import Any

from aiohttp import web

log = logging.getLogger("solobot.health")


class HealthPortError(Exception):
    """The health port cannot be bound (in use, no permission)."""


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
    ) -> None:
        self.host = host
        self.port = port
        self._status = status
        self._ready = ready
        self._metrics = metrics
        self._routes = list(routes)
        self._runner: web.AppRunner | None = None

    async def start(self) -> None:
        app = web.Application()
        app.router.add_get("/health", self._health)
        app.router.add_get("/ready", self._ready_handler)
        if self._metrics is not None:
            app.router.add_get("/metrics", self._metrics_handler)
        app.router.add_routes(self._routes)
        runner = web.AppRunner(app, access_log=None)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise HealthPortError(
                f"HEALTH_PORT {self.port} on {self.host}: cannot listen ({exc.strerror}); "
                "another process uses it? Pick another HEALTH_PORT or set HEALTH_PORT=0 to disable"
            ) from exc
        self._runner = runner
        log.debug("health endpoint on http://%s:%d/health", self.host, self.port)

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def _health(self, _request: web.Request) -> web.Response:
        body = await self._status()
        return web.Response(text=json.dumps(body), content_type="application/json")

    async def _ready_handler(self, _request: web.Request) -> web.Response:
        ok, why = self._ready()
        body = {"ready": ok, "reason": why}
        return web.Response(
            status=200 if ok else 503, text=json.dumps(body), content_type="application/json"
        )

    async def _metrics_handler(self, _request: web.Request) -> web.Response:
        assert self._metrics is not None
        payload, content_type = await self._metrics()
        response = web.Response(body=payload)
        response.headers["Content-Type"] = content_type
        return response
