"""The ``.env`` file: read strictly from the working directory, environment first, values never shown."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from tests.conftest import ROOT, TOKEN, run_main_in_process
from utils.config import ConfigError, is_placeholder_token, load_configuration
from utils.env_file import parse_env_text, read_env_file

SECRET = TOKEN.partition(":")[2]


def problems_of(text: str) -> list[tuple[int, str | None]]:
    return [(p.line, p.name) for p in parse_env_text(text).problems]


@pytest.mark.parametrize(("text", "values"), [
    ("A=1\nB=two words\n", {"A": "1", "B": "two words"}),
    ("export A=1 # comment\n", {"A": "1"}),
    ("A = 1\n", {"A": "1"}),
    ("A='single # kept'\nB=\"double\"\n", {"A": "single # kept", "B": "double"}),
    ("A=\n", {"A": ""}),
    ("A=1\r\nB=2\r\n", {"A": "1", "B": "2"}),
    ("\ufeffA=1\n", {"A": "1"}),
    ("A=${HOME}$x\n", {"A": "${HOME}$x"}),  # literal: no expansion
    ("A=1\nA=2\n", {"A": "2"}),  # the last one wins
    ("# only a comment\n\n   \n", {}),
    ("A=no newline at the end", {"A": "no newline at the end"}),
])
def test_values_that_parse(text: str, values: dict[str, str]) -> None:
    contents = parse_env_text(text)
    assert contents.problems == []
    assert contents.values == values


@pytest.mark.parametrize(("text", "expected"), [
    ("A=1\nJUSTAWORD\nC=3\n", [(2, None)]),                      # no '='
    ("A=1\n\n\n# c\nB\n", [(5, None)]),                          # line counted past blanks/comments
    ('BOT_TOKEN="123456:abc\nADMIN_IDS=1\n', [(1, "BOT_TOKEN")]),  # unclosed quote
    ('A=1\nB="x\n# y "\nC=3\n', [(2, "B")]),                      # a quote closed lines later
    ("A='x' trailing\n", [(1, "A")]),                             # text after the closing quote
    ("1A=1\n", [(1, None)]),                                      # bad name
    ("A-B=1\n", [(1, None)]),
    ("=value\n", [(1, None)]),
    ("A B=1\n", [(1, None)]),
    ("X=1\nY\nZ='\n", [(2, None), (3, "Z")]),                     # every problem, not the first
])
def test_lines_that_do_not_parse(text: str, expected: list[tuple[int, str | None]]) -> None:
    assert problems_of(text) == expected


def test_a_problem_never_shows_the_line() -> None:
    contents = parse_env_text(f'{TOKEN}\nBOT_TOKEN="{TOKEN}\n')
    text = "\n".join(p.describe("/x/.env") for p in contents.problems)
    assert "/x/.env line 1:" in text and "/x/.env line 2 (BOT_TOKEN):" in text
    assert SECRET not in text


def test_working_directory_file_and_env_file_variable(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text("A=from-cwd\n")
    other = tmp_path / "other.env"
    other.write_text("A=from-other\n")
    assert read_env_file({}, tmp_path).contents.values == {"A": "from-cwd"}
    assert read_env_file({"ENV_FILE": "other.env"}, tmp_path).contents.values == {"A": "from-other"}
    assert read_env_file({"ENV_FILE": os.devnull}, tmp_path).contents.values == {}
    missing = read_env_file({"ENV_FILE": str(tmp_path / "nope.env")}, tmp_path)
    assert missing.problems() == [f"ENV_FILE: {tmp_path / 'nope.env'} does not exist"]
    assert read_env_file({}, tmp_path / "empty-dir").problems() == []  # no .env: nothing to read


def test_environment_wins_and_file_fills_the_rest(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"BOT_TOKEN={TOKEN}\nHEALTH_PORT=9999\nADMIN_IDS=5\n")
    environ = {"HEALTH_PORT": "0"}
    settings = load_configuration(environ, tmp_path)
    assert settings.health_port == 0 and settings.admin_ids == frozenset({5})
    assert environ["ADMIN_IDS"] == "5", "the file's other variables reach the process environment"


def test_file_problems_and_settings_problems_in_one_error(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f'BOT_TOKEN="{TOKEN}\nHEALTH_PORT=x\nNOEQUALS\n')
    with pytest.raises(ConfigError) as err:
        load_configuration({}, tmp_path)
    text = str(err.value)
    assert f"{tmp_path / '.env'} line 1 (BOT_TOKEN)" in text
    assert f"{tmp_path / '.env'} line 3:" in text
    assert "HEALTH_PORT" in text
    assert "BOT_TOKEN: required" not in text, "the BOT_TOKEN line is there: only its parse error is said"
    assert SECRET not in text


@pytest.mark.parametrize(("token", "placeholder"), [
    ("123456:replace-with-the-token-from-BotFather", True),
    ("123456:your-token", True),
    ("123456:<your token>", True),
    ("123456:...", True),
    (TOKEN, False),
    ("123456:AAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAAA", False),  # the README's fake-API token
])
def test_placeholder_tokens(token: str, placeholder: bool) -> None:
    assert is_placeholder_token(token) is placeholder


def test_placeholder_from_env_example_names_the_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text((ROOT / ".env.example").read_text())
    with pytest.raises(ConfigError) as err:
        load_configuration({}, tmp_path)
    line = next(n for n, text in enumerate((ROOT / ".env.example").read_text().splitlines(), 1)
                if text.startswith("BOT_TOKEN="))
    text = str(err.value)
    assert f"BOT_TOKEN (set in {tmp_path / '.env'} line {line}): still a placeholder" in text
    assert "@BotFather" in text and "Try it without a token" in text


def run_main(cwd: Path, **env: str) -> subprocess.CompletedProcess[str]:
    """``python main.py`` in *cwd*, up to its configuration, in-process (tests/conftest.py)."""
    return run_main_in_process(env={"PATH": "/usr/bin:/bin", **env}, cwd=cwd)


def test_unparsable_line_exits_78_naming_file_and_line(tmp_path: Path) -> None:
    (tmp_path / ".env").write_text(f"BOT_TOKEN={TOKEN}\nHEALTH_PORT=0\n{SECRET}\n")
    done = run_main(tmp_path)
    assert done.returncode == 78, done.stderr
    assert f"{tmp_path / '.env'} line 3:" in done.stderr
    assert SECRET not in done.stdout + done.stderr and "Traceback" not in done.stderr


def test_fresh_checkout_without_token_says_what_to_do(tmp_path: Path) -> None:
    """The README's run command on a fresh clone: no token anywhere, so it says how to get one."""
    done = run_main(tmp_path)
    assert done.returncode == 78
    assert "BOT_TOKEN: required" in done.stderr
    assert "@BotFather" in done.stderr and "cp .env.example .env" in done.stderr
    assert "Try it without a token" in done.stderr
    assert "Try it without a token" in (ROOT / "README.md").read_text()
