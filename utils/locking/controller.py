"""The leadership controller: the one place that knows whether this instance is active.

``passive`` -> ``active`` -> (``passive`` again if the lease is lost) ... -> ``stopping``.
One watcher task runs the cycle; every transition is one INFO line; listeners (sd_notify,
metrics) are told. Health, /status and metrics read :meth:`snapshot`; nothing keeps a copy.

While active, *roles* run (polling or webhook adoption, the autoposter): started in order on
becoming active, stopped in reverse order before the lock is released. The term is a
:class:`~utils.base.lease.Lease`: the controller puts it in the :class:`LeaseGate` of the bot's
session while the roles run, so no Bot API call leaves without a recently verified lease, and
ends it only after the roles stopped (draining handlers still reply).

Each term is one :class:`asyncio.TaskGroup`: the lease keeping runs in it beside the roles, from
before their start until after their stop. Everything that ends a term arrives as one of two
events - a stop request, or a step-down (a role's, or the lease's own ``on_lost``) - so the term
waits for those with :func:`~utils.base.interrupt.until_set` rather than a hand-written race.
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

from utils.base.episode import FailureEpisode
from utils.base.interrupt import Interrupted, set_within, until_set
from utils.base.lease import Lease, LeaseGate
from utils.base.lookup import HEALTH_LOOKUP_TIMEOUT, BoundedLookup, within
from utils.locking.backend import Grant, HolderInfo, LockBackend
from utils.state.leader import Takeover

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

#: A standby that has not got the lock after this long says once whom it waits for.
ANNOUNCE_AFTER = 0.2
#: Backoff for a lock backend that fails (database down): from 1 s, doubling, capped low so a
#: database that comes back has a leader again within seconds.
RETRY_FIRST, RETRY_MAX = 1.0, 5.0
#: After losing the lease, wait this long before contending again (never a tight loop).
PAUSE_AFTER_LOSS = 1.0


class LeadershipController:
    def __init__(
        self,
        backend: LockBackend,
        roles: Sequence[ActiveRole],
        *,
        instance_id: str,
        role_stop_timeout: float = 10.0,
        gate: LeaseGate | None = None,
    ) -> None:
        self.backend = backend
        self.roles = list(roles)
        self.instance_id = instance_id
        self.pid = os.getpid()
        self.host = socket.gethostname()
        self.started_at = time.time()
        self.role_stop_timeout = role_stop_timeout
        self.gate = gate or LeaseGate()
        self.lease: Lease | None = None
        self.mode = Mode.PASSIVE
        self.mode_since = time.time()
        self.epoch = 0
        self.handovers = 0  # times this instance took over from an earlier leader (not a bot's first term)
        self.passive_reason = "starting"
        self._listeners: list[Listener] = []
        self._stop = asyncio.Event()
        self._step_down: asyncio.Event = asyncio.Event()
        self._step_down_reason = ""
        self._holder_cache: HolderInfo | None = None
        self._holder_lookup = BoundedLookup(backend.holder, HEALTH_LOOKUP_TIMEOUT, name="holder lookup")
        self._warned_state: str | None = None

    # -- reading -----------------------------------------------------------------------------

    def add_listener(self, listener: Listener) -> None:
        self._listeners.append(listener)

    @property
    def is_active(self) -> bool:
        return self.mode is Mode.ACTIVE

    async def holder(self) -> HolderInfo | None:
        """The current holder as the backend sees it (cached if the backend cannot answer)."""
        try:
            self._holder_cache = await self._holder_lookup()
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
            "passive_reason": None if self.mode is Mode.ACTIVE else self._passive_words(),
        }

    def _passive_words(self) -> str:
        note = self.backend.note
        return f"{self.passive_reason}; {note}" if note else self.passive_reason

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
            grant = await self._acquire_until_stop()
            if grant is None:
                break
            await self._lead(grant)
        self._set_mode(Mode.STOPPING, "shutting down")

    async def _acquire_until_stop(self) -> Grant | None:
        """Wait for the lock (announced once); a failing backend is retried with backoff, quietly.

        ``passive_reason`` always says what this standby does now: waiting (for whom), or why
        it cannot wait (the backend's error).
        """
        announced = False
        failing = FailureEpisode()
        delay = RETRY_FIRST

        async def announce() -> None:
            """Still waiting after a moment: say once whom for (and that a failing backend answers)."""
            nonlocal announced, delay
            await asyncio.sleep(ANNOUNCE_AFTER)
            holder = await self.holder()
            if holder is not None and holder.instance_id == self.instance_id:
                return  # the lock is ours already: the takeover's steps are under way
            self._check_shared_state(holder)
            who = (f"held by {holder.describe()}" if holder else "held by another instance")
            self.passive_reason = f"standby: lock {who}"
            if failing.recovered():
                log.info("the %s lock backend answers again; %s", self.backend.name, self.passive_reason)
                delay = RETRY_FIRST
            elif not announced:
                # Say once who we wait for; then stay quiet until something changes.
                log.info("%s; waiting quietly", self.passive_reason)
            announced = True

        while not self._stop.is_set():
            self.passive_reason = f"standby: waiting for the {self.backend.name} lock"
            acquiring = asyncio.create_task(self.backend.acquire(), name="solobot-acquire")
            announcer = asyncio.create_task(announce(), name="solobot-announce")
            try:
                return await until_set(self._stop, acquiring)
            except Interrupted:
                if not acquiring.cancelled() and acquiring.exception() is None:
                    # Acquired in the same instant we were told to stop: let go at once.
                    await self.backend.release(clean=True)
                return None
            except Exception as exc:  # noqa: BLE001 - e.g. database down: stay passive, retry
                why = self.backend.describe_failure(exc)
                self.passive_reason = f"cannot acquire the {self.backend.name} lock: {why}"
                if failing.failed():
                    log.warning("%s; staying passive and retrying with backoff", self.passive_reason)
                else:
                    log.debug("lock acquisition retry in %.0f s: %s", delay, why)
                self.passive_reason += f" (retrying in {delay:.0f} s)"
            finally:
                announcer.cancel()
            await set_within(self._stop, delay)
            delay = min(delay * 2, RETRY_MAX)
        return None

    def _check_shared_state(self, holder: HolderInfo | None) -> None:
        """One WARNING if the holder uses another state database than ours (a missing volume)."""
        theirs, ours = (holder.state_id if holder else None), self.backend.state_id
        if not theirs or not ours or theirs == ours or self._warned_state == theirs:
            return
        self._warned_state = theirs
        log.warning(
            "the active instance (%s) uses another state database than this one: the epochs, the "
            "update inbox and the post states do not carry across a handover, so the exactly-once "
            "guarantees do not hold. Give every instance of the bot the same STATE_DIR (in "
            "containers: mount the same state volume as well as the lock volume)",
            holder.describe() if holder else "?",
        )

    async def _lead(self, grant: Grant) -> None:
        """One term, as one :class:`asyncio.TaskGroup`: the lease keeping runs beside the roles
        from their start until the roles have stopped, and a failure of either ends both."""
        takeover = grant.takeover
        self.epoch = takeover.epoch
        self._step_down.clear()
        lease = Lease(
            takeover.epoch, verify=self.backend.heartbeat, renew_deadline=self.backend.renew_deadline,
            on_lost=self.step_down, previous_released=takeover.previous_released,
        )
        delay = self.backend.takeover_delay(grant)
        if delay:
            # The last holder vanished while its lease may still run; give a cut-off holder time
            # to notice and stop, so Telegram never sees two pollers.
            log.debug("previous holder left uncleanly; waiting %.2f s before acting", delay)
            await set_within(self._stop, delay)
        started: list[ActiveRole] = []
        reason, voluntary = "stopping", True
        self.lease = self.gate.lease = lease
        try:
            async with asyncio.TaskGroup() as term:
                keeping = term.create_task(self._keep(lease), name="solobot-hold")
                try:
                    if not self._stop.is_set():
                        reason, voluntary = await self._serve(lease, takeover, started)
                finally:
                    if voluntary:
                        self._set_mode(Mode.STOPPING, "stopping active work")
                    await self._stop_roles(started, voluntary=voluntary)
                    lease.end()
                    self.lease = self.gate.lease = None
                    keeping.cancel()
        finally:
            await self.backend.release(clean=voluntary)
            self.epoch = 0
        if not self._stop.is_set():
            self.passive_reason = f"stepped down: {reason}"
            self._set_mode(Mode.PASSIVE, f"stepped down ({reason}); contending again")
            if not voluntary:
                # Whatever made us step down may still hold; never contend in a tight loop.
                await set_within(self._stop, PAUSE_AFTER_LOSS)

    async def _keep(self, lease: Lease) -> None:
        """Renew the lease while the term lasts; a loss reaches the term as a step-down (the
        lease's ``on_lost``), and so does a failure of the keeping itself."""
        try:
            reason = await self.backend.hold(lease)
        except Exception as exc:  # noqa: BLE001 - cannot keep the lease: the term is over
            reason = f"lease keeping failed: {exc}"
        if not lease.ended:
            self.step_down(reason)

    async def _serve(self, lease: Lease, takeover: Takeover, started: list[ActiveRole]) -> tuple[str, bool]:
        """Start the roles in order, then lead until stopped or stepped down: (why, voluntary)."""
        try:
            for role in self.roles:
                await role.start(lease)
                started.append(role)
        except Exception as exc:  # a role failed to start: step down, retry later
            log.exception("could not start active roles")
            return f"start failed: {exc}", False
        if takeover.previous_instance is not None:  # a bot's very first term hands nothing over
            self.handovers += 1
        self._set_mode(Mode.ACTIVE, f"leading with epoch {takeover.epoch}")
        try:
            await until_set(self._stop, self._step_down.wait())
        except Interrupted:
            return "stopping", True
        return self._step_down_reason, False

    async def _stop_roles(self, started: list[ActiveRole], *, voluntary: bool) -> None:
        """Stop the started roles in reverse order, each bounded; the lock is released regardless."""
        for role in reversed(started):
            try:
                await within(role.stop(voluntary=voluntary), self.role_stop_timeout, name=f"stopping {role.name}")
            except Exception:  # release the lock regardless
                log.exception("stopping %s failed", role.name)
