"""The core settings from the environment (and the ``.env`` of the working directory), validated before anything starts.

Core: the daemon's own (token, lock, state, modes, limits). The autoposter's settings are its own
(:mod:`utils.autoposter.settings`); :mod:`utils.ops.daemon_settings` reads both with one reader
(:func:`load_configuration_with`), so this module never imports the autoposter.

Every problem is collected and reported in one message that names the variable (or the ``.env``
line), so an operator fixes a unit file once instead of once per restart. The bot token never
appears in a message: only the bot id (the part before the colon) is ever shown. A token that is
still a placeholder (``.env.example``'s, the README's) is refused with what to do instead: a
placeholder would only fail later, after seconds of retries, with a 401 or "malformed".
"""

from __future__ import annotations

import os
import re
import tempfile
from collections.abc import Callable, Mapping, MutableMapping
from dataclasses import dataclass, field, replace
from functools import cached_property
from pathlib import Path
from typing import TypeVar

from utils.base.dsn import SQLITE_FILE, DatabaseUrl, parse_database_url
from utils.base.env_reader import EnvReader
from utils.base.redact import Redactor, mask_token
from utils.sending.flood import Rate, SendLimits
from utils.updates.poison import POISON_AFTER_DEFAULT  # pure, light: config stays quick

T = TypeVar("T")

TOKEN_RE = re.compile(r"^(?P<bot_id>\d{5,20}):(?P<secret>[A-Za-z0-9_-]{30,64})$")
DEFAULT_API_URL = "https://api.telegram.org"
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")

#: Tokens our own examples show (.env.example, the README): never a real bot's.
PLACEHOLDER_TOKENS = frozenset({
    "123456:replace-with-the-token-from-BotFather",
    "123456:your-token",
})
#: The secret half of a token someone has not replaced yet: words a real (random) secret does not
#: spell, or characters it cannot hold (``<your token>``, ``...``).
PLACEHOLDER_SECRET_RE = re.compile(r"replace|your[-_ ]?token|botfather|[<>]|\.\.\.|^x+$", re.IGNORECASE)
#: Where the README explains running against the fake Bot API (no token needed).
TRY_WITHOUT_TOKEN = ("To try solobot without a token, against a fake Bot API on this machine: "
                     "see \"Try it without a token\" in README.md.")


def token_hints(origin: str | None) -> list[str]:
    """What to do when there is no usable token; *origin* is the ``.env`` line that set it, if one did."""
    get = "To get a token, send /newbot to @BotFather in Telegram"
    if origin:
        put = f"; then replace the placeholder on {origin} with it."
    else:
        put = ("; then put it in .env as BOT_TOKEN=<token> (cp .env.example .env starts one) or set "
               "BOT_TOKEN in the environment.")
    return [get + put, TRY_WITHOUT_TOKEN]


class ConfigError(Exception):
    """All configuration problems found, one per line, then what to do about them (if known).

    Every problem passes through *redact* here, whatever a check put in it: a value echoed back
    (a URL with the token in it, a password) is masked by construction, not by each check's care.
    """

    def __init__(self, problems: list[str], hints: list[str] | None = None,
                 redact: Redactor | None = None) -> None:
        redact = redact or Redactor()
        problems = [redact(p) for p in problems]
        self.problems = problems
        self.hints = hints or []
        text = "invalid configuration:\n" + "\n".join(f"  - {p}" for p in problems)
        if self.hints:
            text += "\n" + "\n".join(self.hints)
        super().__init__(text)


def is_placeholder_token(token: str) -> bool:
    """True for a token copied from an example and never replaced."""
    if token in PLACEHOLDER_TOKENS:
        return True
    _, colon, secret = token.partition(":")
    return bool(colon) and PLACEHOLDER_SECRET_RE.search(secret) is not None


