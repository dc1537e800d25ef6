"""Configuration: every problem at once, named, the token never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TOKEN
from utils.base.redact import mask_token
from utils.config import ConfigError, default_lock_dir, load_settings


def test_defaults() -> None:
    s = load_settings({"BOT_TOKEN": TOKEN})
    assert s.bot_id == 123456 and s.lock_backend == "file" and s.health_port == 8080
    assert s.api_url == "https://api.telegram.org"
    assert TOKEN not in repr(s)
    assert s.bot_module == "bot", "today's bot.py keeps working"
    assert load_settings({"BOT_TOKEN": TOKEN, "BOT_MODULE": "pkg.sub_mod"}).bot_module == "pkg.sub_mod"


def test_all_problems_in_one_message() -> None:
    with pytest.raises(ConfigError) as err:
        load_settings({"BOT_TOKEN": "123:" + "x" * 40 + "!", "HEALTH_PORT": "x", "LOCK_BACKEND": "zk",
                       "POST_CRON": "* * * * *", "POST_INTERVAL": "5"})
    text = str(err.value)
    for name in ("BOT_TOKEN", "HEALTH_PORT", "LOCK_BACKEND", "POST_CRON and POST_INTERVAL"):
        assert name in text
    assert "x" * 40 not in text


def test_runtime_directory_and_masking() -> None:
    assert default_lock_dir({"RUNTIME_DIRECTORY": "/run/solobot:/run/other"}) == Path("/run/solobot")
    assert mask_token(TOKEN) == "123456:***"
    s = load_settings({"BOT_TOKEN": TOKEN, "DATABASE_URL": "postgresql://u:p@w@h/db"})
    assert s.database_target == "PostgreSQL h:5432/db (user u)"


@pytest.mark.parametrize("env,name", [
    ({"POST_CRON": "61 * * * *", "CHANNEL_ID": "@chan"}, "POST_CRON"),
    ({"POST_TIMEZONE": "Mars/Base"}, "POST_TIMEZONE"),
    ({"CHANNEL_ID": "@chan"}, "CHANNEL_ID"),
    ({"LOCK_BACKEND": "postgres"}, "DATABASE_URL"),
    ({"DRAIN_TIMEOUT": "20", "SHUTDOWN_TIMEOUT": "10"}, "DRAIN_TIMEOUT"),
    ({"BOT_MODULE": "my-bot.py"}, "BOT_MODULE"),
])
def test_problems_named(env: dict[str, str], name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        load_settings({"BOT_TOKEN": TOKEN, **env})
