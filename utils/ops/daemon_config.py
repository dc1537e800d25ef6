"""``DaemonConfig``: what one run of the daemon is made from, loaded once (uvicorn's ``Config``).

The validated settings (:mod:`utils.config`), the user's bot module imported (``BOT_MODULE``,
:mod:`utils.ops.bot_module`), this run's instance id and the database target parsed from the
settings. Loading it imports the bot module and nothing else: no file, socket or connection is
opened here; :class:`utils.ops.server.Server` opens them, each with its teardown.

The bot module is imported once per process (Python caches it) and may be loaded into any
number of configs: its module-global ``router`` is attached to one server's dispatcher at a time
and detached when that server stops.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass

from utils.config import Settings
from utils.ops.bot_module import BotModule, load_bot_module
from utils.state.database import DatabaseTarget

#: A role's stop is bounded by DRAIN_TIMEOUT plus this (the done marks' final flush, closing).
ROLE_STOP_ALLOWANCE = 2.0
#: Hex digits of a run's instance id (in the lock record, /health and the sessions' names).
INSTANCE_ID_DIGITS = 12


def new_instance_id() -> str:
    """A fresh id for one run of the daemon."""
    return uuid.uuid4().hex[:INSTANCE_ID_DIGITS]


@dataclass(frozen=True)
class DaemonConfig:
    """Settings, the loaded bot module, the instance id and the database target of one run."""

    settings: Settings
    bot_module: BotModule
    instance_id: str
    target: DatabaseTarget

    @classmethod
    def load(cls, settings: Settings, *, instance_id: str | None = None,
             bot_module: BotModule | None = None) -> DaemonConfig:
        """Import ``BOT_MODULE`` (unless *bot_module* is given) and parse the database target; raises
        :class:`~utils.ops.bot_module.BotModuleError` (a configuration error) if the module is unusable."""
        return cls(
            settings=settings,
            bot_module=bot_module or load_bot_module(settings.bot_module),
            instance_id=instance_id or new_instance_id(),
            target=DatabaseTarget.parse(settings.database_url, settings.state_dir),
        )

    @property
    def role_stop_timeout(self) -> float:
        """How long one role (polling, the webhook role, the autoposter) may take to stop."""
        return self.settings.drain_timeout + ROLE_STOP_ALLOWANCE
