"""Logging: text or JSON lines on stderr, with every secret masked on the way out.

Masking is a filter on the handler, not a convention at call sites: a third-party library that
logs a URL or an exception with the token in it is masked too.
"""

from __future__ import annotations

import json
import logging
import sys
import time
from collections.abc import Iterable

from utils.config import mask_dsn, mask_token


class SecretMaskingFilter(logging.Filter):
    """Replaces each secret in the rendered message (and traceback) with its masked form."""

    def __init__(self, secrets: Iterable[tuple[str, str]]) -> None:
        super().__init__()
        self._secrets = [(s, m) for s, m in secrets if s]

    def mask(self, text: str) -> str:
        for secret, masked in self._secrets:
            if secret in text:
                text = text.replace(secret, masked)
        return text

    def filter(self, record: logging.LogRecord) -> bool:
        message = self.mask(record.getMessage())
        record.msg, record.args = message, None
        if record.exc_info and not record.exc_text:
            record.exc_text = logging.Formatter().formatException(record.exc_info)
        if record.exc_text:
            record.exc_text = self.mask(record.exc_text)
        return True


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
        if record.exc_text:
            payload["exc"] = record.exc_text
        return json.dumps(payload, ensure_ascii=False)


def configure_logging(
    level: str, fmt: str, *, token: str | None = None, database_url: str | None = None
) -> None:
    """Install one stderr handler on the root logger; quiet aiogram's per-update INFO lines."""
    secrets: list[tuple[str, str]] = []
    if token:
        secrets.append((token, mask_token(token)))
        secret_part = token.partition(":")[2]
        if secret_part:
            secrets.append((secret_part, "***"))
    if database_url:
        secrets.append((database_url, mask_dsn(database_url)))
    handler = logging.StreamHandler(sys.stderr)
    handler.addFilter(SecretMaskingFilter(secrets))
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    # aiogram logs every update at INFO ("Update id=... is handled"); that is a DEBUG fact here.
    if level != "DEBUG":
        logging.getLogger("aiogram.event").setLevel(logging.WARNING)
    for noisy in ("aiohttp.access", "apscheduler.scheduler", "apscheduler.executors.default"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, logging.getLevelName(level)))
