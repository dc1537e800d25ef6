"""The configured lock backend, built in one place (the bot and ``main.py status`` share it)."""

from __future__ import annotations

from pathlib import Path
from typing import Any, Protocol

from utils.locking.backend import LockBackend
from utils.locking.file_backend import FileLockBackend
from utils.locking.instance_lock import InstanceLock
from utils.locking.postgres_backend import PostgresLockBackend
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
    common: dict[str, Any] = dict(
        instance_id=instance_id,
        stale_seconds=settings.lock_stale_seconds,
        takeover=settings.lock_takeover,
    )
    if settings.lock_backend == "postgres":
        assert store.target is not None and store.target.is_postgres
        return PostgresLockBackend(store.target, settings.bot_id, store, **common)
    return FileLockBackend(InstanceLock(settings.lock_dir, str(settings.bot_id), instance_id), store, **common)