@dataclass(frozen=True)
class Settings:
    """Validated settings. ``bot_token`` is excluded from ``repr`` so it cannot leak into a log."""

    bot_token: str = field(repr=False)
    bot_id: int
    api_url: str
    lock_backend: str
    lock_dir: Path
    state_dir: Path
    health_host: str
    health_port: int
    admin_ids: frozenset[int]
    log_level: str
    log_format: str
    lock_stale_seconds: float
    lock_takeover: bool
    database_url: str | None = field(repr=False)
    delete_webhook_on_conflict: bool
    polling_timeout: int
    handler_concurrency: int
    handler_warn_seconds: float
    inbox_max: int
    drain_timeout: float
    shutdown_timeout: float
    # Webhook mode (utils/updates/webhook.py); defaults keep polling.
    bot_mode: str = "polling"
    webhook_url: str | None = None
    webhook_secret: str = field(default="", repr=False)
    webhook_max_connections: int = 40
    #: Set when WEBHOOK_URL is plain http (one WARNING at startup, not a problem).
    webhook_insecure: bool = False
    #: Webhook mode: text sent (throttled) to a chat while no replica leads.
    passive_notice: str | None = None
    #: The ``.env`` file the settings were read with (None: the environment alone), for the
    #: start-up line that says where the configuration came from.
    env_file: Path | None = None
    #: Webhook mode: the webhook's own (balancer-facing) listener; port 0 shares HEALTH_PORT.
    webhook_host: str = "127.0.0.1"
    webhook_port: int = 0
    #: Telegram's send limits the bot keeps to (SEND_*; utils/sending).
    send_limits: SendLimits = field(default_factory=SendLimits)
    #: The user's bot: a module with an aiogram ``router`` (utils/ops/bot_module.py).
    bot_module: str = "bot"
    #: Poison updates (utils/updates/poison.py): set aside after this many deaths.
    poison_after: int = POISON_AFTER_DEFAULT
    #: ``DATABASE_URL`` taken apart (utils/base/dsn.py), once: what the state store, the lock
    #: backend, error lines and the log's masking use. None: SQLite in STATE_DIR.
    database: DatabaseUrl | None = field(default=None, repr=False, compare=False)

    def __post_init__(self) -> None:
        if self.database is None and self.database_url:  # built by hand, not by load_settings
            object.__setattr__(self, "database", parse_database_url(self.database_url))

    @property
    def masked_token(self) -> str:
        return mask_token(self.bot_token)

    @property
    def database_target(self) -> str:
        """Where the durable state lives, without credentials (for logs and /status)."""
        if self.database is not None:
            return self.database.location()
        return str(self.state_dir / SQLITE_FILE)

    @cached_property
    def redactor(self) -> Redactor:
        """Masks this configuration's secrets (and any token or password) in a text."""
        return Redactor(token=self.bot_token, database_url=self.database)


def default_lock_dir(env: Mapping[str, str]) -> Path:
    """systemd's RuntimeDirectory, else the per-user runtime dir, else the temp dir.

    ``$RUNTIME_DIRECTORY`` may hold several colon-separated paths; the first is ours.
    """
    if env.get("RUNTIME_DIRECTORY"):
        return Path(env["RUNTIME_DIRECTORY"].split(":")[0])
    if env.get("XDG_RUNTIME_DIR"):
        return Path(env["XDG_RUNTIME_DIR"]) / "solobot"
    return Path(tempfile.gettempdir()) / f"solobot-{os.getuid()}"


def default_state_dir(env: Mapping[str, str]) -> Path:
    if env.get("STATE_DIRECTORY"):
        return Path(env["STATE_DIRECTORY"].split(":")[0])
    return Path("data")


def load_settings(env: Mapping[str, str] | None = None,
                  origins: Mapping[str, str] | None = None) -> Settings:
    """The core settings alone (:func:`load_settings_with` reads the parts above them too)."""
    return load_settings_with(env, origins, read_nothing)[0]


def read_nothing(_reader: EnvReader) -> None:
    """No settings beyond the core's."""


