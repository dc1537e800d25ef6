"""Waiting for a positive marker, and reading a bot's /health: shared by the tests, the container
checks (tests/container/checks.py) and the benchmarks (bench/harness.py). No pytest here."""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
from collections.abc import Callable
from typing import Any, TypeVar

T = TypeVar("T")

#: A /health request gives up after this (a bot that does not answer counts as "no answer yet").
HEALTH_TIMEOUT = 2.0


def wait_until(predicate: Callable[[], T | None], timeout: float = 10.0, message: str = "condition",
               interval: float = 0.01, *, error: Callable[[str], Exception] = AssertionError) -> T:
    """Poll *predicate* until it returns something truthy and return that; after *timeout*
    seconds raise *error* naming *message* (AssertionError: a test failure)."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise error(f"timed out after {timeout:g} s waiting for {message}")
        time.sleep(interval)


def get_health(port: int, host: str = "127.0.0.1") -> dict[str, Any] | None:
    """A bot's /health as a dict, or None if it does not answer (yet) or answers garbage."""
    if not port:
        return None
    try:
        with urllib.request.urlopen(f"http://{host}:{port}/health", timeout=HEALTH_TIMEOUT) as r:
            return dict(json.loads(r.read()))
    except (urllib.error.URLError, ConnectionError, TimeoutError, json.JSONDecodeError):
        return None
