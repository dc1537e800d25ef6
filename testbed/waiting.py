"""Waiting for a positive marker, reading a bot's /health, free and listening ports: shared by the
tests, the container checks (tests/container/checks.py), the load balancer (testbed/balancer.py)
and the benchmarks (bench/harness.py). No pytest here."""

from __future__ import annotations

import json
import socket
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


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Does something accept connections on *port*?"""
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0
