"""A database error as one line an operator can act on: where (host, port, database, user) and why.

Why this exists: a bare ``OperationalError`` in a log says neither which server nor what it
answered, and its full text spans several lines (libpq's hint, SQLAlchemy's "Background on this
error" link). :func:`describe_database_error` gives ``PostgreSQL 10.0.0.5:5432/solobot (user
solobot): Connection refused`` for every failure a caller can meet on the way to the database:
psycopg and SQLAlchemy errors (the driver's own is used), ``OSError`` and ``TimeoutError``. The
password never appears: the location is built without it, and the reason is passed through
:class:`utils.base.redact.Redactor` as well (a server may quote a DSN back).

Standard library only (and the stdlib-only redactor): it is used where the driver may not even
import, and in log lines of every layer.
"""

from __future__ import annotations

import re

from utils.base.dsn import DatabaseUrl, parse_database_url
from utils.base.redact import Redactor

#: The location of the default state database (SQLite in STATE_DIR) in error lines.
SQLITE_LOCATION = "SQLite state database"
#: Where, when DATABASE_URL is not a URL (configuration refuses it first; nothing of it is shown).
NOT_A_URL_LOCATION = "PostgreSQL (DATABASE_URL is not a URL)"
#: libpq prefixes a server's refusal with its severity: ``FATAL:  database "x" does not exist``.
SEVERITY_PREFIX = re.compile(r"^(?:FATAL|ERROR|PANIC):\s+")
#: One failed attempt in libpq's text: ``connection to server at "h" (addr), port 5432 failed: REASON``.
ATTEMPT_FAILED = re.compile(r".*failed:\s*(?P<reason>.+)$")
#: libpq's hint lines (tab-indented), psycopg's header over several attempts and SQLAlchemy's link
#: line add nothing to the one line.
NOISE_LINE = re.compile(
    r"^(?:\t|\s*Is the server running|\s*\(Background on this error at:|.*Multiple connection attempts failed)"
)


def database_location(database_url: str | DatabaseUrl | None) -> str:
    """``PostgreSQL host:port/database (user u)`` from a database URL (as configured or already
    parsed), without its password; the SQLite database's name without one."""
    if not database_url:
        return SQLITE_LOCATION
    parts = database_url if isinstance(database_url, DatabaseUrl) else parse_database_url(database_url)
    return NOT_A_URL_LOCATION if parts is None else parts.location()


def _driver_error(exc: BaseException) -> BaseException:
    """The driver's exception under SQLAlchemy's wrapper (``DBAPIError.orig``), else *exc*."""
    orig = getattr(exc, "orig", None)
    return orig if isinstance(orig, BaseException) else exc


def _libpq_reason(text: str) -> str:
    """The server's or the network's reason in libpq's connection-failure text (all attempts)."""
    reasons: list[str] = []
    for line in text.splitlines():
        if not line.strip() or NOISE_LINE.match(line):
            continue
        found = ATTEMPT_FAILED.search(line)
        reason = found["reason"] if found else line.removeprefix("connection failed:")
        reason = SEVERITY_PREFIX.sub("", reason.strip())
        if reason and reason not in reasons:
            reasons.append(reason)
    return "; ".join(reasons)


def database_error_reason(exc: BaseException, *, waited: float | None = None) -> str:
    """Why the database could not be used, in the words of the server or the operating system."""
    exc = _driver_error(exc)
    name = type(exc).__name__
    if isinstance(exc, TimeoutError) or name == "ConnectionTimeout":
        within = f" within {waited:g} s" if waited is not None else ""
        return f"no answer{within} (the server or the network does not respond)"
    diag = getattr(exc, "diag", None)
    primary = getattr(diag, "message_primary", None)
    if isinstance(primary, str) and primary:
        sqlstate = getattr(exc, "sqlstate", None)
        return f"{primary} (SQLSTATE {sqlstate})" if sqlstate else primary
    if isinstance(exc, OSError) and exc.strerror:
        return exc.strerror
    text = str(exc).strip()
    if not text:
        return name
    reason = _libpq_reason(text)
    return reason or name


def describe_database_error(exc: BaseException, database_url: str | DatabaseUrl | None = None, *,
                            location: str | None = None, redactor: Redactor | None = None,
                            waited: float | None = None) -> str:
    """One line: where the database is (no password) and why it failed.

    A caller that holds a parsed target passes its *location* and *redactor* (made once from
    the URL: nothing is parsed again per error); otherwise both come from *database_url*.
    *waited* is the time limit a caller's own timeout enforced, for a :class:`TimeoutError`.
    """
    where = location if location is not None else database_location(database_url)
    line = f"{where}: {database_error_reason(exc, waited=waited)}"
    line = " ".join(line.split())  # one line, whatever the server sent
    return (redactor or Redactor(database_url=database_url))(line)
