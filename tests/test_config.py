"""Configuration: every problem at once, named, the token never shown."""

from __future__ import annotations

from pathlib import Path

import pytest

from tests.conftest import TOKEN
from utils.base.redact import mask_token
from utils.config import ConfigError, default_lock_dir, load_settings
from utils.ops.daemon_settings import load_daemon_settings


def test_defaults() -> None:
    s = load_settings({"BOT_TOKEN": TOKEN})
    assert s.bot_id == 123456 and s.lock_backend == "file" and s.health_port == 8080
    assert s.api_url == "https://api.telegram.org"
    assert TOKEN not in repr(s)
    assert s.bot_module == "bot", "today's bot.py keeps working"
    assert load_settings({"BOT_TOKEN": TOKEN, "BOT_MODULE": "pkg.sub_mod"}).bot_module == "pkg.sub_mod"


def test_all_problems_in_one_message() -> None:
    """The core's and the autoposter's problems together (the daemon reads both with one reader)."""
    with pytest.raises(ConfigError) as err:
        load_daemon_settings({"BOT_TOKEN": "123:" + "x" * 40 + "!", "HEALTH_PORT": "x", "LOCK_BACKEND": "zk",
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
        load_daemon_settings({"BOT_TOKEN": TOKEN, **env})


def test_core_settings_ignore_the_autoposter_and_the_daemon_reads_it() -> None:
    """The core settings know nothing of CHANNEL_ID/POST_* (the autoposter's own); the daemon's
    settings carry them, checked by the autoposter's rules, and keep every core value."""
    env = {"BOT_TOKEN": TOKEN, "CHANNEL_ID": "@chan", "POST_INTERVAL": "60", "POST_TIMEZONE": "Europe/Berlin",
           "HEALTH_PORT": "9100"}
    core = load_settings({**env, "POST_CRON": "not a cron"})  # not its business: no problem here
    assert not hasattr(core, "channel_id") and not hasattr(core, "autoposter")
    daemon = load_daemon_settings(env)
    assert daemon.autoposter.channel_id == "@chan" and daemon.autoposter.post_interval == 60
    assert daemon.autoposter.post_timezone == "Europe/Berlin" and daemon.autoposter.post_cron is None
    assert daemon.health_port == 9100 and daemon.bot_id == core.bot_id
    assert load_daemon_settings({"BOT_TOKEN": TOKEN}).autoposter.channel_id is None  # off
