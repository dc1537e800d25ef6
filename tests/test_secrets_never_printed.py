"""No secret in any output: configuration errors, ``main.py status`` and the log, for every form a
password or the token can take (the password has ``@``, a space, quotes and ``%``). The log's test
runs real processes (everything a process writes, third-party lines included); the configuration
errors and ``status`` run main.py's steps in-process (tests/conftest.py's run_main_in_process)."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Callable
from pathlib import Path
from urllib.parse import quote

import pytest

from tests.conftest import TOKEN, BotProcess, free_port, run_main_in_process, wait_until
from utils.base.redact import Redactor

Spawn = Callable[..., BotProcess]
PASSWORD = "Hunter2@Wolf Pack\"Quo'te%Perc"
#: Pieces of the password, each of which would show that (part of) it leaked.
PIECES = ("Hunter2", "Wolf", "Pack", "Quo'te", "Perc")
TOKEN_SECRET = TOKEN.partition(":")[2]


def database_urls(port: int) -> dict[str, str]:
    """Every form of DATABASE_URL that carries the password (the server is not listening)."""
    where = f"127.0.0.1:{port}/solobot"
    return {
        "userinfo raw": f"postgresql://postgres:{PASSWORD}@{where}",
        "userinfo encoded": f"postgresql://postgres:{quote(PASSWORD, safe='')}@{where}",
        "query encoded": f"postgresql://postgres@{where}?sslmode=disable&password={quote(PASSWORD, safe='')}",
        "query raw": f"postgresql://postgres@{where}?password={PASSWORD}",
    }


KEY_VALUE = "host=127.0.0.1 port=1 dbname=x user=postgres password='Hunter2@Wolf Pack\"Quo\\'te%Perc'"


def leaks(text: str) -> list[str]:
    found = [piece for piece in PIECES if piece in text]
    found += [form for form in (quote(PASSWORD, safe=""), quote(PASSWORD), TOKEN_SECRET) if form in text]
    return found


def run_main(*args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """``python main.py ARGS``'s configuration, logging and light commands, in-process
    (tests/conftest.py): their output is what these tests read."""
    full = {k: v for k, v in os.environ.items() if k not in ("DATABASE_URL", "LOCK_BACKEND")}
    full.update({"ENV_FILE": os.devnull, "BOT_TOKEN": TOKEN, "LOG_LEVEL": "DEBUG", **env})
    return run_main_in_process(*args, env=full)


@pytest.mark.parametrize("form", ["userinfo raw", "userinfo encoded", "query encoded", "query raw", "key=value"])
def test_configuration_errors_show_no_secret(form: str) -> None:
    url = KEY_VALUE if form == "key=value" else database_urls(free_port())[form]
    # Every variable that echoes its value, wrong at once, each with a secret in it.
    done = run_main(DATABASE_URL=url, LOCK_BACKEND="nope",
                    TELEGRAM_API_URL=f"ftp:/bot{TOKEN}/{url}", WEBHOOK_URL=f"https:// {TOKEN} {url}",
                    CHANNEL_ID=url, POST_TIMEZONE=url, ADMIN_IDS=url)
    assert done.returncode == 78, done
    output = done.stdout + done.stderr
    assert "TELEGRAM_API_URL" in output and "WEBHOOK_URL" in output and "CHANNEL_ID" in output
    assert leaks(output) == [], output


@pytest.mark.parametrize("command", [(), ("status",), ("inbox",)])
def test_key_value_database_url_refused_without_echo(command: tuple[str, ...]) -> None:
    """libpq's key/value form (which psycopg would accept) is refused by the run, ``status`` and
    ``inbox`` alike, with exit 78 and a message that echoes no part of it."""
    done = run_main(*command, DATABASE_URL=KEY_VALUE, LOCK_BACKEND="postgres")
    assert done.returncode == 78, done
    assert "DATABASE_URL: expected a postgresql://" in done.stderr and "value not shown" in done.stderr
    assert "key=value" in done.stderr
    for part in ("host=", "127.0.0.1", "dbname", "port=1", "user=postgres"):
        assert part not in done.stdout + done.stderr
    assert leaks(done.stdout + done.stderr) == []


#: A password that only percent-encoding can put in a URL, and whose encoded form is the password
#: of another: neither the decoded (p@ss/w:rd) nor the encoded form may show.
ENCODED_PASSWORD, DECODED_PASSWORD = "p%40ss%2Fw%3Ard", "p@ss/w:rd"


def test_status_and_inbox_show_no_percent_encoded_password() -> None:
    port = free_port()
    url = f"postgresql://postgres:{ENCODED_PASSWORD}@127.0.0.1:{port}/solobot"
    for command, code in (("status", 4), ("inbox", 4)):
        done = run_main(command, DATABASE_URL=url, LOCK_BACKEND="postgres")
        assert done.returncode == code, done
        output = done.stdout + done.stderr
        assert f"127.0.0.1:{port}/solobot" in output, output
        for form in (ENCODED_PASSWORD, DECODED_PASSWORD, "p@ss", "w:rd", "%40ss", "40ss"):
            assert form not in output, (form, output)


@pytest.mark.parametrize("form", ["userinfo raw", "userinfo encoded", "query encoded", "query raw"])
def test_status_shows_no_secret(form: str) -> None:
    port = free_port()
    done = run_main("status", DATABASE_URL=database_urls(port)[form], LOCK_BACKEND="postgres")
    assert done.returncode == 4, done
    assert f"PostgreSQL 127.0.0.1:{port}/solobot (user postgres)" in done.stderr
    assert leaks(done.stdout + done.stderr) == [], done


def test_log_shows_no_secret(spawn: Spawn, tmp_path: Path) -> None:
    """A running bot at DEBUG whose database refuses: each form of the URL, and a token in WEBHOOK_URL.
    Each has a lock directory of its own: each must meet the database, none wait as a standby."""
    bots = []
    for form, url in database_urls(free_port()).items():
        name = form.replace(" ", "-")
        bots.append(spawn(name, DATABASE_URL=url, LOG_LEVEL="DEBUG", BOT_MODE="webhook",
                          WEBHOOK_URL=f"http://127.0.0.1:1/hook/{TOKEN}", LOCK_DIR=str(tmp_path / f"lock-{name}")))
    for bot in bots:
        wait_until(lambda: "Connection refused" in bot.log(), 60,  # noqa: B023 - used at once
                   message=f"{bot.name} meets the refusal")
        assert leaks(bot.log()) == [], bot.log()


@pytest.mark.parametrize("text", [
    f"postgresql://u:{PASSWORD}@h/db", f"connect to postgresql://u:{PASSWORD}@h:5432/db failed",
    f"password='{PASSWORD}' host=h", f"?password={quote(PASSWORD, safe='')}&x=1",
    f"https://api.telegram.org/bot{TOKEN}/getMe", f"the token 999999:{TOKEN_SECRET} was refused",
])
def test_redactor_masks_every_form_unconfigured_too(text: str) -> None:
    """The generic patterns alone (a redactor that knows no secret) mask URL, query and DSN passwords
    and any token; the configured one masks everything too."""
    configured = Redactor(token=TOKEN, database_url=f"postgresql://u:{PASSWORD}@h/db")(text)
    assert leaks(configured) == [], configured
    generic = Redactor()(text)
    assert TOKEN_SECRET not in generic and "Hunter2" not in generic, generic


@pytest.mark.parametrize(("url", "user", "password", "hosts", "database"), [
    ("postgresql://u:p@ss@db:5433/app", "u", "p@ss", "db:5433", "app"),
    (f"postgresql://postgres:{PASSWORD}@127.0.0.1:1/solobot", "postgres", PASSWORD, "127.0.0.1:1", "solobot"),
    ("postgres://u:a#b?c@h/db", "u", "a#b?c", "h", "db"),
    ("postgresql+psycopg://u:p%40ss%20w@h1:5432,h2/app?sslmode=require", "u", "p@ss w", "h1:5432,h2", "app"),
    ("postgresql://u@h/db?password=q%26w@x", "u", None, "h", "db"),
    ("postgresql:///app?host=/run/postgresql", None, None, "", "app"),
])
def test_one_rule_for_where_the_password_ends(url: str, user: str | None, password: str | None,
                                              hosts: str, database: str) -> None:
    from utils.base.dsn import parse_database_url

    parts = parse_database_url(url)
    assert parts is not None and (parts.user, parts.password, parts.hosts, parts.database) == \
        (user, password, hosts, database)
    assert parse_database_url(KEY_VALUE) is None


@pytest.mark.parametrize("url", [
    "postgresql://solobot:s3cr%40tPW@db.example:5432/bot",
    "postgresql://solobot@db.example/bot?password=s3cr%40tPW&sslmode=disable",
])
def test_no_repr_carries_the_password(url: str, tmp_path: Path) -> None:
    """A repr is printed outside the log's masking (a traceback's locals, an assertion message):
    the settings, the parsed URL and the database target never show the password in any form."""
    from utils.ops.daemon_settings import load_daemon_settings
    from utils.state.database import DatabaseTarget

    settings = load_daemon_settings({"BOT_TOKEN": "123456:" + "A" * 35, "DATABASE_URL": url,
                                     "STATE_DIR": str(tmp_path)})
    assert settings.database is not None
    shown = repr(settings) + repr(settings.database) + repr(DatabaseTarget.parse(settings.database, tmp_path))
    for form in ("s3cr%40tPW", "s3cr@tPW", "s3cr"):
        assert form not in shown
