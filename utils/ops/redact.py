"""Masking secrets in text bound for a log: the bot token and the database password, in every form.

Why patterns and not only the configured strings: the password reaches a log in forms the
configuration never spelled out. SQLAlchemy re-renders the URL (re-encoding the password its own
way); libpq and psycopg speak key/value DSNs (``password=... host=...``, quoted when it has spaces);
an error may quote the password alone; a URL may carry it percent-encoded. So :class:`Redactor`
masks, in this order:

1. the configured password itself, wherever it appears, each character either literal or
   percent-encoded (any hex case, ``+`` for a space) or backslash-escaped as ``repr`` would; bare
   only when it is at least :data:`MIN_BARE_SECRET_LENGTH` characters long (masking every ``ab``
   would eat ordinary words), otherwise only where a URL or a DSN would hold it;
2. the password field of *any* URL (``scheme://user:***@host``) and of any key/value DSN
   (``password=***``), whoever's it is;
3. the bot token (``123456:***``, the bot id is public) and its secret half alone.

Standard library only: logging is set up before the heavy imports (utils/ops/bootstrap.py).
"""

from __future__ import annotations

import re
from urllib.parse import parse_qs, unquote

from utils.config import mask_token

MASK = "***"
#: Shorter configured passwords are masked only inside a URL or DSN, never as a bare word.
MIN_BARE_SECRET_LENGTH = 4

#: ``scheme://user:PASSWORD@`` in any URL.
URL_PASSWORD = re.compile(r"(?P<keep>\b[a-z][a-z0-9+.\-]*://[^\s/:@]*:)[^\s/@]+(?=@)", re.IGNORECASE)
#: ``password=...`` in a libpq DSN, a URL query or an environment line (``PGPASSWORD=...``);
#: the value single- or double-quoted (with backslash escapes) or up to a space, ``&`` or ``#``.
KEY_VALUE_PASSWORD = re.compile(
    r"""(?P<keep>password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s&#'"]+)""",
    re.IGNORECASE,
)
#: ``'password': '...'`` in the repr of a dict (e.g. psycopg's ``conninfo_to_dict``) or JSON.
MAPPING_PASSWORD = re.compile(
    r"""(?P<keep>["']password["']\s*:\s*)(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""", re.IGNORECASE
)
#: The userinfo of a URL as SQLAlchemy's ``make_url`` reads it (the password up to the first ``@``).
URL_USERINFO = re.compile(r"^[\w+]+://(?P<user>[^:/]*)(?::(?P<password>[^@]*))?@")
#: The password of a libpq key/value DSN, quoted or not.
DSN_PASSWORD = re.compile(
    r"""password\s*=\s*(?:'(?P<quoted>(?:[^'\\]|\\.)*)'|(?P<plain>\S+))""", re.IGNORECASE
)


def database_password(database_url: str | None) -> str | None:
    """The password a database URL (decoded) or libpq key/value DSN carries, if any."""
    if not database_url:
        return None
    if "://" not in database_url:
        match = DSN_PASSWORD.search(database_url)
        if match is None:
            return None
        if match["quoted"] is not None:
            return re.sub(r"\\(.)", r"\1", match["quoted"])
        return match["plain"]
    userinfo = URL_USERINFO.match(database_url)
    if userinfo is not None and userinfo["password"]:
        return unquote(userinfo["password"])
    query = database_url.partition("?")[2].partition("#")[0]
    from_query = parse_qs(query).get("password")
    return from_query[0] if from_query else None


def _hex_either_case(byte: int) -> str:
    return "".join(f"[{c.lower()}{c.upper()}]" if c.isalpha() else c for c in f"{byte:02x}")


def _character_forms(char: str) -> str:
    """A regex for one password character in any form a log could print it in."""
    forms = [re.escape(char), "".join(f"%{_hex_either_case(b)}" for b in char.encode())]
    if char == " ":
        forms.append(r"\+")
    if char == "\\":
        forms.append(r"\\\\")  # repr() doubles a backslash
    elif char in "'\"":
        forms.append(r"\\+" + re.escape(char))  # repr() or a quoted DSN value escapes a quote
    return "(?:" + "|".join(forms) + ")"


def password_pattern(password: str) -> re.Pattern[str]:
    """Matches *password* written literally, percent-encoded (any mix) or repr-escaped."""
    body = "".join(_character_forms(char) for char in password)
    if len(password) >= MIN_BARE_SECRET_LENGTH:
        return re.compile(body)
    # Too short to mask as a bare word: only where a URL (":pw@") or a DSN ("=pw", "='pw'") puts it.
    return re.compile(rf"(?<=[:='\"]){body}(?=[@'\"&\s]|$)")


class Redactor:
    """Masks the secrets of one configuration (and any URL/DSN password) in a text."""

    def __init__(self, *, token: str | None = None, database_url: str | None = None) -> None:
        self._token_forms: list[tuple[str, str]] = []
        if token:
            self._token_forms.append((token, mask_token(token)))
            secret_half = token.partition(":")[2]
            if secret_half:
                self._token_forms.append((secret_half, MASK))
        password = database_password(database_url)
        self._password = password_pattern(password) if password else None

    def __call__(self, text: str) -> str:
        if self._password is not None:
            text = self._password.sub(MASK, text)
        for secret, masked in self._token_forms:
            if secret in text:
                text = text.replace(secret, masked)
        text = URL_PASSWORD.sub(rf"\g<keep>{MASK}", text)
        text = KEY_VALUE_PASSWORD.sub(rf"\g<keep>{MASK}", text)
        return MAPPING_PASSWORD.sub(rf"\g<keep>'{MASK}'", text)
