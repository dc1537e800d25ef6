"""The container HEALTHCHECK: ``python -m utils.ops.healthcheck [PATH]`` (stdlib only).

It runs every few seconds next to the bot, so it must not pay for the bot's imports, and it
must probe the endpoint where the bot really listens: it reads ``HEALTH_HOST`` and
``HEALTH_PORT`` as :mod:`utils.config` does.

* ``HEALTH_HOST`` a wildcard (``0.0.0.0``, ``::``) is probed on the loopback of that family;
  any other address or name is probed as given (a bot bound to one interface only is not on
  127.0.0.1).
* ``PATH`` is ``/health`` by default: 200 in both modes, since a standby is healthy; pass
  ``/ready`` to call only the active, polling instance healthy.
* ``HEALTH_PORT=0`` turns the endpoint off. There is nothing to ask then, so the check falls
  back to liveness: healthy while the bot's process (``main.py``) is alive and not a zombie in
  this container, which is all an engine can learn without the endpoint. It says so in its
  output (``docker inspect`` shows it). To have no check at all, run with ``--no-healthcheck``
  (compose: ``healthcheck: {disable: true}``). See docs/containers.md.

Exit 0 healthy, 1 unhealthy (the engines reserve 2). One line of output says why.
"""

from __future__ import annotations

import ipaddress
import json
import os
import sys
import urllib.error
import urllib.request
from collections.abc import Mapping
from pathlib import Path

from utils.base.exit_codes import HEALTHY, UNHEALTHY

DEFAULT_HOST, DEFAULT_PORT, DEFAULT_PATH = "127.0.0.1", 8080, "/health"
#: Below the Dockerfile's ``HEALTHCHECK --timeout=3s``, so a slow answer is our verdict, not a kill.
PROBE_TIMEOUT = 2.0
#: What the bot listens on when told "all interfaces", and where it can then be reached locally.
WILDCARD_TO_LOOPBACK = {"0.0.0.0": "127.0.0.1", "::": "::1", "": DEFAULT_HOST}
BOT_SCRIPT = "main.py"
PROC = Path("/proc")


def probe_url(env: Mapping[str, str], path: str) -> str | None:
    """The URL to probe, or None when the endpoint is off (``HEALTH_PORT=0``).

    Raises ValueError for a port the bot would refuse too (it exits 78 then).
    """
    raw_port = env.get("HEALTH_PORT", "").strip() or str(DEFAULT_PORT)
    try:
        port = int(raw_port)
    except ValueError:
        raise ValueError(f"HEALTH_PORT: expected a whole number, got {raw_port!r}") from None
    if not 0 <= port <= 65535:
        raise ValueError(f"HEALTH_PORT: must be between 0 and 65535, got {port}")
    if port == 0:
        return None
    host = env.get("HEALTH_HOST", DEFAULT_HOST).strip()
    host = WILDCARD_TO_LOOPBACK.get(host, host)
    try:
        if ipaddress.ip_address(host).version == 6:
            host = f"[{host}]"
    except ValueError:
        pass  # a host name: used as given
    return f"http://{host}:{port}{path}"


def check_endpoint(url: str) -> tuple[int, str]:
    try:
        with urllib.request.urlopen(url, timeout=PROBE_TIMEOUT) as response:
            body = response.read(64 * 1024)
    except urllib.error.HTTPError as exc:
        return UNHEALTHY, f"unhealthy: {url} answered {exc.code}"
    except (urllib.error.URLError, OSError) as exc:
        reason = getattr(exc, "reason", exc)
        return UNHEALTHY, f"unhealthy: {url}: {reason}"
    return HEALTHY, f"healthy: {url} {summary(body)}".rstrip()


def summary(body: bytes) -> str:
    """``mode=active epoch=3`` from a /health body; empty for anything else."""
    try:
        data = json.loads(body)
    except ValueError:
        return ""
    if not isinstance(data, dict):
        return ""
    return " ".join(f"{key}={data[key]}" for key in ("mode", "epoch", "ready") if key in data)


def bot_process_alive(proc: Path | None = None, own_pid: int | None = None) -> int | None:
    """The PID of a live ``python main.py`` in this PID namespace, or None."""
    own = os.getpid() if own_pid is None else own_pid
    for entry in (PROC if proc is None else proc).iterdir():
        if not entry.name.isdigit() or int(entry.name) == own:
            continue
        try:
            argv = (entry / "cmdline").read_bytes().split(b"\0")
            stat = (entry / "stat").read_text()
        except OSError:
            continue  # gone meanwhile, or not ours to read
        state = stat.rsplit(")", 1)[-1].split()[0] if ")" in stat else "?"
        if state != "Z" and any(Path(arg.decode(errors="replace")).name == BOT_SCRIPT for arg in argv[:3]):
            return int(entry.name)
    return None


def check_liveness() -> tuple[int, str]:
    pid = bot_process_alive()
    if pid is None:
        return UNHEALTHY, f"unhealthy: HEALTH_PORT=0 (endpoint off) and no live {BOT_SCRIPT} process"
    return HEALTHY, f"healthy: HEALTH_PORT=0 (endpoint off): liveness only, {BOT_SCRIPT} is pid {pid}"


def run(argv: list[str], env: Mapping[str, str]) -> tuple[int, str]:
    path = argv[0] if argv else DEFAULT_PATH
    if not path.startswith("/") or len(argv) > 1:
        return UNHEALTHY, "usage: python -m utils.ops.healthcheck [/health|/ready]"
    try:
        url = probe_url(env, path)
    except ValueError as exc:
        return UNHEALTHY, f"unhealthy: {exc}"
    return check_liveness() if url is None else check_endpoint(url)


def main() -> int:
    code, message = run(sys.argv[1:], os.environ)
    print(message, flush=True)
    return code


if __name__ == "__main__":
    sys.exit(main())
