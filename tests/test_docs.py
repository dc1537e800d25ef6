"""The docs say what the code does: the sample log lines of the README and the runbook are lines a
real pair of bots writes, and docs/architecture.md's module list names every module."""

from __future__ import annotations

import re
import signal
from collections.abc import Callable
from pathlib import Path

from tests.conftest import ROOT, BotProcess, start_pair, wait_until
from utils.ops.logging_setup import TEXT_FORMAT

Spawn = Callable[..., BotProcess]

#: What differs between a sample and a real run: (pattern, what it becomes), applied in order.
VARYING = (
    (re.compile(r"configuration from [^;]+;"), "configuration from C;"),
    (re.compile(r" on \S+ \(instance "), " on H (instance "),
    (re.compile(r"\b[0-9a-f]{12}\b"), "I"),
    (re.compile(r"/\S+"), "P"),
    (re.compile(r"\d+(\.\d+)*"), "N"),
)
#: A sample line's comment for the reader (``   <- ~16 ms later``).
ANNOTATION = re.compile(r"\s{2,}<-.*$")
#: The loggers whose lines a start, a standby and a handover of two bots write.
PAIR_LOGGERS = ("solobot", "solobot.leadership", "solobot.shutdown")


def normalized(message: str) -> str:
    for pattern, replacement in VARYING:
        message = pattern.sub(replacement, message)
    return message


def code_blocks(path: Path) -> list[list[str]]:
    return [block.splitlines() for block in re.findall(r"```[a-z]*\n(.*?)```", path.read_text(), re.S)]


def logged(bot: BotProcess) -> set[str]:
    """``LEVEL logger: message`` of every line *bot* wrote, normalized (the format: TEXT_FORMAT)."""
    assert TEXT_FORMAT == "%(asctime)s %(levelname)s %(name)s: %(message)s"
    lines = set()
    for line in bot.log().splitlines():
        parts = line.split(" ", 2)  # date, time, the rest
        if len(parts) == 3 and re.fullmatch(r"\d{4}-\d\d-\d\d", parts[0]):
            lines.add(normalized(parts[2]))
    return lines


def message_of(line: str) -> str:
    """The message part of a normalized ``LEVEL logger: message``."""
    return line.split(" ", 1)[1].partition(": ")[2]


def test_sample_log_lines_are_what_a_real_pair_writes(spawn: Spawn) -> None:
    a, b = start_pair(spawn)  # the README's case: the file lock, SQLite state
    a.signal(signal.SIGTERM)
    b.wait_mode("active")
    assert a.wait_exit() == 0
    wait_until(lambda: "leading with epoch" in b.log(), message="b's line on becoming active")
    real = {"A": logged(a), "B": logged(b)}

    readme = next(block for block in code_blocks(ROOT / "README.md") if block and block[0].startswith("A: "))
    samples = [line for line in readme if re.match(r"[AB]: ", line)]
    assert len(samples) >= 6
    for sample in samples:
        who, message = sample.split(": ", 1)
        wanted = normalized(ANNOTATION.sub("", message))
        assert wanted in {message_of(line) for line in real[who]}, f"README: {sample!r}\nreal: {sorted(real[who])}"

    # The runbook's lines of the same events, with level and logger.
    everything = real["A"] | real["B"]
    checked = 0
    for block in code_blocks(ROOT / "docs" / "operations.md"):
        for line in block:
            level_logger = line.split(":", 1)[0].split(" ")
            if len(level_logger) == 2 and level_logger[0] == "INFO" and level_logger[1] in PAIR_LOGGERS:
                assert normalized(ANNOTATION.sub("", line)) in everything, f"docs/operations.md: {line!r}"
                checked += 1
    assert checked >= 8


def test_architecture_lists_every_module() -> None:
    modules_block = code_blocks(ROOT / "docs" / "architecture.md")[0]
    listed = {line.split()[0] for line in modules_block if line.strip()}
    for path in sorted((ROOT / "utils").rglob("*.py")):
        if path.name != "__init__.py" or path.parent == ROOT / "utils":
            assert path.name in listed, f"docs/architecture.md does not list {path.relative_to(ROOT)}"