def load_settings_with(env: Mapping[str, str] | None, origins: Mapping[str, str] | None,
                       read_more: Callable[[EnvReader], T]) -> tuple[Settings, T]:
    """Build :class:`Settings` from *env* (default: ``os.environ``), or raise :class:`ConfigError`.

    *origins* says where a variable came from when that is not the environment (``.env line 2``),
    for messages about its value.
    """
    env = os.environ if env is None else env
    origins = origins or {}
    r = EnvReader(env)
    hints: list[str] = []

    token = r.text("BOT_TOKEN") or ""
    bot_id = 0
    match = TOKEN_RE.match(token)
    token_origin = f" (set in {origins['BOT_TOKEN']})" if "BOT_TOKEN" in origins else ""
    if not token:
        r.problems.append("BOT_TOKEN: required (the token @BotFather gave you, like 123456:ABC-...)")
        hints = token_hints(None)
    elif is_placeholder_token(token):
        r.problems.append(f"BOT_TOKEN{token_origin}: still a placeholder from the examples, not a "
                          "bot's token")
        hints = token_hints(origins.get("BOT_TOKEN"))
    elif match is None:
        # Never echo the value: a malformed token is often a real token with a stray character.
        r.problems.append(
            "BOT_TOKEN: malformed (expected <digits>:<30-64 letters, digits, '-' or '_'>; value not shown)"
        )
    else:
        bot_id = int(match["bot_id"])

    api_url = (r.text("TELEGRAM_API_URL", DEFAULT_API_URL) or DEFAULT_API_URL).rstrip("/")
    if not re.match(r"^https?://[^/\s]+", api_url):
        r.problems.append(f"TELEGRAM_API_URL: expected an http(s) URL, got {api_url!r}")

    lock_backend = (r.text("LOCK_BACKEND", "file") or "file").lower()
    if lock_backend not in ("file", "postgres"):
        r.problems.append(f"LOCK_BACKEND: expected 'file' or 'postgres', got {lock_backend!r}")

    database_url = r.text("DATABASE_URL")
    database = parse_database_url(database_url)
    if database_url and (database is None or not database.usable):
        # Nothing of it is echoed: a key/value string or a mistyped URL may carry the password
        # anywhere. A libpq key/value string (host=... password=...) is refused, not guessed at:
        # one form, parsed by one rule (utils/base/dsn.py).
        kind = "a key=value string is not accepted; " if database is None else ""
        r.problems.append(f"DATABASE_URL: expected a postgresql://user:password@host:port/database "
                          f"URL ({kind}value not shown)")
    if lock_backend == "postgres" and not database_url:
        r.problems.append("DATABASE_URL: required when LOCK_BACKEND=postgres")

    lock_dir = Path(r.text("LOCK_DIR") or default_lock_dir(env))
    state_dir = Path(r.text("STATE_DIR") or default_state_dir(env))

    health_host = r.text("HEALTH_HOST", "127.0.0.1") or "127.0.0.1"
    health_port = r.whole("HEALTH_PORT", 8080, low=0, high=65535)

    admin_ids: set[int] = set()
    for part in (r.text("ADMIN_IDS") or "").split(","):
        part = part.strip()
        if not part:
            continue
        if re.fullmatch(r"\d{1,20}", part):
            admin_ids.add(int(part))
        else:
            r.problems.append(f"ADMIN_IDS: expected comma-separated numeric user ids, got {part!r}")

    log_level = (r.text("LOG_LEVEL", "INFO") or "INFO").upper()
    if log_level not in LOG_LEVELS:
        r.problems.append(f"LOG_LEVEL: expected one of {', '.join(LOG_LEVELS)}, got {log_level!r}")
    log_format = (r.text("LOG_FORMAT", "text") or "text").lower()
    if log_format not in ("text", "json"):
        r.problems.append(f"LOG_FORMAT: expected 'text' or 'json', got {log_format!r}")

    lock_stale = r.seconds("LOCK_STALE_SECONDS", 15.0, low=1.0, high=3600.0)
    takeover = r.flag("LOCK_TAKEOVER", True)
    delete_webhook = r.flag("DELETE_WEBHOOK_ON_CONFLICT", True)
    polling_timeout = r.whole("POLLING_TIMEOUT", 30, low=0, high=50)
    concurrency = r.whole("HANDLER_CONCURRENCY", 16, low=1, high=1000)
    handler_warn = r.seconds("HANDLER_WARN_SECONDS", 30.0, low=0.1, high=86400.0)
    inbox_max = r.whole("INBOX_MAX", 10_000, low=1, high=10_000_000)
    drain_timeout = r.seconds("DRAIN_TIMEOUT", 5.0, low=0.0, high=600.0)
    poison_after = r.whole("POISON_AFTER", POISON_AFTER_DEFAULT, low=1, high=1000)
    shutdown_timeout = r.seconds("SHUTDOWN_TIMEOUT", 8.0, low=1.0, high=3600.0)
    if drain_timeout >= shutdown_timeout:
        r.problems.append(
            f"DRAIN_TIMEOUT: must be below SHUTDOWN_TIMEOUT ({drain_timeout:g} >= {shutdown_timeout:g})"
        )

    bot_mode, webhook_url, webhook_secret, webhook_max_connections, webhook_insecure = _webhook_settings(
        r, token)
    passive_notice = r.text("PASSIVE_NOTICE")
    if passive_notice is not None and len(passive_notice) > TELEGRAM_TEXT_MAX:
        r.problems.append(f"PASSIVE_NOTICE: at most {TELEGRAM_TEXT_MAX} characters (a Telegram "
                          f"message), got {len(passive_notice)}")

    # The webhook's own port (issue 21): Telegram's side apart from the operators' HEALTH_PORT.
    webhook_host = r.text("WEBHOOK_HOST", "127.0.0.1") or "127.0.0.1"
    webhook_port = r.whole("WEBHOOK_PORT", 0, low=0, high=65535)
    if webhook_port and webhook_port == health_port:
        r.problems.append(f"WEBHOOK_PORT: must differ from HEALTH_PORT ({webhook_port}); unset it to "
                          "serve the webhook on HEALTH_PORT")
    if bot_mode == "webhook" and not webhook_port and health_port == 0:
        r.problems.append("WEBHOOK_PORT: required when BOT_MODE=webhook and HEALTH_PORT=0 (nothing "
                          "would receive Telegram's deliveries)")
    send_limits = _send_settings(r)
    bot_module = r.text("BOT_MODULE", "bot") or "bot"
    if not BOT_MODULE_RE.match(bot_module):
        r.problems.append(f"BOT_MODULE: expected a module name like 'bot' or 'mypackage.handlers', "
                          f"got {bot_module!r}")

    # A part above the core (the autoposter's settings, utils/ops/daemon_settings.py) reads with the
    # same reader: its problems are reported with these, in one message.
    more = read_more(r)
    if r.problems:
        # The raw text: a refused key/value string's password is masked too (utils/base/dsn.py).
        raise ConfigError(r.problems, hints, Redactor(token=token, database_url=database_url))
    return Settings(
        bot_token=token,
        bot_id=bot_id,
        api_url=api_url,
        lock_backend=lock_backend,
        lock_dir=lock_dir,
        state_dir=state_dir,
        health_host=health_host,
        health_port=health_port,
        admin_ids=frozenset(admin_ids),
        log_level=log_level,
        log_format=log_format,
        lock_stale_seconds=lock_stale,
        lock_takeover=takeover,
        database_url=database_url,
        delete_webhook_on_conflict=delete_webhook,
        polling_timeout=polling_timeout,
        handler_concurrency=concurrency,
        handler_warn_seconds=handler_warn,
        inbox_max=inbox_max,
        drain_timeout=drain_timeout,
        shutdown_timeout=shutdown_timeout,
        bot_mode=bot_mode,
        webhook_url=webhook_url,
        webhook_secret=webhook_secret,
        webhook_max_connections=webhook_max_connections,
        webhook_insecure=webhook_insecure,
        passive_notice=passive_notice,
        webhook_host=webhook_host,
        webhook_port=webhook_port,
        send_limits=send_limits,
        bot_module=bot_module,
        poison_after=poison_after,
        database=database,
    ), more


