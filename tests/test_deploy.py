"""Deployment: systemd units verified, sd_notify over a real socket, PID 1, Docker files checked."""

from __future__ import annotations

import asyncio
import json
import os
import re
import shlex
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import psutil
import pytest
import yaml

from tests.conftest import BOT_ID, OWNER_VARIABLE, ROOT, BotProcess, have_unshare, wait_until
from tests.daemon import StartDaemon, in_process, wait_for  # noqa: F401

Spawn = Callable[..., BotProcess]
UNITS = sorted((ROOT / "deploy" / "systemd").glob("*.service"))


SYSTEMD = ROOT / "deploy" / "systemd"


def unit_settings(path: Path) -> dict[str, str]:
    """The unit's settings (for a setting given several times, the last)."""
    return {key: values[-1] for key, values in unit_setting_lists(path.read_text()).items()}


def unit_setting_lists(text: str) -> dict[str, list[str]]:
    """Every value of every setting, in order (EnvironmentFile= may be given several times)."""
    settings: dict[str, list[str]] = {}
    for line in text.splitlines():
        if "=" in line and not line.startswith(("#", ";")):
            key, _, value = line.partition("=")
            settings.setdefault(key.strip(), []).append(value.strip())
    return settings


def named_bot_copy_unit(name: str) -> str:
    """solobot-copy@.service adapted to the bot that ``solobot@NAME`` runs, as the systemd README says:
    four lines changed."""
    text = (SYSTEMD / "solobot-copy@.service").read_text()
    for old, new in (("EnvironmentFile=/etc/solobot/solobot.env", f"EnvironmentFile=/etc/solobot/{name}.env"),
                     ("EnvironmentFile=/etc/solobot/copy-%i.env", f"EnvironmentFile=/etc/solobot/{name}-copy-%i.env"),
                     ("RuntimeDirectory=solobot\n", f"RuntimeDirectory=solobot/{name}\n"),
                     ("StateDirectory=solobot\n", f"StateDirectory=solobot/{name}\n")):
        assert text.count(old) == 1, old
        text = text.replace(old, new)
    return text


