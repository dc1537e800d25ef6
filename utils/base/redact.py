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
3. the bot token (``123456:***``, the bot id is public) and its secret half alone, and anything
   shaped like a bot token (:data:`TOKEN_SHAPE`), configured or not (a malformed ``BOT_TOKEN``, a
   token pasted into ``TELEGRAM_API_URL`` or ``WEBHOOK_URL``).

Every way out of the process passes through one :class:`Redactor`: the log handler's filter,
configuration errors (:class:`utils.config.ConfigError`) and the lines of ``main.py status``.
The URL is taken apart by :mod:`utils.base.dsn` only (one rule for where a password ends).

Standard library only: logging is set up before the heavy imports (utils/ops/bootstrap.py).
"""

from __future__ import annotations

import re

from utils.base.dsn import DatabaseUrl, database_passwords

MASK = "***"
#: A Telegram bot token anywhere in a text (``<bot id>:<secret>``), even one not configured.
TOKEN_SHAPE = re.compile(r"(?P<keep>(?<!\d)\d{5,20}:)[A-Za-z0-9_-]{30,64}(?![A-Za-z0-9_-])")
#: Shorter configured passwords are masked only inside a URL or DSN, never as a bare word.
MIN_BARE_SECRET_LENGTH = 4

#: ``scheme://user:PASSWORD@`` in any URL.
#: Up to the *last* ``@`` before the next space or ``/``: a password may hold ``@``.
URL_PASSWORD = re.compile(r"(?P<keep>\b[a-z][a-z0-9+.\-]*://[^\s/:@]*:)[^\s/]+(?=@)", re.IGNORECASE)
#: ``password=...`` anywhere in a text: a libpq DSN, a URL query or an environment line (``PGPASSWORD=...``);
#: the value single- or double-quoted (with backslash escapes) or up to a space, ``&`` or ``#``.
ANY_PASSWORD_SETTING = re.compile(
    r"""(?P<keep>password\s*=\s*)(?:'(?:[^'\\]|\\.)*'?|"(?:[^"\\]|\\.)*"?|[^\s&#'"]+)""",
    re.IGNORECASE,
)
#: ``'password': '...'`` in the repr of a dict (e.g. psycopg's ``conninfo_to_dict``) or JSON.
MAPPING_PASSWORD = re.compile(
    r"""(?P<keep>["']password["']\s*:\s*)(?:'(?:[^'\\]|\\.)*'|"(?:[^"\\]|\\.)*")""", re.IGNORECASE
)


def mask_token(token: str) -> str:
    """``123456:AA...`` -> ``123456:***``: the bot id is public, the secret is not."""
    bot_id, _, _ = token.partition(":")
    return f"{bot_id}:***" if bot_id.isdigit() else "***"


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

    def __init__(self, *, token: str | None = None, database_url: str | DatabaseUrl | None = None) -> None:
        """*database_url* as configured (taken apart by :mod:`utils.base.dsn`) or already parsed."""
        self._token_forms: list[tuple[str, str]] = []
        if token:
            self._token_forms.append((token, mask_token(token)))
            secret_half = token.partition(":")[2]
            if secret_half:
                self._token_forms.append((secret_half, MASK))
        passwords = (database_url.all_passwords if isinstance(database_url, DatabaseUrl)
                     else database_passwords(database_url))
        # Longest first: one password may contain another.
        self._passwords = [password_pattern(p) for p in sorted(set(passwords),
                                                                key=len, reverse=True)]

    def __call__(self, text: str) -> str:
        for password in self._passwords:
            text = password.sub(MASK, text)
        for secret, masked in self._token_forms:
            if secret in text:
                text = text.replace(secret, masked)
        text = TOKEN_SHAPE.sub(rf"\g<keep>{MASK}", text)
        text = URL_PASSWORD.sub(rf"\g<keep>{MASK}", text)
        text = ANY_PASSWORD_SETTING.sub(rf"\g<keep>{MASK}", text)
        return MAPPING_PASSWORD.sub(rf"\g<keep>'{MASK}'", text)
