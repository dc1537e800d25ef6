"""Logs: JSON lines when asked; the token and the database password masked in every form, including
tracebacks, third-party messages and a real ``python main.py`` that cannot reach its database."""

from __future__ import annotations

import json
import logging
import os
import signal
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path
from urllib.parse import quote, quote_plus

import pytest
from psycopg.conninfo import conninfo_to_dict, make_conninfo
from sqlalchemy.engine import make_url

from tests.conftest import ROOT, TOKEN, free_port, wait_until
from utils.base.dsn import database_passwords
from utils.base.redact import MIN_BARE_SECRET_LENGTH, Redactor
from utils.ops.logging_setup import configure_logging

PASSWORD = "s3cretPW"
URL = f"postgresql://postgres:{PASSWORD}@db.internal:5432/solobot"
ODD_PASSWORD = "p@ss w/rd!'x"  # needs percent-encoding in a URL and quoting in a DSN
ODD_URL = f"postgresql+psycopg://u:{quote(ODD_PASSWORD, safe='')}@db/x"


@pytest.fixture
def restore_logging() -> Iterator[None]:
    """configure_logging changes process-wide state; put it back for the other tests."""
    root = logging.getLogger()
    saved = (root.handlers[:], root.level, sys.excepthook, threading.excepthook)
    yield
    root.handlers[:], level, sys.excepthook, threading.excepthook = saved
    root.setLevel(level)
    logging.captureWarnings(False)


