"""Leadership locks: the policy in :class:`LockBackend`, the mechanism in a :class:`LockMechanism`.

The split is filelock's: ``BaseFileLock`` holds the policy (timeouts, reentrancy) and a platform
class only ``_acquire``/``_release``. Here a mechanism does five things - :meth:`~LockMechanism.acquire`,
:meth:`~LockMechanism.heartbeat`, :meth:`~LockMechanism.release`, :meth:`~LockMechanism.holder`,
:meth:`~LockMechanism.fence` - and tells the policy what it knows only through their return
values (a :class:`Grant`, a :class:`HolderInfo`): the policy reads no state a mechanism writes.

Policy, shared by every mechanism:

* ``acquire`` waits without a retry loop (the mechanism blocks in the kernel or the database)
  and, while waiting, watches the holder's heartbeat; a holder silent for longer than
  ``LOCK_STALE_SECONDS`` is fenced (killed, or all its database sessions terminated) so a hung
  process cannot keep the bot down. Nothing on the way to the lock wait touches a lock that a
  hung holder may hold: the schema and the epoch are written only once the lock is ours (the
  mechanism calls back into a :class:`Claim` for those steps, at the point its lock allows).
* each acquisition takes a new *epoch* from the state store; every durable write carries it.
* the active term is a :class:`~utils.base.lease.Lease`; ``heartbeat`` is its verification
  and ``hold`` renews it every second while active (at once when the mechanism says the lock
  may be gone: :meth:`Claim.wake`).
* a new leader whose predecessor vanished without releasing waits :meth:`LockBackend.takeover_delay`
  before acting, but only as long as the mechanism says that predecessor may still act
  (:attr:`Grant.settle`; zero where vanishing means it is dead).

Mechanisms: ``utils.locking.file_backend.FileMechanism`` (one host) and
``utils.locking.postgres_backend.PostgresMechanism`` (across hosts).
"""

from __future__ import annotations

import abc
import asyncio
import contextlib
import logging
import os
import socket
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass

from utils.base.interrupt import set_within
from utils.base.lease import RENEW_FRACTION, Lease
from utils.base.lookup import retrieve_quietly
from utils.state.leader import Takeover
from utils.state.store import StateStore

log = logging.getLogger("solobot.lock")

HEARTBEAT_INTERVAL = 1.0
#: How often a standby reads the holder's heartbeat (from the moment it starts waiting).
HOLDER_CHECK_INTERVAL = 0.5
#: A verification slower than this counts as failed.
VERIFY_TIMEOUT = 2 * HEARTBEAT_INTERVAL
#: A step of the takeover (schema, epoch) slower than this is reported once at WARNING.
SLOW_STEP_WARNING = 2.0

#: Who blocks this instance's state sessions, in words (for the slow-step warning); "" if unknown.
DescribeBlockers = Callable[[], Awaitable[str]]


class LockUnavailable(Exception):
    """The lock cannot be acquired now (its server is down...); the text is worded for the
    operator: where and why, never a password. The controller stays passive and retries."""


@dataclass(frozen=True)
class HolderInfo:
    """Who is active, as a mechanism sees it (for /health, /status and ``main.py status``)."""

    instance_id: str | None
    host: str | None
    pid: int | None
    epoch: int
    since: float | None  # wall clock
    heartbeat_age: float | None
    state_id: str | None = None  # the holder's state database, where the mechanism records it
    #: Does anybody hold the lock right now, in the kernel's or the server's word (the record
    #: alone may be left over by a holder that let go)? None if the mechanism cannot tell.
    lock_held: bool | None = None

    def as_dict(self) -> dict[str, object]:
        return {
            "instance_id": self.instance_id,
            "host": self.host,
            "pid": self.pid,
            "epoch": self.epoch,
            "since": self.since,
            "heartbeat_age_s": None if self.heartbeat_age is None else round(self.heartbeat_age, 3),
        }

    def describe(self) -> str:
        return f"pid {self.pid} on {self.host} (instance {self.instance_id}, epoch {self.epoch})"


@dataclass(frozen=True)
class Grant:
    """One acquisition, as the mechanism returns it."""

    takeover: Takeover
    #: How long a predecessor that vanished without releasing may still act, as far as the
    #: mechanism can tell (seconds, net of time it already spent waiting for it); zero where
    #: vanishing means it is dead (the kernel drops a flock only when the process is gone).
    settle: float = 0.0