BOT_MODES = ("polling", "webhook")
#: A dotted Python module name (what ``import`` accepts).
BOT_MODULE_RE = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*)*$")
TELEGRAM_TEXT_MAX = 4096
#: Telegram's rule for ``secret_token``: 1-256 characters of ``A-Za-z0-9_-``.
WEBHOOK_SECRET_RE = re.compile(r"^[A-Za-z0-9_-]{1,256}$")
#: What the default secret is derived for (HMAC-SHA256 keyed with the token): every replica
#: computes the same value without configuration, and it reveals nothing about the token.
WEBHOOK_SECRET_PURPOSE = b"solobot webhook secret v1"


def derive_webhook_secret(token: str) -> str:
    """The default ``WEBHOOK_SECRET``: 64 hex characters, the same on every replica of a bot."""
    import hashlib
    import hmac

    return hmac.new(token.encode(), WEBHOOK_SECRET_PURPOSE, hashlib.sha256).hexdigest()


def _webhook_settings(r: EnvReader, token: str) -> tuple[str, str | None, str, int, bool]:
    """BOT_MODE, WEBHOOK_URL, WEBHOOK_SECRET (never echoed), WEBHOOK_MAX_CONNECTIONS."""
    mode = (r.text("BOT_MODE", "polling") or "polling").lower()
    if mode not in BOT_MODES:
        r.problems.append(f"BOT_MODE: expected 'polling' or 'webhook', got {mode!r}")
    url = r.text("WEBHOOK_URL")
    insecure = False
    if url is not None:
        if not re.match(r"^https?://[^/\s]+(/\S*)?$", url):
            r.problems.append(f"WEBHOOK_URL: expected an https:// URL, got {url!r}")
        insecure = url.startswith("http://")
    elif mode == "webhook":
        r.problems.append("WEBHOOK_URL: required when BOT_MODE=webhook (the public https:// URL "
                          "Telegram posts updates to)")
    secret = r.text("WEBHOOK_SECRET")
    if secret is not None and not WEBHOOK_SECRET_RE.match(secret):
        r.problems.append("WEBHOOK_SECRET: 1-256 characters of A-Z, a-z, 0-9, '_' and '-' "
                          "(Telegram's rule; value not shown)")
    if secret is None:
        secret = derive_webhook_secret(token) if token else ""
    max_connections = r.whole("WEBHOOK_MAX_CONNECTIONS", 40, low=1, high=100)
    return mode, url, secret, max_connections, insecure


