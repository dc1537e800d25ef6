"""The daemon's settings: the core's (:mod:`utils.config`) and the autoposter's, read together.

Why a composition here: the core settings never import the autoposter, and the autoposter reads
its own variables (:mod:`utils.autoposter.settings`); the daemon needs both, and an operator needs
every problem of either in one message (exit 78, before the heavy imports). One
:class:`~utils.base.env_reader.EnvReader` reads both, so that message is the same as when one
module read everything.
"""

from __future__ import annotations

from collections.abc import Mapping, MutableMapping
from dataclasses import dataclass, field, fields
from pathlib import Path

from utils.autoposter.settings import AutoposterSettings, read_autoposter_settings
from utils.config import Settings, load_configuration_with, load_settings_with


@dataclass(frozen=True)
class DaemonSettings(Settings):
    """The core settings plus the autoposter's (off without CHANNEL_ID)."""

    autoposter: AutoposterSettings = field(default_factory=AutoposterSettings)

    @classmethod
    def compose(cls, core: Settings, autoposter: AutoposterSettings) -> DaemonSettings:
        return cls(**{f.name: getattr(core, f.name) for f in fields(Settings)}, autoposter=autoposter)


def load_daemon_settings(env: Mapping[str, str], origins: Mapping[str, str] | None = None) -> DaemonSettings:
    """:func:`utils.config.load_settings` for the daemon: the autoposter's settings too."""
    return DaemonSettings.compose(*load_settings_with(env, origins, read_autoposter_settings))


def load_daemon_configuration(environ: MutableMapping[str, str], cwd: Path) -> DaemonSettings:
    """:func:`utils.config.load_configuration` (``.env`` included) for the daemon."""
    return DaemonSettings.compose(*load_configuration_with(environ, cwd, read_autoposter_settings))
