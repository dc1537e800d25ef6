"""The machinery of solobot, in sub-packages by concern (see docs/architecture.md).

``from utils import InstanceLock, ShutdownManager, PollingManager`` works: nothing in solobot
imports these names from here (its modules import from the sub-packages), but they are the
user's API (fixed by the user's brief): the three pieces a bot of one's own may reuse without the
daemon; tests/test_layers.py keeps them working. They are imported lazily
(PEP 562) so that ``import utils.config`` does not pay for aiogram's imports: a container's PID 1
must install its signal handlers and validate the configuration within milliseconds.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from utils.locking.instance_lock import InstanceLock
    from utils.ops.shutdown import ShutdownManager
    from utils.updates.polling import PollingManager

#: The release, as in pyproject.toml (tests/test_startup.py checks they agree); the first
#: log line of a start names it.
__version__ = "0.1.0"

__all__ = ["InstanceLock", "PollingManager", "ShutdownManager", "__version__"]

_HOMES = {
    "InstanceLock": "utils.locking.instance_lock",
    "ShutdownManager": "utils.ops.shutdown",
    "PollingManager": "utils.updates.polling",
}


def __getattr__(name: str) -> Any:
    if name in _HOMES:
        return getattr(importlib.import_module(_HOMES[name]), name)
    raise AttributeError(f"module 'utils' has no attribute {name!r}")