def test_json_lines_and_masking(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("INFO", "json", token=TOKEN, database_url="postgresql://u:hunter2@db/x")
    log = logging.getLogger("somelib")
    log.info("GET https://api.telegram.org/bot%s/getMe", TOKEN)
    try:
        raise RuntimeError(f"cannot reach postgresql://u:hunter2@db/x with {TOKEN}")
    except RuntimeError:
        log.exception("failed")
    log.info("where", stack_info=True)
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "GET https://api.telegram.org/bot123456:***/getMe"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "somelib"
    text = json.dumps(lines)
    assert TOKEN.split(":")[1] not in text and "hunter2" not in text
    assert "u:***@db" in lines[1]["exc"]
    assert "test_json_lines_and_masking" in lines[2]["stack"]


def forms_of_the_password() -> tuple[list[str], list[str]]:
    """The configured password as a log could show it: URL, DSN, bare, encoded."""
    odd_sqlalchemy = make_url(ODD_URL)
    return [
        f"connecting to {URL}",
        f"engine {URL.replace('postgresql://', 'postgresql+psycopg://')} created",
        f"invalid dsn: host=db.internal port=5432 user=postgres password={PASSWORD} dbname=solobot",
        f"conninfo: password='{PASSWORD}' host=db.internal",
        f"PGPASSWORD={PASSWORD} psql -h db.internal",
        f"FATAL: password authentication failed ({PASSWORD})",
        f"settings: {conninfo_to_dict(URL)}",
        f"retrying {URL}?sslmode=require",
    ], [
        f"url {ODD_URL}",
        f"sqlalchemy {odd_sqlalchemy.render_as_string(hide_password=False)}",
        f"libpq {make_conninfo('', host='db', password=ODD_PASSWORD, dbname='x')}",
        f"bare {ODD_PASSWORD} and repr {ODD_PASSWORD!r}",
        f"quote {quote(ODD_PASSWORD, safe='')} lower {quote(ODD_PASSWORD, safe='').lower()}",
        f"quote_plus {quote_plus(ODD_PASSWORD)} and path-safe {quote(ODD_PASSWORD)}",
        f"dict {conninfo_to_dict(ODD_URL.replace('+psycopg', ''))}",
    ]


def leaked(text: str, password: str) -> list[str]:
    forms = {password, quote(password, safe=""), quote_plus(password), quote(password),
             quote(password, safe="").lower(), repr(password)[1:-1]}
    if " " in password:  # the fragments either side of a space are long enough to be telling
        forms.update(part for part in password.split(" ") if len(part) >= MIN_BARE_SECRET_LENGTH)
    return sorted(form for form in forms if form in text)


def test_every_form_of_the_password_is_masked() -> None:
    plain, odd = forms_of_the_password()
    redact = Redactor(database_url=URL)
    for line in plain:
        masked = redact(line)
        assert not leaked(masked, PASSWORD), (line, masked)
        assert "***" in masked
    redact_odd = Redactor(database_url=ODD_URL)
    for line in odd:
        masked = redact_odd(line)
        assert not leaked(masked, ODD_PASSWORD), (line, masked)
        assert "***" in masked
    # What is not secret stays readable.
    assert redact(f"connecting to {URL}") == "connecting to postgresql://postgres:***@db.internal:5432/solobot"
    assert redact("host=db password='a b' dbname=x") == "host=db password=*** dbname=x"


def test_any_url_or_dsn_password_is_masked_even_if_not_configured() -> None:
    redact = Redactor()
    assert redact("redis://:other@cache:6379/0") == "redis://:***@cache:6379/0"
    assert redact("dsn host=h password=xyz user=u") == "dsn host=h password=*** user=u"
    assert redact("{'user': 'u', 'password': 'xyz'}") == "{'user': 'u', 'password': '***'}"
    assert redact("http://host:8080/path and a@b") == "http://host:8080/path and a@b"


def test_short_password_is_masked_only_where_a_url_or_dsn_holds_it() -> None:
    redact = Redactor(database_url="postgresql://u:pw@h/db")
    assert redact("postgresql://u:pw@h/db") == "postgresql://u:***@h/db"
    assert redact("password=pw host=h") == "password=*** host=h"
    assert redact("pwd is a command") == "pwd is a command"


@pytest.mark.parametrize(("url", "passwords"), [
    ("postgresql://u:s3cret@h/db", ["s3cret"]),
    ("postgresql+psycopg://u:p%40ss%20w@h:5432/db", ["p@ss w"]),
    ("postgres://u:a#b?c@h/db", ["a#b?c"]),
    ("postgresql://u@h/db?password=q%26w&sslmode=require", ["q&w"]),
    ("postgresql://u:one@h/db?password=two", ["one", "two"]),
    ("host=h password='p w\\'x' dbname=d", ["p w'x"]),
    ("host=h password=plain dbname=d", ["plain"]),
    ("postgresql://u@h/db", []),
    (None, []),
])
def test_database_passwords(url: str | None, passwords: list[str]) -> None:
    """What the log's masking is given: every password of a URL, and a refused key/value string's."""
    assert database_passwords(url) == passwords


def test_filter_masks_messages_tracebacks_json_and_stray_output(
    capsys: pytest.CaptureFixture[str], restore_logging: None
) -> None:
    configure_logging("DEBUG", "json", token=TOKEN, database_url=ODD_URL)
    _, odd = forms_of_the_password()
    log = logging.getLogger("psycopg.pool")
    for line in odd:
        log.warning("%s", line)
    try:
        raise ConnectionError(f"connection to {make_conninfo('', host='db', password=ODD_PASSWORD)} failed")
    except ConnectionError:
        log.exception("cannot connect")
    log.warning("bad arguments %s %s", ODD_URL)  # logging would print the raw arguments itself
    error = OSError(f"uncaught with {ODD_PASSWORD}")
    sys.excepthook(OSError, error, error.__traceback__)  # what the interpreter calls on a crash

    def crash() -> None:
        raise ValueError(ODD_URL)

    thread = threading.Thread(target=crash, name="worker")
    thread.start()
    thread.join()
    err = capsys.readouterr().err
    records = [json.loads(line) for line in err.splitlines()]
    assert len(records) == len(odd) + 4, [r["msg"] for r in records]
    assert records[len(odd) + 1]["msg"].startswith("bad arguments")
    assert not leaked(err, ODD_PASSWORD) and not leaked(json.dumps(records, ensure_ascii=False), ODD_PASSWORD)
    assert "Traceback" in records[len(odd)]["exc"] and "password=***" in records[len(odd)]["exc"]
    assert records[-2]["msg"] == "uncaught exception" and "uncaught with ***" in records[-2]["exc"]
    assert records[-1]["msg"] == "uncaught exception in thread worker"


def test_text_format_masks_traceback(capsys: pytest.CaptureFixture[str], restore_logging: None) -> None:
    configure_logging("INFO", "text", database_url=URL)
    try:
        raise RuntimeError(f"at {URL}: password authentication failed for {PASSWORD}")
    except RuntimeError:
        logging.getLogger("sqlalchemy.pool").error("checkout failed", exc_info=True)
    err = capsys.readouterr().err
    assert "checkout failed" in err and "Traceback" in err
    assert PASSWORD not in err and "postgres:***@db.internal" in err


def test_real_process_never_prints_the_password(tmp_path: Path) -> None:
    """A real ``python main.py`` at DEBUG whose PostgreSQL refuses connections: retries, errors,
    SQLAlchemy's and psycopg's own lines, the stop; the password shows up in none of them."""
    password = "s3cret P@ss/w%rd"
    url = f"postgresql://postgres:{quote(password, safe='')}@127.0.0.1:{free_port()}/test"
    env = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
    env.update({
        "BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": "http://127.0.0.1:9", "LOCK_BACKEND": "postgres",
        "DATABASE_URL": url, "LOG_LEVEL": "DEBUG", "HEALTH_PORT": "0", "PYTHONUNBUFFERED": "1",
        "LOCK_DIR": str(tmp_path / "lock"), "STATE_DIR": str(tmp_path / "state"),
    })
    log_path = tmp_path / "main.log"
    with open(log_path, "wb") as out:
        proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=ROOT, env=env,
                                stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        # Connecting fails at once and is retried with backoff (1 s, 2 s, ...): the first failure
        # is a WARNING ("... retrying ..."), the next ones DEBUG lines ("... retry in ...").
        wait_until(lambda: log_path.read_text(errors="replace").count("retry") >= 2, 30,
                   message="two failed connection attempts")
        proc.send_signal(signal.SIGTERM)
        proc.wait(20)
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
    text = log_path.read_text(errors="replace")
    assert proc.returncode == 0 and "shutdown complete" in text, text
    assert not leaked(text, password), text
    assert TOKEN.split(":")[1] not in text
