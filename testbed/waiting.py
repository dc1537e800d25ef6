"""Waiting for a positive marker, reading a bot's /health, free and listening ports: shared by the
tests, the container checks (tests/container/checks.py), the load balancer (testbed/balancer.py)
and the benchmarks (bench/harness.py). No pytest here."""

from __future__ import annotations

import itertools
import json
import os
import random
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
    """A TCP port on 127.0.0.1 that nothing uses right now, for a process about to listen on it.

    Not ``bind(("127.0.0.1", 0))``: that hands out a port of the ephemeral range, which any
    outgoing connection or another worker's pick may take in the seconds before a bot starting
    under load binds it (a test once read another worker's bot's /health on its bot's port). These
    come from below the ephemeral range, from a block of :data:`PORTS_PER_RUNNER` of this runner's
    own (pytest-xdist's ``gw0``, ``gw1``..., and one for a process outside pytest-xdist), from a
    random place in it (two such processes at once), each checked free when handed out.
    """
    base = FIRST_PORT + _runner_index() * PORTS_PER_RUNNER
    for _ in range(PORTS_PER_RUNNER):
        port = base + next(_port_counter) % PORTS_PER_RUNNER
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue  # in use (a service of the machine, a listener still closing)
        return port
    raise RuntimeError(f"no free port in {base}-{base + PORTS_PER_RUNNER - 1}")


#: :func:`free_port`'s ports start here, below Linux's ephemeral range (32768-60999 by default).
FIRST_PORT = 20000
PORTS_PER_RUNNER = 1000
_port_counter = itertools.count(random.randrange(PORTS_PER_RUNNER))


def _runner_index() -> int:
    """This process's block: pytest-xdist's ``gw3`` has block 4; 0 outside pytest-xdist."""
    worker = os.environ.get("PYTEST_XDIST_WORKER", "")
    return 1 + int(worker[2:]) if worker.startswith("gw") and worker[2:].isdigit() else 0


def listening(port: int, host: str = "127.0.0.1") -> bool:
    """Does something accept connections on *port*?"""
    with socket.socket() as s:
        return s.connect_ex((host, port)) == 0