def assert_verify_clean(text: str, unit_name: str, tmp_path: Path) -> None:
    """``systemd-analyze verify`` says nothing about the unit *text* installed as *unit_name*."""
    assert shutil.which("systemd-analyze"), ".ci/run installs systemd"
    # verify insists that ExecStart exists: point the install paths at this checkout.
    text = (text
            .replace("/opt/solobot/.venv/bin/python", str(Path(sys.executable).resolve()))
            .replace("/opt/solobot/main.py", str(ROOT / "main.py"))
            .replace("WorkingDirectory=/opt/solobot", f"WorkingDirectory={ROOT}"))
    (tmp_path / unit_name).write_text(text)
    done = subprocess.run(["systemd-analyze", "verify", str(tmp_path / unit_name)],
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0 and done.stdout.strip() == "" and done.stderr.strip() == "", done.stderr


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_systemd_analyze_verify_is_clean(unit: Path, tmp_path: Path) -> None:
    assert_verify_clean(unit.read_text(), unit.name.replace("@.service", "@2.service"), tmp_path)


def test_named_bot_copy_unit_verifies(tmp_path: Path) -> None:
    readme = (SYSTEMD / "README.md").read_text()
    assert "solobot-NAME-copy@.service" in readme and "RuntimeDirectory=solobot/NAME" in readme
    assert_verify_clean(named_bot_copy_unit("shop"), "solobot-shop-copy@2.service", tmp_path)


def test_copies_of_one_bot_share_a_lock_directory_they_may_write() -> None:
    """ProtectSystem=strict leaves only a unit's own directories writable: copies of one bot must
    name the same RuntimeDirectory (LOCK_DIR defaults to it) and keep it when one of them stops."""
    for one, copy in (((SYSTEMD / "solobot.service").read_text(), (SYSTEMD / "solobot-copy@.service").read_text()),
                      ((SYSTEMD / "solobot@.service").read_text().replace("%i", "shop"), named_bot_copy_unit("shop"))):
        first, second = unit_setting_lists(one), unit_setting_lists(copy)
        for s in (first, second):
            assert s["ProtectSystem"] == ["strict"] and s["RuntimeDirectoryPreserve"] == ["yes"]
            assert "ReadWritePaths" not in s and "LOCK_DIR" not in " ".join(s.get("Environment", []))
        assert second["RuntimeDirectory"] == first["RuntimeDirectory"]
        assert second["StateDirectory"] == first["StateDirectory"]
        assert second["EnvironmentFile"][0] == first["EnvironmentFile"][0], "the same bot"
    copy_files = unit_setting_lists((SYSTEMD / "solobot-copy@.service").read_text())["EnvironmentFile"]
    assert copy_files == ["/etc/solobot/solobot.env", "/etc/solobot/copy-%i.env"], "own HEALTH_PORT"
    for example in (SYSTEMD / "solobot.env.example", ROOT / ".env.example"):
        assert "LOCK_DIR=" not in example.read_text()


@pytest.mark.parametrize("unit", UNITS, ids=[u.name for u in UNITS])
def test_unit_properties(unit: Path) -> None:
    s = unit_settings(unit)
    assert s["Type"] == "notify" and s["Restart"] == "on-failure"
    assert s["RestartPreventExitStatus"] == "78" and s["KillMode"] == "mixed"
    assert int(s["TimeoutStopSec"]) > 8, "above the default SHUTDOWN_TIMEOUT"
    assert "WatchdogSec" in s and s["RuntimeDirectory"].startswith("solobot")
    assert s["StateDirectory"].startswith("solobot") and s["EnvironmentFile"].startswith("/etc/solobot/")
    assert s["User"] == "solobot"
    for hardening in ("NoNewPrivileges", "ProtectHome", "PrivateTmp"):
        assert s[hardening] == "yes"
    assert s["ProtectSystem"] == "strict"
    assert int(s["LimitNOFILE"]) >= 4096, "webhook connections beyond the default 1024 open files"
    if unit.name == "solobot@.service":  # one bot per instance name: its own files and directories
        assert "%i" in s["EnvironmentFile"] and "%i" in s["RuntimeDirectory"] and "%i" in s["StateDirectory"]


class NotifySocket:
    """An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.05)
        self.messages: list[tuple[float, str]] = []

    def drain(self) -> list[str]:
        while True:
            try:
                data = self.sock.recv(4096)
            except (TimeoutError, BlockingIOError):
                break
            self.messages.append((time.monotonic(), data.decode()))
        return [m for _, m in self.messages]


def test_sd_notify_ready_status_watchdog_stopping(spawn: Spawn, tmp_path: Path) -> None:
    notify = NotifySocket(tmp_path / "notify.sock")
    # A fresh Python (not forked, tests/conftest.py): the first STATUS must come before its heavy imports.
    a = spawn("a", fresh=True, NOTIFY_SOCKET=str(notify.path), WATCHDOG_USEC="2000000")
    wait_until(lambda: "READY=1" in notify.drain(), 20, message="READY=1")
    ready_at = next(t for t, m in notify.messages if m == "READY=1")
    wait_until(lambda: any(m.startswith("STATUS=active") for m in notify.drain()), 10, message="STATUS active")
    def pings_within_3s() -> list[float]:
        notify.drain()
        return [t for t, m in notify.messages if m == "WATCHDOG=1" and t - ready_at <= 3.0]

    wait_until(lambda: len(pings_within_3s()) >= 2 or time.monotonic() - ready_at > 3.2, 5)
    assert len(pings_within_3s()) >= 2, notify.messages
    a.signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    messages = notify.drain()
    assert "STOPPING=1" in messages
    statuses = [m for m in messages if m.startswith("STATUS=")]
    assert statuses[0] == "STATUS=starting: loading the bot", "said before the seconds of imports"
    assert statuses[1].startswith("STATUS=passive") and any(s.startswith("STATUS=stopping") for s in statuses)
    assert messages.index("READY=1") < messages.index("STOPPING=1")


async def test_no_watchdog_without_watchdog_usec(in_process: StartDaemon, tmp_path: Path,  # noqa: F811
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    """The whole daemon in-process (tests/daemon.py): systemd's variables come from the environment."""
    notify = NotifySocket(tmp_path / "n.sock")
    monkeypatch.setenv("NOTIFY_SOCKET", str(notify.path))
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    a = await in_process("a")
    await wait_for(lambda: "READY=1" in notify.drain(), 20, message="READY=1")
    await asyncio.sleep(1.2)  # the window in which a watchdog ping would have come: none may
    assert "WATCHDOG=1" not in notify.drain()
    assert await a.stop() == 0


@pytest.mark.skipif(not have_unshare(), reason="needs unshare with PID namespaces (root)")
def test_pid1_in_new_namespace_stops_cleanly(spawn: Spawn) -> None:
    """As in a container: python is PID 1, which ignores signals it has no handler for."""
    a = spawn("a", prefix=["unshare", "-pf", "--mount-proc"])
    a.wait_mode("active")
    health = a.health()
    assert health is not None and health["pid"] == 1
    psutil.Process(a.pid).children()[0].send_signal(signal.SIGTERM)
    assert a.wait_exit() == 0
    assert "shutdown complete" in a.log()


def readme_status_command() -> list[str]:
    """The ``main.py status`` command deploy/systemd/README.md tells an operator to run, as argv."""
    readme = (SYSTEMD / "README.md").read_text()
    blocks = re.findall(r"```sh\n(.*?)```", readme, re.S)
    command = next(b for b in blocks if "main.py status" in b).replace("\\\n", " ")
    return shlex.split(command)


def systemd_environment_file(path: Path) -> dict[str, str]:
    """What systemd's ``EnvironmentFile=`` sets from *path* (the documented subset: NAME=value lines,
    comments on lines of their own)."""
    values = {}
    for line in path.read_text().splitlines():
        if line.strip() and not line.lstrip().startswith(("#", ";")):
            name, _, value = line.partition("=")
            values[name.strip()] = value.strip()
    return values


def test_status_as_the_systemd_readme_says_finds_the_running_unit(spawn: Spawn, tmp_path: Path) -> None:
    """The unit's lock directory comes from RUNTIME_DIRECTORY and its settings from the environment
    file; ``status`` run the README's way must find that holder (exit 0), not "no active holder"."""
    runtime, state, etc = tmp_path / "run-solobot", tmp_path / "var-lib-solobot", tmp_path / "etc-solobot"
    for directory in (runtime, state, etc):
        directory.mkdir(mode=0o700)
    a = spawn("a", LOCK_DIR="", STATE_DIR="", RUNTIME_DIRECTORY=str(runtime), STATE_DIRECTORY=str(state))
    env_file = etc / "solobot.env"
    # What the installed unit's environment file would hold for this bot.
    bot_env = {k: v for k, v in a.env.items() if k in ("BOT_TOKEN", "TELEGRAM_API_URL", "HEALTH_PORT", "ADMIN_IDS")}
    env_file.write_text("# /etc/solobot/solobot.env\n" + "".join(f"{k}={v}\n" for k, v in bot_env.items()))
    assert systemd_environment_file(env_file) == bot_env
    a.wait_mode("active")

    argv = readme_status_command()
    assert argv[:3] == ["sudo", "-u", "solobot"], "as the unit's user"
    paths = {"/etc/solobot/solobot.env": str(env_file), "/run/solobot": str(runtime),
             "/var/lib/solobot": str(state), "/opt/solobot/.venv/bin/python": sys.executable,
             "/opt/solobot/main.py": str(ROOT / "main.py")}
    for old, new in paths.items():
        argv = [arg.replace(old, new) for arg in argv]
    # A login shell's environment: none of the unit's variables (the test runs as root, so no sudo).
    shell = {"PATH": "/usr/bin:/bin", "HOME": str(tmp_path), OWNER_VARIABLE: str(os.getpid())}
    done = subprocess.run(argv[3:], env=shell, cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr
    holder = json.loads(done.stdout)
    assert holder["pid"] == a.pid and holder["backend"] == "file"
    assert (runtime / f"solobot-{BOT_ID}.lock").exists() and any(state.iterdir())

    # Without the unit's directories (a plain shell with the file only), it would look elsewhere.
    plain = subprocess.run([sys.executable, str(ROOT / "main.py"), "status"],
                           env={**shell, "ENV_FILE": str(env_file), "LOCK_DIR": str(tmp_path / "elsewhere")},
                           cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert plain.returncode == 3, plain.stdout + plain.stderr


def dockerfile_instructions() -> list[tuple[str, str]]:
    text = (ROOT / "Dockerfile").read_text().replace("\\\n", " ")
    out = []
    for line in text.splitlines():
        line = line.strip()
        if line and not line.startswith("#"):
            keyword, _, rest = line.partition(" ")
            out.append((keyword.upper(), rest.strip()))
    return out


def test_dockerfile_properties() -> None:
    ins = dockerfile_instructions()
    keys = [k for k, _ in ins]
    assert re.fullmatch(r"python:3\.\d+-slim(-\w+)?", dict(ins)["FROM"])
    user = [v for k, v in ins if k == "USER"]
    assert user and not user[-1].startswith(("root", "0"))
    copies = [i for i, (k, v) in enumerate(ins) if k == "COPY"]
    pip = next(i for i, (k, v) in enumerate(ins) if k == "RUN" and "pip install" in v)
    assert ins[copies[0]][1].startswith("requirements"), "dependencies in their own layer"
    assert copies[0] < pip < copies[1], "requirements, then install, then the code"
    entry = json.loads(dict(ins)["ENTRYPOINT"])
    assert entry[0] == "python" and entry[1] == "main.py", "exec form: python is PID 1"
    assert dict(ins)["STOPSIGNAL"] == "SIGTERM"
    health = dict(ins)["HEALTHCHECK"]
    cmd = json.loads(health[health.index("CMD") + 3:].strip())
    assert cmd[0] == "python" and "curl" not in health and "/health" in health
    assert keys.index("USER") < keys.index("ENTRYPOINT")
    ignored = (ROOT / ".dockerignore").read_text().split()
    assert ".git" in ignored and ".env" in ignored and ".venv" in ignored


def test_compose_properties() -> None:
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    pg = compose["services"]["postgres"]
    assert "healthcheck" in pg and any("/var/lib/postgresql/data" in v for v in pg["volumes"])
    bot = compose["services"]["bot"]
    assert bot["deploy"]["replicas"] == 2
    assert bot["environment"]["LOCK_BACKEND"] == "postgres" and "postgres:5432" in bot["environment"]["DATABASE_URL"]
    assert bot["depends_on"]["postgres"]["condition"] == "service_healthy"
    grace = int(str(bot["stop_grace_period"]).rstrip("s"))
    assert grace > 8, "above SHUTDOWN_TIMEOUT"
    assert "pgdata" in compose["volumes"]
