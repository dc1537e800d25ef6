"""The ``.env`` file, read strictly: a line that cannot be read is a configuration error.

Why not ``load_dotenv()``: without a path it searches beside the *calling script* rather than in
the working directory, and a line it cannot parse earns only a warning, so the bot starts on
defaults, or reports ``BOT_TOKEN: required`` when the ``BOT_TOKEN`` line is there with an unclosed
quote. Here python-dotenv's own parser reads the file (its quoting and comment rules, ``export``
prefixes), and every line it cannot read, or that is not ``NAME=value`` on one line, becomes a
problem naming the file and the line. The value is never shown: the line may hold a token.

What is *not* done, on purpose: ``${VAR}`` expansion (values are literal, as in systemd's
``EnvironmentFile``, so a password containing ``$`` arrives intact) and multi-line values (no
setting takes one, so a quote that runs past its line is an unclosed quote).

Standard library and python-dotenv only: this runs before the heavy imports (utils/ops/bootstrap.py).
"""

from __future__ import annotations

import io
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path

from dotenv.parser import Binding, parse_stream

#: The file read from the working directory unless ``ENV_FILE`` names another one.
DEFAULT_ENV_FILE = ".env"
#: Names another file to read instead of ``./.env`` (``/dev/null``: read none).
ENV_FILE_VARIABLE = "ENV_FILE"

VARIABLE_NAME = re.compile(r"^[A-Za-z_][A-Za-z0-9_]*$")
#: The variable a line meant to set, when its start says so (for naming it in a problem).
LINE_START = re.compile(r"^\s*(?:export\s+)?(?P<name>[A-Za-z_][A-Za-z0-9_]*)\s*=")
NEWLINE = re.compile(r"\r\n|\n|\r")


@dataclass(frozen=True)
class EnvLineProblem:
    """One line that cannot be used; *name* only when the line clearly starts with ``NAME=``."""

    line: int
    reason: str
    name: str | None = None

    def describe(self, path: str) -> str:
        named = f" ({self.name})" if self.name else ""
        return f"{path} line {self.line}{named}: {self.reason}; the line is not shown (it may hold a secret)"


@dataclass(frozen=True)
class EnvFileContents:
    """What a ``.env`` text sets (the last assignment of a name wins) and the lines it cannot use."""

    values: dict[str, str] = field(default_factory=dict)
    lines: dict[str, int] = field(default_factory=dict)
    problems: list[EnvLineProblem] = field(default_factory=list)


def _first_line(binding: Binding) -> tuple[int, str]:
    """The line number where the binding's text starts, and that text without the blank lines before it.

    python-dotenv marks a binding where the previous one ended, so blank lines and comments in
    between count towards its start; the number is moved to the first line with content.
    """
    raw = binding.original.string
    stripped = raw.lstrip()
    skipped = raw[: len(raw) - len(stripped)]
    return binding.original.line + len(NEWLINE.findall(skipped)), stripped


def _problem(binding: Binding, line: int, text: str) -> EnvLineProblem | None:
    start = LINE_START.match(text)
    named = start["name"] if start else None
    if binding.error:
        if named is None:
            return EnvLineProblem(line, "expected NAME=value (a variable name, then '=')")
        return EnvLineProblem(line, "cannot parse the value (an unclosed quote, or text after the "
                                    "closing quote?)", named)
    if binding.key is None:
        return None  # blank lines and comments
    if binding.value is None:
        return EnvLineProblem(line, "no '=' on this line (expected NAME=value)")
    if not VARIABLE_NAME.match(binding.key):
        return EnvLineProblem(line, "the name before '=' is not a variable name (letters, digits and "
                                    "'_', not starting with a digit)")
    if NEWLINE.search(text.rstrip("\r\n")):
        return EnvLineProblem(line, "the quoted value is not closed on its line (an unclosed quote?)",
                              binding.key)
    return None


def parse_env_text(text: str) -> EnvFileContents:
    """Read ``.env`` text: the values it sets, and every line that cannot be used (pure)."""
    contents = EnvFileContents()
    for binding in parse_stream(io.StringIO(text)):
        line, content = _first_line(binding)
        problem = _problem(binding, line, content)
        if problem is not None:
            contents.problems.append(problem)
        elif binding.key is not None and binding.value is not None:
            contents.values[binding.key] = binding.value
            contents.lines[binding.key] = line
    return contents


def env_file_path(environ: Mapping[str, str], cwd: Path) -> tuple[Path, bool]:
    """The file to read and whether it was asked for by name (then it must exist)."""
    named = environ.get(ENV_FILE_VARIABLE, "").strip()
    if named:
        return cwd / Path(named).expanduser(), True
    return cwd / DEFAULT_ENV_FILE, False


@dataclass(frozen=True)
class EnvFile:
    """The ``.env`` that was read (``path`` None: there was none), or why it could not be."""

    path: Path | None
    contents: EnvFileContents
    unreadable: str | None = None

    def problems(self) -> list[str]:
        shown = str(self.path)
        if self.unreadable is not None:
            return [self.unreadable]
        return [p.describe(shown) for p in self.contents.problems]

    def unparsed_names(self) -> set[str]:
        """Variables whose line could not be read: their other problems would only mislead."""
        return {p.name for p in self.contents.problems if p.name}

    def origin(self, name: str) -> str | None:
        """``.env line 3`` for a variable the file set, for messages about its value."""
        if self.path is None or name not in self.contents.lines:
            return None
        return f"{self.path} line {self.contents.lines[name]}"


def read_env_file(environ: Mapping[str, str], cwd: Path) -> EnvFile:
    """Read ``./.env`` (or ``$ENV_FILE``); a missing default file is no problem, anything else is."""
    path, named = env_file_path(environ, cwd)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        if not named:
            return EnvFile(None, EnvFileContents())
        return EnvFile(path, EnvFileContents(), f"{ENV_FILE_VARIABLE}: {path} does not exist")
    except UnicodeDecodeError as exc:
        return EnvFile(path, EnvFileContents(), f"{path}: not UTF-8 text (byte {exc.start})")
    except OSError as exc:
        return EnvFile(path, EnvFileContents(), f"{path}: cannot read it ({exc.strerror or exc})")
    return EnvFile(path, parse_env_text(text))
