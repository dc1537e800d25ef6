"""``DATABASE_URL`` taken apart once, by one rule, for everything that needs a part of it.

Why one parser: four readers used to split the URL their own way (SQLAlchemy's ``make_url``, a
regex for masking, ``urlsplit`` for error lines, another regex for the password), and they
disagreed exactly where it matters: a password with ``@`` in it was the password for one of them
and part of the host for another, so half of it reached a log as a "host name". Here the rule is
libpq's and ``urlsplit``'s: the user information ends at the **last** ``@`` before the path, so
``postgresql://u:p@ss@db/app`` is user ``u``, password ``p@ss``, host ``db``.

A libpq key/value string (``host=db password=...``) is not a URL: :func:`parse_database_url`
returns None for it and configuration refuses it without echoing any of it.

Standard library only: configuration and log redaction use it before the heavy imports.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from urllib.parse import unquote

#: The schemes solobot accepts (SQLAlchemy's driver suffix included).
SCHEMES = ("postgresql", "postgres", "postgresql+psycopg")
DEFAULT_PG_PORT = 5432


@dataclass(frozen=True)
class DatabaseUrl:
    """The parts of a PostgreSQL URL, decoded (``%40`` is ``@``)."""

    scheme: str
    user: str | None
    password: str | None = field(repr=False)
    #: As written: ``h1:5432,h2``, ``[::1]:7``, or empty (a socket directory may be in ``query``).
    hosts: str
    database: str
    query: dict[str, str] = field(default_factory=dict)

    @property
    def all_passwords(self) -> list[str]:
        """The password of the user information and of ``?password=`` (either may be set)."""
        return [p for p in (self.password, self.query.get("password")) if p]


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
