"""The layers that import-linter cannot check, and the user's API at the package's top.

import-linter (pyproject.toml, run by .ci/run) takes packages as roots, not single modules, so
main.py and bot.py are checked here: production code never imports the test package or the
testbed (the fake Bot API is for tests, benchmarks and the README's try-it path only).
"""

from __future__ import annotations

import ast
import subprocess
import sys

import pytest

from tests.conftest import ROOT

NOT_FOR_PRODUCTION = ("tests", "testbed")


def imported_modules(path: str) -> set[str]:
    tree = ast.parse((ROOT / path).read_text(), path)
    found: set[str] = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            found.update(alias.name for alias in node.names)
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            found.add(node.module)
    return found


@pytest.mark.parametrize("path", ["main.py", "bot.py"])
def test_entry_modules_never_import_tests_or_testbed(path: str) -> None:
    modules = imported_modules(path)
    assert modules, "the parse found the imports"
    assert [m for m in modules if m.split(".")[0] in NOT_FOR_PRODUCTION] == []


def test_lazy_exports_are_the_users_api_and_stay_light() -> None:
    """``from utils import InstanceLock, ShutdownManager, PollingManager`` gives the real classes,
    and ``import utils`` alone (what configuration pays) imports none of them, nor aiogram."""
    import utils
    from utils.locking.instance_lock import InstanceLock
    from utils.ops.shutdown import ShutdownManager
    from utils.updates.polling import PollingManager

    assert (utils.InstanceLock, utils.ShutdownManager, utils.PollingManager) == \
        (InstanceLock, ShutdownManager, PollingManager)
    with pytest.raises(AttributeError):
        _ = utils.NoSuchName
    probe = ("import sys, utils; "
             "print(sorted(m for m in ('aiogram', 'utils.updates.polling', 'utils.ops.shutdown') if m in sys.modules))")
    done = subprocess.run([sys.executable, "-c", probe], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    assert done.stdout.strip() == "[]"