class Claim:
    """The policy's steps of one acquisition, called by the mechanism once its lock allows."""

    def __init__(self, backend: LockBackend, watcher: asyncio.Task[None]) -> None:
        self._backend = backend
        self._watcher = watcher

    async def locked(self) -> None:
        """The lock is ours: stop watching the holder (its record now names our predecessor).
        Idempotent."""
        self._watcher.cancel()
        await asyncio.gather(self._watcher, return_exceptions=True)
        self._backend.note = None

    async def take_epoch(self, *, backend_pid: int | None = None,
                         blockers: DescribeBlockers | None = None) -> Takeover:
        """Apply the schema and take the next epoch (the lock must be ours). A store failure is
        raised as :class:`LockUnavailable`, described by the store."""
        await self.locked()
        backend = self._backend
        try:
            async with backend.slow_step("applying the state schema", blockers):
                await backend.store.migrate()
            async with backend.slow_step("taking the next epoch in the state database", blockers):
                return await backend.store.leader.advance_epoch(
                    instance_id=backend.instance_id, host=socket.gethostname(), pid=os.getpid(),
                    backend_pid=backend_pid,
                )
        except Exception as exc:
            raise LockUnavailable(backend.store.describe_error(exc)) from exc

    def wake(self) -> None:
        """The lock may be gone (its connection stirred): verify now, not at the next beat."""
        self._backend.renew_now.set()


class LockMechanism(abc.ABC):
    """How one kind of lock is taken, kept and looked at. Every method may raise; the policy
    handles it (a failed acquisition is retried, a failed heartbeat ends the term)."""

    name = "abstract"
    #: Our state database's identity where the mechanism records it (file), else None.
    state_id: str | None = None

    async def open(self) -> None:  # noqa: B027 - optional: most mechanisms need nothing before acquire
        """Check or create what the mechanism needs on disk before the first acquire (no I/O in
        the constructor: a start-up that fails later unwinds only what was opened)."""

    @abc.abstractmethod
    async def acquire(self, claim: Claim) -> Grant:
        """Block until the lock is ours (cancel to give up), call ``claim.locked()`` at once, then
        ``claim.take_epoch()``; return the grant. Whatever the mechanism must do around the
        epoch (end a vanished predecessor's sessions first, record the epoch after) it does here."""

    @abc.abstractmethod
    async def heartbeat(self, epoch: int) -> bool:
        """Is the lock still ours with *epoch* current? Refresh the heartbeat if so."""

    @abc.abstractmethod
    async def release(self) -> None:
        """Let go of the lock, if held, and close what the mechanism holds open. Idempotent."""

    @abc.abstractmethod
    async def holder(self, *, probe: bool = False) -> HolderInfo | None:
        """The holder's record, or None; with :attr:`HolderInfo.lock_held` only if *probe* (a
        second round trip, or a flock probe: asked only of a stale holder and by ``status``)."""

    @abc.abstractmethod
    async def fence(self, holder: HolderInfo) -> str | None:
        """Stop a hung holder; None on success, else why it could not be done."""


