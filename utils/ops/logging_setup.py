"""Logging: text or JSON lines on stderr, with every secret masked on the way out.

Masking is a filter on the one handler, not a convention at call sites: a third-party library that
logs a URL, a DSN or an exception with the token in it is masked too (what is masked, and in which
forms: utils/base/redact.py). The filter masks the rendered message, the traceback and the stack
before any formatter sees them, so the text and the JSON formats print the same masked text.

What would bypass the handler is routed through it: an uncaught exception (the interpreter would
print its traceback, a psycopg error with its DSN included, straight to stderr), one in a thread,
and warnings.
"""

from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from types import TracebackType

from utils.base.dsn import DatabaseUrl
from utils.base.redact import Redactor

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
QUIET_LIBRARY_LOGGERS = ("aiohttp.access", "apscheduler.scheduler", "apscheduler.executors.default")
#: Loggers whose lines anyone on the network can cause (aiohttp logs a malformed request at ERROR
#: with a traceback; asyncio an ``accept()`` failure on every attempt): one line per
#: :data:`NETWORK_LOG_INTERVAL` per logger, without its traceback, the rest dropped.
NETWORK_LOGGERS = ("aiohttp.server", "asyncio")
NETWORK_LOG_INTERVAL = 60.0
#: Loggers that stay at INFO even at LOG_LEVEL=DEBUG: aiosqlite logs every statement with its
#: values (the inbox's payloads) at DEBUG, hundreds of KB a minute while idle.
NEVER_DEBUG_LOGGERS = ("aiosqlite",)


class RateLimitFilter(logging.Filter):
    """At most one record per *interval* (per logger it is attached to); the others are dropped,
    counted, and the count is told with the next one that passes."""

    def __init__(self, interval: float, clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.interval = interval
        self.clock = clock
        self._last = float("-inf")
        self.dropped = 0

    def filter(self, record: logging.LogRecord) -> bool:
        now = self.clock()
        if now - self._last < self.interval:
            self.dropped += 1
            return False
        self._last = now
        record.msg = _rendered_message(record).splitlines()[0] if record.msg else record.msg
        record.args = None
        if record.exc_info and record.exc_info[1] is not None:
            record.msg = f"{record.msg}: {type(record.exc_info[1]).__name__}: {record.exc_info[1]}"
        record.exc_info, record.exc_text = None, None
        if self.dropped:
            record.msg = f"{record.msg} (and {self.dropped} more like it in {self.interval:.0f} s, not shown)"
            self.dropped = 0
        return True


class SecretMaskingFilter(logging.Filter):
    """Masks secrets in a record's message, traceback and stack (it changes the record)."""

    def __init__(self, redact: Redactor) -> None:
        super().__init__()
        self.redact = redact

    def filter(self, record: logging.LogRecord) -> bool:
        record.msg, record.args = self.redact(_rendered_message(record)), None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.redact(record.exc_text)
        if record.stack_info:
            record.stack_info = self.redact(record.stack_info)
        return True


def _rendered_message(record: logging.LogRecord) -> str:
    """``record.getMessage()``, or what there is when its arguments do not fit its format.

    logging would otherwise report the mismatch itself, printing the raw arguments unmasked.
    """
    try:
        return record.getMessage()
    except Exception as exc:  # noqa: BLE001 - any formatting error; the line must still go out masked
        return f"{record.msg!s} {record.args!r} (log arguments did not fit: {exc})"


class JsonFormatter(logging.Formatter):
    """One JSON object per line, for log shippers."""

    def format(self, record: logging.LogRecord) -> str:
        payload = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created))
            + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        if record.exc_info and not record.exc_text:
            record.exc_text = self.formatException(record.exc_info)
        if record.exc_text:
            payload["exc"] = record.exc_text
        if record.stack_info:
            payload["stack"] = record.stack_info
        return json.dumps(payload, ensure_ascii=False)


def _log_uncaught(
    exc_type: type[BaseException], exc: BaseException, tb: TracebackType | None
) -> None:
    logging.getLogger("solobot").critical("uncaught exception", exc_info=(exc_type, exc, tb))


def _log_uncaught_in_thread(args: threading.ExceptHookArgs) -> None:
    if args.exc_type is SystemExit or args.exc_value is None:
        return
    logging.getLogger("solobot").critical(
        "uncaught exception in thread %s", args.thread.name if args.thread else "?",
        exc_info=(args.exc_type, args.exc_value, args.exc_traceback),
    )


def configure_logging(
    level: str, fmt: str, *, token: str | None = None, database_url: str | DatabaseUrl | None = None
) -> None:
    """Install one masking stderr handler on the root logger and route stray output through it."""
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretMaskingFilter(Redactor(token=token, database_url=database_url)))
    handler.setFormatter(JsonFormatter() if fmt == "json" else logging.Formatter(TEXT_FORMAT))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    sys.excepthook = _log_uncaught
    threading.excepthook = _log_uncaught_in_thread
    logging.captureWarnings(True)
    # aiogram logs every update at INFO ("Update id=... is handled"); that is a DEBUG fact here.
    if level != "DEBUG":
        logging.getLogger("aiogram.event").setLevel(logging.WARNING)
    for noisy in QUIET_LIBRARY_LOGGERS:
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
    for name in NETWORK_LOGGERS:
        logger = logging.getLogger(name)
        logger.filters[:] = [f for f in logger.filters if not isinstance(f, RateLimitFilter)]
        logger.addFilter(RateLimitFilter(NETWORK_LOG_INTERVAL))
    for name in NEVER_DEBUG_LOGGERS:
        logging.getLogger(name).setLevel(max(logging.INFO, logging.getLevelName(level)))
