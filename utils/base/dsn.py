"""``DATABASE_URL`` taken apart once, by one rule, for everything that needs a part of it.

Why one parser: four readers used to split the URL their own way (SQLAlchemy's ``make_url``, a
regex for masking, ``urlsplit`` for error lines, another regex for the password), and they
disagreed exactly where it matters: a password with ``@`` in it was the password for one of them
and part of the host for another, so half of it reached a log as a "host name". Here the rule is
libpq's and ``urlsplit``'s: the user information ends at the **last** ``@`` before the path, so
``postgresql://u:p@ss@db/app`` is user ``u``, password ``p@ss``, host ``db``.

A libpq key/value string (``host=db password=...``) is not a URL: :func:`parse_database_url`
returns None for it and configuration refuses it without echoing any of it; :func:`database_passwords`
still finds its password, so that nothing printed on the way to that refusal can show it.

Everyone else uses the parts: configuration checks them, :class:`utils.state.database.DatabaseTarget`
builds SQLAlchemy's URL and libpq's DSN from them, :meth:`DatabaseUrl.location` names the server in
error lines, :class:`utils.base.redact.Redactor` masks their passwords.

Standard library only: configuration and log redaction use it before the heavy imports.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from urllib.parse import unquote

#: The schemes solobot accepts (SQLAlchemy's driver suffix included).
SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
DEFAULT_PG_PORT = 5432
#: The state database in STATE_DIR when DATABASE_URL is unset (SQLite).
SQLITE_FILE = "solobot.sqlite3"
#: The password of a libpq key/value string, quoted (backslash escapes) or up to a space.
KEY_VALUE_PASSWORD = re.compile(
    r"""password\s*=\s*(?:'(?P<quoted>(?:[^'\\]|\\.)*)'|(?P<plain>\S+))""", re.IGNORECASE
)


@dataclass(frozen=True)
class DatabaseUrl:
    """The parts of a PostgreSQL URL, decoded (``%40`` is ``@``)."""

    scheme: str
    user: str | None
    password: str | None = field(repr=False)
    #: As written: ``h1:5432,h2``, ``[::1]:7``, or empty (a socket directory may be in ``query``).
    hosts: str
    database: str
    query: dict[str, str] = field(default_factory=dict, repr=False)  # may hold ?password=

    @property
    def all_passwords(self) -> list[str]:
        """The password of the user information and of ``?password=`` (either may be set)."""
        return [p for p in (self.password, self.query.get("password")) if p]

    @property
    def usable(self) -> bool:
        """A scheme solobot connects with (``mysql://`` parses, but is refused)."""
        return self.scheme in SCHEMES

    def location(self) -> str:
        """``PostgreSQL host:port/database (user u)``: where, for error lines; never the password."""
        hosts = self.hosts or self.query.get("host", "")  # a socket directory: ?host=/run/postgresql
        port = self.query.get("port", str(DEFAULT_PG_PORT))
        shown_hosts = ",".join(_with_port(host, port) for host in (hosts or "localhost").split(","))
        database = self.database or self.query.get("dbname", "")
        user = self.user or self.query.get("user", "")
        described = f"PostgreSQL {shown_hosts}/{database}"
        return f"{described} (user {user})" if user else described


def has_port(host: str) -> bool:
    """Whether one ``host[:port]`` (``[v6]:port`` too) names a port."""
    return "]:" in host if host.startswith("[") else ":" in host


def _with_port(host: str, default_port: str) -> str:
    """``host:port`` as libpq would connect (a socket directory stays a path)."""
    if host.startswith("/") or has_port(host):
        return host
    return f"{host}:{default_port}"


def parse_database_url(text: str | None) -> DatabaseUrl | None:
    """*text* taken apart, or None when it is not a ``scheme://`` URL (e.g. libpq key/value)."""
    if not text or "://" not in text:
        return None
    scheme, _, rest = text.partition("://")
    # The authority ends at the first "/" (the database name follows); without a path, at the
    # first "?" after the last "@" (a password may hold "?" and "#", never a raw "/").
    slash = rest.find("/")
    authority_end = slash if slash >= 0 else len(rest)
    at = rest.rfind("@", 0, authority_end)
    userinfo, after = (rest[:at], rest[at + 1:]) if at >= 0 else (None, rest)
    hosts_end = min((i for i in (after.find("/"), after.find("?")) if i >= 0), default=len(after))
    hosts, tail = after[:hosts_end], after[hosts_end:]
    path, _, query_text = tail.partition("?")
    query: dict[str, str] = {}
    for pair in query_text.partition("#")[0].split("&") if query_text else ():
        key, _, value = pair.partition("=")
        if key:
            query[unquote(key)] = unquote(value)
    user: str | None = None
    password: str | None = None
    if userinfo is not None:
        raw_user, colon, raw_password = userinfo.partition(":")
        user = unquote(raw_user) or None
        password = unquote(raw_password) if colon else None
    return DatabaseUrl(scheme=scheme.lower(), user=user, password=password, hosts=hosts,
                       database=unquote(path.lstrip("/")), query=query)


def database_passwords(text: str | None) -> list[str]:
    """Every password *text* carries: a URL's (decoded; user information and ``?password=``) or,
    for a libpq key/value string that configuration refuses, its ``password=`` value (unquoted)."""
    if not text:
        return []
    parsed = parse_database_url(text)
    if parsed is not None:
        return parsed.all_passwords
    match = KEY_VALUE_PASSWORD.search(text)
    if match is None:
        return []
    if match["quoted"] is not None:
        return [re.sub(r"\\(.)", r"\1", match["quoted"])]
    return [match["plain"]]
