"""Typed values from the environment, every problem collected: the reader each part's settings use.

Why collect: an operator should fix a unit file once, not once per restart, so configuration
reports every problem in one message (exit 78). The core settings (:mod:`utils.config`) and the
autoposter's (:mod:`utils.autoposter.settings`) read with one reader, so their problems land in the
same list. Standard library only: it runs before the heavy imports (utils/ops/bootstrap.py).
"""

from __future__ import annotations

from collections.abc import Mapping


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
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = int(raw)
        except ValueError:
            self.problems.append(f"{name}: expected a whole number, got {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name}: must be between {low} and {high}, got {value}")
        return value

    def seconds(self, name: str, default: float, *, low: float, high: float,
                what: str = "a number of seconds") -> float:
        raw = self.text(name)
        if raw is None:
            return default
        try:
            value = float(raw)
        except ValueError:
            self.problems.append(f"{name}: expected {what}, got {raw!r}")
            return default
        if not low <= value <= high:
            self.problems.append(f"{name}: must be between {low:g} and {high:g}, got {value:g}")
        return value
