"""Typed values from the environment, every problem collected: the reader each part's settings use.

Why collect: an operator should fix a unit file once, not once per restart, so configuration
reports every problem in one message (exit 78). The core settings (:mod:`utils.config`) and the
autoposter's (:mod:`utils.autoposter.settings`) read with one reader, so their problems land in the
same list. Standard library only: it runs before the heavy imports (utils/ops/bootstrap.py).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import TypeVar

N = TypeVar("N", int, float)


class EnvReader:
    """Reads typed values from *env* and collects problems instead of raising on the first one."""

    def __init__(self, env: Mapping[str, str]) -> None:
        self.env = env
        self.problems: list[str] = []

    def text(self, name: str, default: str | None = None) -> str | None:
        value = self.env.get(name, "").strip()
        return value if value else default

    def flag(self, name: str, default: bool) -> bool:
        raw = self.text(name)
        if raw is None:
            return default
        lowered = raw.lower()
        if lowered in ("1", "true", "yes", "on"):
            return True
        if lowered in ("0", "false", "no", "off"):
            return False
        self.problems.append(f"{name}: expected true or false, got {raw!r}")
        return default

    def whole(self, name: str, default: int, *, low: int, high: int) -> int:
        return self._number(name, default, int, low, high, "a whole number")

    def seconds(self, name: str, default: float, *, low: float, high: float,
                what: str = "a number of seconds") -> float:
        return self._number(name, default, float, low, high, what)

    def _number(self, name: str, default: N, parse: Callable[[str], N], low: N, high: N, what: str) -> N:
        """*name* parsed, in ``[low, high]``; else a problem (the default when it does not parse)."""
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = parse(raw)
        except ValueError:
            self.problems.append(f"{name}: expected {what}, got {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name}: must be between {_shown(low)} and {_shown(high)}, got {_shown(value)}")
        return value


def _shown(number: float) -> str:
    """A whole number as written, a float without trailing zeros (``1.0`` -> ``1``)."""
    return str(number) if isinstance(number, int) else f"{number:g}"
