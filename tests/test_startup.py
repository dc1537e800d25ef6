"""The first seconds of ``python main.py``: one line at once (before the seconds of aiogram imports),
``--help`` on stdout, usage errors on stderr with exit 2."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import tomllib
from collections.abc import Iterator
from pathlib import Path

import pytest

import utils
from tests.conftest import KILL_WAIT, ROOT, TOKEN, LoadAllowance, free_port, kill_group, run_main_in_process
from utils.ops.logging_setup import TEXT_FORMAT

#: The issue's bound: the first log line within half a second of exec.
FIRST_LINE_WITHIN = 0.5
#: Python's start plus bootstrap's imports on an idle machine of the project's kind. When the machine
#: is busier, only that surplus, measured just before, is added to the bound; heavy imports before
#: the line (seconds) would still fail it.
IDLE_START_COST = 0.15
FIRST_LINE = "solobot {version} (pid {pid}): configuration from {source}; loading the bot"


def test_version_is_the_projects() -> None:
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    assert utils.__version__ == project["version"]


def main_py(*args: str) -> subprocess.CompletedProcess[str]:
    """``python main.py ARGS``'s command-line handling, in-process (tests/conftest.py)."""
    return run_main_in_process(*args, env={"PATH": "/usr/bin:/bin"})


def test_help_is_on_stdout_with_exit_0() -> None:
    for flag in ("--help", "-h", "help"):
        done = main_py(flag)
        assert done.returncode == 0, done.stderr
        assert done.stderr == ""
        assert "python main.py status" in done.stdout and "Exit codes" in done.stdout


@pytest.mark.parametrize("argv", [["bogus"], ["status", "extra"], ["--help", "extra"], ["--verbose"]])
def test_usage_errors_exit_2_on_stderr(argv: list[str]) -> None:
    done = main_py(*argv)
    assert done.returncode == 2
    assert done.stdout == ""
    assert "python main.py status" in done.stderr


class Starting:
    """``python main.py`` with its stderr on a pipe, killed (its whole session) at the end."""

    def __init__(self, env: dict[str, str]) -> None:
        self.started = time.monotonic()
        self.proc = subprocess.Popen([sys.executable, str(ROOT / "main.py")], cwd=ROOT, env=env,
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                                     start_new_session=True)

    def first_line(self) -> tuple[str, float]:
        assert self.proc.stderr is not None
        line = self.proc.stderr.readline()
        return line.rstrip("\n"), time.monotonic() - self.started

    def stop(self) -> None:
        kill_group(self.proc.pid)
        self.proc.wait(KILL_WAIT)
        if self.proc.stderr is not None:
            self.proc.stderr.close()


@pytest.fixture
def start(tmp_path: Path) -> Iterator[type[Starting]]:
    started: list[Starting] = []

    class Tracked(Starting):
        def __init__(self, env: dict[str, str]) -> None:
            base = {k: v for k, v in os.environ.items() if not k.startswith(("NOTIFY_", "WATCHDOG_"))}
            base.update({"BOT_TOKEN": TOKEN, "TELEGRAM_API_URL": f"http://127.0.0.1:{free_port()}",
                         "LOCK_DIR": str(tmp_path / "lock"), "STATE_DIR": str(tmp_path / "state"),
                         "HEALTH_PORT": "0", "ENV_FILE": os.devnull})
            base.pop("PYTHONUNBUFFERED", None)  # the line must be flushed by solobot itself
            super().__init__({**base, **env})
            started.append(self)

    yield Tracked
    for process in started:
        process.stop()


def parse_text_line(line: str) -> tuple[str, str, str]:
    """(level, logger, message) of a line in :data:`TEXT_FORMAT` (the time is two words)."""
    assert TEXT_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    _date, _time, level, rest = line.split(" ", 3)
    logger, _, message = rest.partition(": ")
    return level, logger, message


@pytest.mark.xdist_group("timing")
def test_first_line_within_half_a_second_text_and_json(start: type[Starting], tmp_path: Path) -> None:
    env_file = tmp_path / "bot.env"
    env_file.write_text("ADMIN_IDS=1\n")
    with LoadAllowance("utils.ops.bootstrap", idle=IDLE_START_COST) as load:
        text = start({"ENV_FILE": str(env_file), "LOG_FORMAT": "text"})
        line, elapsed = text.first_line()
    bound = FIRST_LINE_WITHIN + load.surplus
    assert elapsed < bound, f"{elapsed:.2f} s, bound {bound:.2f} s: {line}"
    assert parse_text_line(line) == (
        "INFO", "solobot",
        FIRST_LINE.format(version=utils.__version__, pid=text.proc.pid, source=f"the environment and {env_file}"))

    with LoadAllowance("utils.ops.bootstrap", idle=IDLE_START_COST) as load:
        as_json = start({"LOG_FORMAT": "json"})
        line, elapsed = as_json.first_line()
    bound = FIRST_LINE_WITHIN + load.surplus
    assert elapsed < bound, f"{elapsed:.2f} s, bound {bound:.2f} s: {line}"
    record = json.loads(line)
    assert record["level"] == "INFO" and record["logger"] == "solobot"
    assert record["msg"] == FIRST_LINE.format(version=utils.__version__, pid=as_json.proc.pid,
                                              source="the environment")
    # A stop right after the line, while the imports run, ends the start cleanly.
    as_json.proc.send_signal(signal.SIGTERM)
    assert as_json.proc.wait(20) == 0
