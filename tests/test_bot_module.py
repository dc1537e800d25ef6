"""BOT_MODULE loading, in process: what is taken from the module and the one-line errors."""

from __future__ import annotations

import sys
import types
from collections.abc import Iterator
from pathlib import Path

import pytest
from aiogram import Bot, Dispatcher, Router

from utils.ops.bot_module import BotContext, BotModuleError, load_bot_module


@pytest.fixture
def fake_module() -> Iterator[types.ModuleType]:
    module = types.ModuleType("solobot_test_bot_module")
    sys.modules[module.__name__] = module
    yield module
    del sys.modules[module.__name__]


def context() -> BotContext:
    dp = Dispatcher()
    return BotContext(Bot("123456:AAHdqTcvCH1vGWJxfSeofSAs0K5PALDsaw0"), dp, dp.fsm.storage, None)  # type: ignore[arg-type]


def test_the_example_gives_a_router_and_its_roles_only_when_configured(monkeypatch: pytest.MonkeyPatch) -> None:
    loaded = load_bot_module("examples.conversation_bot")
    assert isinstance(loaded.router, Router)
    monkeypatch.delenv("REMINDER_CHAT_ID", raising=False)
    assert loaded.active_roles(context()) == []
    monkeypatch.setenv("REMINDER_CHAT_ID", "5")
    [role] = loaded.active_roles(context())
    assert role.name == "reminder"


def test_setup_hook_runs_with_the_dispatcher(fake_module: types.ModuleType) -> None:
    seen: list[Dispatcher] = []
    fake_module.router = Router()  # type: ignore[attr-defined]
    fake_module.setup_dispatcher = seen.append  # type: ignore[attr-defined]
    fake_module.roles = []  # type: ignore[attr-defined]
    loaded = load_bot_module(fake_module.__name__)
    dp = Dispatcher()
    loaded.setup(dp)
    assert seen == [dp] and loaded.active_roles(context()) == []


@pytest.mark.parametrize(("attrs", "problem"), [
    ({}, "has no aiogram Router named 'router' (found nothing)"),
    ({"router": object()}, "(found a object)"),
    ({"router": Router(), "setup_dispatcher": 3}, "setup_dispatcher must be a function"),
])
def test_unusable_module_is_one_line(fake_module: types.ModuleType, attrs: dict[str, object], problem: str) -> None:
    for name, value in attrs.items():
        setattr(fake_module, name, value)
    with pytest.raises(BotModuleError, match=r"^BOT_MODULE=solobot_test_bot_module: ") as caught:
        load_bot_module(fake_module.__name__)
    assert problem in str(caught.value) and "\n" not in str(caught.value)


def test_roles_must_be_roles(fake_module: types.ModuleType) -> None:
    fake_module.router = Router()  # type: ignore[attr-defined]
    fake_module.roles = [object()]  # type: ignore[attr-defined]
    with pytest.raises(BotModuleError, match="needs a name, async start"):
        load_bot_module(fake_module.__name__).active_roles(context())


def test_missing_module_and_missing_dependency_are_told_apart(tmp_path: Path,
                                                              monkeypatch: pytest.MonkeyPatch) -> None:
    with pytest.raises(BotModuleError, match=r"no module named 'no_such_pkg\.bot'"):
        load_bot_module("no_such_pkg.bot")
    (tmp_path / "solobot_test_broken.py").write_text("import solobot_no_such_dependency\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(BotModuleError, match="importing it failed: No module named 'solobot_no_such_dependency'"):
        load_bot_module("solobot_test_broken")
