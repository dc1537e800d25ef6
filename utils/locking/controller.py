"""The leadership controller: the one place that knows whether this instance is active.

``passive`` -> ``active`` -> (``passive`` again if the lease is lost) ... -> ``stopping``.
One watcher task runs the cycle; every transition is one INFO line; listeners (sd_notify,
metrics) are told. Health, /status and metrics read :meth:`snapshot`; nothing keeps a copy.

While active, *roles* run (polling, the autoposter): started in order on becoming active,
stopped in reverse order before the lock is released.
"""

from __future__ import annotations

import asyncio
import enum
import logging
import os
import socket
import time
from collections.abc import Callable, Sequence
from typing import Any, Protocol

from utils.locking.backend import HolderInfo, Lease, LockBackend

log = logging.getLogger("solobot.leadership")


class Mode(enum.StrEnum):
    PASSIVE = "passive"
    ACTIVE = "active"
    STOPPING = "stopping"


class ActiveRole(Protocol):
    """Something that runs only while this instance leads."""

    name: str

    async def start(self, lease: Lease) -> None: ...

    async def stop(self, *, voluntary: bool) -> None:
        """Stop; *voluntary* means we still hold the lock (shutdown), not that we lost it."""
        ...


Listener = Callable[["Mode", str], None]


class LeadershipController:
    def __init__(
        self,
        backend: LockBackend,
        roles: Sequence[ActiveRole],
        *,
        instance_id: str,
        role_stop_timeout: float = 10.0,
    ) -> None:
        self.backend = backend
        self.roles = list(roles)
        self.instance_id = instance_id
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.started_at = time.time()
        self.role_stop_timeout = role_stop_timeout
        self.mode = Mode.PASSIVE
        self.mode_since = time.time()
        self.epoch = 0
        self.handovers = 0  # times this instance became active
        self.passive_reason = "starting"
        self._listeners: list[Listener] = []
        self._stop = asyncio.Event()
        self._step_down: asyncio.Event = asyncio.Event()
        self._step_down_reason = ""
        self._task: asyncio.Task[None] | None = None
        self._holder_cache: HolderInfo | None = None

    # -- reading -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def is_active(self) -> bool:
        return self.mode is Mode.ACTIVE

    async def holder(self) -> HolderInfo | None:
        """The current holder as the backend sees it (cached if the backend cannot answer)."""
        try:
            self._holder_cache = await asyncio.wait_for(self.backend.holder(), timeout=2.0)
        except Exception:
            log.debug("holder lookup failed", exc_info=True)
        return self._holder_cache

    def snapshot(self) -> dict[str, Any]:
        return {
            "mode": self.mode.value,
            "instance_id": self.instance_id,
            "pid": self.pid,
            "host": self.host,
            "uptime_s": round(time.time() - self.started_at, 3),
            "mode_since": self.mode_since,
            "epoch": self.epoch,
            "handovers": self.handovers,
            "passive_reason": None if self.mode is Mode.ACTIVE else self.passive_reason,
        }

    # -- transitions -------------------------------------------------------------------------

    def _set_mode(self, mode: Mode, detail: str) -> None:
        if mode is self.mode and mode is not Mode.PASSIVE:
            return
        self.mode = mode
        self.mode_since = time.time()
        log.info("mode %s: %s", mode.value, detail)
        for listener in self._listeners:
            try:
                listener(mode, detail)
            except Exception:  # a listener must not break leadership
                log.exception("mode listener failed")

    def step_down(self, reason: str) -> None:
        """Called by a role that found the lease gone (conflict + failed check, fenced write)."""
        if not self._step_down.is_set():
            self._step_down_reason = reason
            self._step_down.set()

    def request_stop(self) -> None:
        self._stop.set()

    # -- the watcher -------------------------------------------------------------------------

    async def run(self) -> None:
        """The one watcher: contend, lead, lose or stop, repeat."""
        self._set_mode(Mode.PASSIVE, f"standby, waiting for the {self.backend.name} lock")
        while not self._stop.is_set():
            lease = await self._acquire_until_stop()
            if lease is None:
                break
            await self._lead(lease)
        self._set_mode(Mode.STOPPING, "shutting down")

    async def _acquire_until_stop(self) -> Lease | None:
        """Wait for the lock (announced once); a failing backend is retried with backoff, quietly."""
        announced = False
        failing = False
        delay = 1.0
        while not self._stop.is_set():
            acquire = asyncio.create_task(self.backend.acquire(), name="solobot-acquire")
            stopper = asyncio.create_task(self._stop.wait())
            if not announced:
                # Say once who we wait for; then stay quiet until something changes.
                done, _ = await asyncio.wait({acquire, stopper}, timeout=0.2,
                                             return_when=asyncio.FIRST_COMPLETED)
                if not done:
                    holder = await self.holder()
                    who = (f"held by pid {holder.pid} on {holder.host} (instance {holder.instance_id})"
                           if holder else "held by another instance")
                    log.info("standby: lock %s; waiting quietly", who)
                announced = True
            await asyncio.wait({acquire, stopper}, return_when=asyncio.FIRST_COMPLETED)
            stopper.cancel()
            if not acquire.done():
                acquire.cancel()
                await asyncio.gather(acquire, return_exceptions=True)
                if acquire.done() and not acquire.cancelled() and acquire.exception() is None:
                    # Acquired in the same instant we were told to stop: let go at once.
                    await self.backend.release(clean=True)
                return None
            try:
                return acquire.result()
            except Exception as exc:  # noqa: BLE001 - e.g. database down: stay passive, retry
                self.passive_reason = f"cannot acquire the lock: {exc}"
                if not failing:
                    log.warning("cannot acquire the %s lock (%s); staying passive and retrying with "
                                "backoff", self.backend.name, exc)
                    failing = True
                else:
                    log.debug("lock acquisition retry in %.0f s: %s", delay, exc)
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=delay)
                except TimeoutError:
                    pass
                delay = min(delay * 2, 30.0)
        return None

    async def _lead(self, lease: Lease) -> None:
        self.epoch = lease.epoch
        self._step_down.clear()
        if not lease.previous_released and self.backend.unclean_takeover_delay:
            # The last holder vanished without saying goodbye; give it time to notice it was cut
            # off and stop polling before we start, so Telegram never sees two pollers.
            await asyncio.sleep(self.backend.unclean_takeover_delay)
        started: list[ActiveRole] = []
        reason = "stopping"
        voluntary = True
        hold = asyncio.create_task(self.backend.hold(), name="solobot-hold")
        try:
            for role in self.roles:
                await role.start(lease)
                started.append(role)
            self.handovers += 1
            self._set_mode(Mode.ACTIVE, f"leading with epoch {lease.epoch}")
            stop = asyncio.create_task(self._stop.wait())
            step = asyncio.create_task(self._step_down.wait())
            done, _ = await asyncio.wait({hold, stop, step}, return_when=asyncio.FIRST_COMPLETED)
            for task in (stop, step):
                task.cancel()
            if hold in done:
                reason, voluntary = hold.result(), False
            elif step in done:
                reason, voluntary = self._step_down_reason, False
        except Exception as exc:  # a role failed to start: step down, retry later
            log.exception("could not start active roles")
            reason, voluntary = f"start failed: {exc}", False
        finally:
            hold.cancel()
            await asyncio.gather(hold, return_exceptions=True)
            if voluntary:
                self._set_mode(Mode.STOPPING, "stopping active work")
            for role in reversed(started):
                try:
                    await asyncio.wait_for(
                        role.stop(voluntary=voluntary), timeout=self.role_stop_timeout
                    )
                except Exception:  # release the lock regardless
                    log.exception("stopping %s failed", role.name)
            await self.backend.release(clean=voluntary)
            self.epoch = 0
        if not self._stop.is_set():
            self.passive_reason = reason
            self._set_mode(Mode.PASSIVE, f"stepped down ({reason}); contending again")
            if not voluntary:
                # Whatever made us step down may still hold; never contend in a tight loop.
                try:
                    await asyncio.wait_for(self._stop.wait(), timeout=1.0)
                except TimeoutError:
                    pass
