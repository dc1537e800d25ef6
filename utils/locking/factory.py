"""The configured lock backend, built in one place (the bot and ``main.py status`` share it)."""

from __future__ import annotations

from pathlib import Path
from typing import Protocol

from utils.locking.backend import LockBackend, LockMechanism
from utils.locking.file_backend import FileMechanism
from utils.locking.instance_lock import InstanceLock
from utils.locking.postgres_backend import PostgresMechanism
from utils.state.store import StateStore


class LockSettings(Protocol):
    """What the lock backend is built from (:class:`utils.config.Settings` has it): a protocol, so
    that locking stays below the configuration in the layers (pyproject.toml's import contract)."""

    @property
    def lock_backend(self) -> str: ...
    @property
    def lock_dir(self) -> Path: ...
    @property
    def bot_id(self) -> int: ...
    @property
    def lock_stale_seconds(self) -> float: ...
    @property
    def lock_takeover(self) -> bool: ...


def make_backend(settings: LockSettings, store: StateStore, instance_id: str) -> LockBackend:
    """The lock backend of *settings*, built without touching anything: its ``open()`` checks the
    file backend's directory (may raise :class:`~utils.locking.instance_lock.LockSetupError`)."""
    stale = settings.lock_stale_seconds
    mechanism: LockMechanism
    if settings.lock_backend == "postgres":
        assert store.target is not None and store.target.is_postgres
        mechanism = PostgresMechanism(store.target, settings.bot_id, store, instance_id=instance_id,
                                      stale_seconds=stale)
    else:
        lock = InstanceLock(settings.lock_dir, str(settings.bot_id), instance_id)
        mechanism = FileMechanism(lock, store, stale_seconds=stale)
    return LockBackend(mechanism, store, instance_id=instance_id, stale_seconds=stale,
                       takeover=settings.lock_takeover)
