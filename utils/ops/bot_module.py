"""``BOT_MODULE``: the user's aiogram bot, plugged in without editing solobot's files.

Like uvicorn's ``module:app``, solobot imports one module (default ``bot``, the ``bot.py`` beside
``main.py``; the working directory is searched first, as uvicorn's ``--app-dir .`` does) and takes:

* ``router`` (required): an aiogram ``Router`` with the handlers;
* ``setup_dispatcher(dp)`` (optional): called once with the ``Dispatcher`` after the router is
  included: middlewares, workflow data (``dp["name"] = value``), the FSM strategy
  (``dp.fsm.strategy``) or another FSM storage (``dp.fsm.storage``);
* ``roles`` (optional): active-only jobs, a list of roles or a function ``roles(ctx)`` returning
  one (``ctx`` is a :class:`BotContext`). A role has a ``name``, ``async start(lease)`` and
  ``async stop(*, voluntary)``; the leadership controller runs it only on the active instance.

A module that cannot be imported, or has no router, is a configuration error: one line naming the
module and what is missing (exit 78 in main.py), not a traceback.
"""

from __future__ import annotations

import importlib
import os
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from types import ModuleType
from typing import Any

from aiogram import Bot, Dispatcher, Router
from aiogram.fsm.storage.base import BaseStorage

from utils.config import Settings


class BotModuleError(Exception):
    """``BOT_MODULE`` names a module solobot cannot use (one line, for the log)."""


@dataclass(frozen=True)
class BotContext:
    """What ``roles(ctx)`` gets to build its jobs with."""

    bot: Bot  # every call passes the lease gate: only the active instance reaches Telegram
    dispatcher: Dispatcher
    storage: BaseStorage  # the dispatcher's FSM storage (durable and fenced unless replaced)
    settings: Settings


@dataclass(frozen=True)
class BotModule:
    name: str
    router: Router
    setup_dispatcher: Callable[[Dispatcher], Any] | None
    roles: Any  # a sequence of roles, a callable returning one, or None

    def setup(self, dispatcher: Dispatcher) -> None:
        if self.setup_dispatcher is not None:
            self.setup_dispatcher(dispatcher)

    def active_roles(self, context: BotContext) -> list[Any]:
        """The module's active-only roles (checked: each has ``name``, ``start`` and ``stop``)."""
        roles = self.roles(context) if callable(self.roles) else self.roles
        if roles is None:
            return []
        if not isinstance(roles, Sequence):
            raise BotModuleError(f"BOT_MODULE={self.name}: roles must be a list (or a function returning "
                                 f"one), got {type(roles).__name__}")
        for role in roles:
            if not all(hasattr(role, attr) for attr in ("name", "start", "stop")):
                raise BotModuleError(f"BOT_MODULE={self.name}: role {role!r} needs a name, "
                                     f"async start(lease) and async stop(*, voluntary)")
        return list(roles)


def _import(name: str) -> ModuleType:
    cwd = os.getcwd()
    if cwd not in sys.path:
        sys.path.insert(0, cwd)
    try:
        return importlib.import_module(name)
    except ModuleNotFoundError as exc:
        if exc.name is not None and (name == exc.name or name.startswith(exc.name + ".")):
            raise BotModuleError(f"BOT_MODULE={name}: no module named {name!r} (searched {cwd} and the "
                                 f"Python path); set BOT_MODULE to your bot's module, e.g. mypackage.bot"
                                 ) from None
        raise BotModuleError(f"BOT_MODULE={name}: importing it failed: {exc}") from None
    except ImportError as exc:
        raise BotModuleError(f"BOT_MODULE={name}: importing it failed: {exc}") from None


def load_bot_module(name: str) -> BotModule:
    """Import *name* and take what solobot needs from it; :class:`BotModuleError` if it cannot."""
    return bot_module_from(name, _import(name))


def bot_module_from(name: str, module: ModuleType) -> BotModule:
    """What solobot needs from the imported *module* (named *name* in messages)."""
    router = getattr(module, "router", None)
    if not isinstance(router, Router):
        found = "nothing" if router is None else f"a {type(router).__name__}"
        raise BotModuleError(f"BOT_MODULE={name}: the module has no aiogram Router named 'router' "
                             f"(found {found}); add `router = Router()` with your handlers")
    setup = getattr(module, "setup_dispatcher", None)
    if setup is not None and not callable(setup):
        raise BotModuleError(f"BOT_MODULE={name}: setup_dispatcher must be a function taking the Dispatcher")
    return BotModule(name, router, setup, getattr(module, "roles", None))