class LockBackend:
    """One bot's leadership lock: the policy around a :class:`LockMechanism`."""

    def __init__(
        self, mechanism: LockMechanism, store: StateStore, *, instance_id: str, stale_seconds: float,
        takeover: bool,
    ) -> None:
        self.mechanism = mechanism
        self.store = store
        self.instance_id = instance_id
        self.stale_seconds = stale_seconds
        self.renew_deadline = RENEW_FRACTION * stale_seconds
        self.takeover = takeover
        self.epoch = 0
        self.fenced_holders = 0
        #: What a standby currently waits on, beyond the lock itself (for /health); None if nothing.
        self.note: str | None = None
        #: The last lease verification; still running after an overrun (see :meth:`heartbeat`).
        self.verification: asyncio.Task[bool] | None = None
        #: Set by :meth:`Claim.wake`: :meth:`hold` renews at once instead of at the next beat.
        self.renew_now = asyncio.Event()

    @property
    def name(self) -> str:
        return self.mechanism.name

    @property
    def state_id(self) -> str | None:
        """Our state database's identity (file mechanism), to notice an instance using another one."""
        return self.mechanism.state_id

    async def acquire(self) -> Grant:
        """Wait until this instance leads; fence a hung holder meanwhile (if allowed)."""
        watcher = asyncio.create_task(self._watch_holder(), name="solobot-holder-watch")
        claim = Claim(self, watcher)
        try:
            grant = await self.mechanism.acquire(claim)
        except BaseException:
            await claim.locked()
            await self.mechanism.release()
            raise
        self.epoch = grant.takeover.epoch
        return grant

    def takeover_delay(self, grant: Grant) -> float:
        """How long a new leader waits before acting: only while the last holder's lease may live."""
        takeover = grant.takeover
        if takeover.previous_released or not grant.settle:
            return 0.0
        age = takeover.previous_heartbeat_age
        if age is not None and age >= self.renew_deadline:
            return 0.0  # its lease ran out before we got here: it cannot act any more
        return grant.settle

    async def heartbeat(self) -> bool:
        """Is the lock still ours and our epoch current? Refreshes the heartbeat if so.

        This is the lease's verification: one round trip, bounded by :data:`VERIFY_TIMEOUT`, a hard
        bound. A call that overruns (a silent server) is not cancelled, because psycopg would wait
        seconds for the server to confirm the cancellation; it is left to end on its own (the lock
        connection's TCP timeouts end it), and until it has, every further verification fails at
        once: a late answer never vouches for a later moment.
        """
        running = self.verification
        if running is not None and not running.done():
            raise TimeoutError("the previous lease verification has not answered yet")
        task = self.verification = asyncio.ensure_future(self.mechanism.heartbeat(self.epoch))
        task.add_done_callback(retrieve_quietly)
        done, _ = await asyncio.wait({task}, timeout=VERIFY_TIMEOUT)
        if not done:
            raise TimeoutError(f"lease verification: no answer within {VERIFY_TIMEOUT:g} s")
        return task.result()

    async def hold(self, lease: Lease) -> str:
        """Renew *lease* every heartbeat (or at once when woken) while active; return why it was lost."""
        self.renew_now.clear()
        while lease.valid:
            await set_within(self.renew_now, HEARTBEAT_INTERVAL)
            self.renew_now.clear()
            await lease.renew()
        return lease.lost or "the active term ended"

    async def release(self, *, clean: bool) -> None:
        """Let go. *clean* says we stopped in order, so the next leader need not wait."""
        epoch, self.epoch = self.epoch, 0
        if clean and epoch:
            try:
                await self.store.leader.mark_released(epoch)
            except Exception as exc:  # noqa: BLE001 - the lock must still be released
                log.warning("could not record a clean release: %s", exc)
        await self.mechanism.release()

    async def holder(self) -> HolderInfo | None:
        return await self.mechanism.holder()

    async def holder_is_live(self, holder: HolderInfo) -> bool:
        """Does *holder* still hold the lock (for ``main.py status``)? The mechanism's word where
        it has one, else a fresh heartbeat."""
        held = holder.lock_held
        if held is None:
            probed = await self.mechanism.holder(probe=True)
            held = probed.lock_held if probed is not None else False
        if held is not None:
            return held
        return holder.heartbeat_age is not None and holder.heartbeat_age <= self.stale_seconds

    def describe_failure(self, exc: BaseException) -> str:
        """An acquisition failure as one line for logs and /health (never a password)."""
        text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
        if isinstance(exc, LockUnavailable):
            return text
        return f"{type(exc).__name__}: {text}" if text else type(exc).__name__

    async def open(self) -> None:
        """What the mechanism needs before the first acquire (the file lock's private directory)."""
        await self.mechanism.open()

    async def close(self) -> None:
        """Free what the mechanism holds open (connections); the lock must already be released."""
        await self.mechanism.release()

    @contextlib.asynccontextmanager
    async def slow_step(self, what: str, blockers: DescribeBlockers | None = None) -> AsyncIterator[None]:
        """Say once at WARNING if *what* blocks (e.g. on a lock a hung process holds)."""

        async def warn() -> None:
            await asyncio.sleep(SLOW_STEP_WARNING)
            blocked_by = await blockers() if blockers is not None else ""
            log.warning("taking over: still %s after %.0f s%s", what, SLOW_STEP_WARNING,
                        f"; blocked by {blocked_by}" if blocked_by else "")

        warner = asyncio.create_task(warn())
        try:
            yield
        finally:
            warner.cancel()

    async def _watch_holder(self) -> None:
        """Standby side of hung-holder detection: fence a holder whose heartbeat went stale.

        Each outcome is logged once per holder (instance and epoch); again only when it changes.
        """
        said: dict[str, str] = {}
        first = True
        while True:
            if not first:
                await asyncio.sleep(HOLDER_CHECK_INTERVAL)
            first = False
            try:
                holder = await self.mechanism.holder()
                age = holder.heartbeat_age if holder is not None else None
                if age is not None and age > self.stale_seconds:  # stale: does it still hold the lock?
                    holder = await self.mechanism.holder(probe=True)
            except Exception:  # e.g. the database is down; keep waiting
                log.debug("could not read the holder", exc_info=True)
                continue
            if (holder is None or holder.heartbeat_age is None or holder.heartbeat_age <= self.stale_seconds
                    or holder.lock_held is False):
                # Fresh, or a stale record of a holder that let go (the lock is free: we get it
                # next): nothing to fence, nothing to say.
                self.note = None
                said.clear()
                continue
            key = f"{holder.instance_id}/{holder.epoch}"
            if not self.takeover:
                self.note = f"holder {key} looks hung but LOCK_TAKEOVER is off"
                if said.get(key) != self.note:
                    log.warning("holder %s looks hung (heartbeat %.1f s old) but LOCK_TAKEOVER is off",
                                holder.describe(), holder.heartbeat_age)
                    said[key] = self.note
                continue
            if key not in said:
                # Log first: fencing frees the lock, and winning it cancels this watcher at once.
                log.warning("fencing hung holder %s: heartbeat %.1f s old > %.0f s",
                            holder.describe(), holder.heartbeat_age, self.stale_seconds)
                said[key] = "fencing"
            outcome = await asyncio.shield(self.mechanism.fence(holder))
            if outcome is None:
                if said.get(key) != "fenced":
                    self.fenced_holders += 1
                    said[key] = "fenced"
                continue
            self.note = f"hung holder {key} cannot be fenced: {outcome}"
            if said.get(key) != outcome:
                log.warning("could not fence holder %s: %s", holder.describe(), outcome)
                said[key] = outcome
