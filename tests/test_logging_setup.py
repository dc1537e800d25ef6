"""Logs: JSON lines when asked; secrets masked even inside tracebacks and third-party messages."""

from __future__ import annotations

import json
import logging

import pytest

from tests.conftest import TOKEN
from utils.ops.logging_setup import configure_logging


def test_json_lines_and_masking(capsys: pytest.CaptureFixture[str]) -> None:
    configure_logging("INFO", "json", token=TOKEN, database_url="postgresql://u:hunter2@db/x")
    log = logging.getLogger("somelib")
    log.info("GET https://api.telegram.org/bot%s/getMe", TOKEN)
    try:
        raise RuntimeError(f"cannot reach postgresql://u:hunter2@db/x with {TOKEN}")
    except RuntimeError:
        log.exception("failed")
    lines = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    assert lines[0]["msg"] == "GET https://api.telegram.org/bot123456:***/getMe"
    assert lines[0]["level"] == "INFO" and lines[0]["logger"] == "somelib"
    text = json.dumps(lines)
    assert TOKEN.split(":")[1] not in text and "hunter2" not in text
    assert "u:***@db" in lines[1]["exc"]
    logging.getLogger().handlers.clear()