def _send_settings(r: EnvReader) -> SendLimits:
    """SEND_*: the send limits (Telegram's by default; 0 as a rate means unlimited)."""
    default = SendLimits()
    def number(name: str, value: float, high: float, low: float = 0) -> float:
        return r.seconds(name, value, low=low, high=high, what="a number")

    overall = Rate(number("SEND_OVERALL_PER_SECOND", default.overall.per_second, 100_000),
                   number("SEND_OVERALL_BURST", default.overall.burst, 100_000, low=1))
    private = Rate(number("SEND_PRIVATE_PER_SECOND", default.private.per_second, 1000),
                   number("SEND_PRIVATE_BURST", default.private.burst, 1000, low=1))
    group = Rate(number("SEND_GROUP_PER_MINUTE", default.group.per_second * 60, 60_000) / 60,
                 number("SEND_GROUP_BURST", default.group.burst, 1000, low=1))
    paid_broadcast = r.flag("SEND_PAID_BROADCAST", False)
    retry_max = r.seconds("SEND_RETRY_MAX_SECONDS", default.retry_max, low=0, high=86400)
    return SendLimits(overall=overall, private=private, group=group, paid=default.paid,
                      paid_broadcast=paid_broadcast, retry_max=retry_max)


def load_configuration(environ: MutableMapping[str, str], cwd: Path) -> Settings:
    """The core settings alone (:func:`load_configuration_with` reads the parts above them too)."""
    return load_configuration_with(environ, cwd, read_nothing)[0]


def load_configuration_with(environ: MutableMapping[str, str], cwd: Path,
                            read_more: Callable[[EnvReader], T]) -> tuple[Settings, T]:
    """The ``.env`` of *cwd* (or ``$ENV_FILE``) under *environ*, then :func:`load_settings_with`.

    Variables already in *environ* win over the file; the file's others are added to *environ*
    (libpq and the rest of the process read ``os.environ`` too). Raises one :class:`ConfigError`
    with the file's unreadable lines and the settings' problems together, leaving out problems of
    a variable whose line could not be read ("BOT_TOKEN: required" when the line is there but
    has an unclosed quote would send the operator to the wrong place).
    """
    from utils.env_file import read_env_file

    env_file = read_env_file(environ, cwd)
    origins: dict[str, str] = {}
    for name, value in env_file.contents.values.items():
        if name not in environ:
            environ[name] = value
            origins[name] = env_file.origin(name) or ""
    file_problems = env_file.problems()
    try:
        settings, more = load_settings_with(environ, origins, read_more)
    except ConfigError as exc:
        skip = env_file.unparsed_names()
        kept = [p for p in exc.problems if p.partition(":")[0].split(" ")[0] not in skip]
        hints = [] if "BOT_TOKEN" in skip else exc.hints  # the hints are about the token
        raise ConfigError(file_problems + kept, hints) from None
    if file_problems:
        raise ConfigError(file_problems)
    return replace(settings, env_file=env_file.path), more
