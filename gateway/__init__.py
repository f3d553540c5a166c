"""The zone gateway (the data plane).

An install compiles the request path (``setup.py``'s ``COMPILED`` list) with mypyc. Those modules load from
their Python source instead, all of them together (compiled code calls compiled code directly, so the two
must not mix), when ``ZONEMESH_PURE_PYTHON`` is set or, in a source checkout, when a source file is newer than
its compiled module (edited since the last ``pip install -e .``). ``RUNNING`` says which it is, and why.
"""

from __future__ import annotations

import importlib.machinery
import importlib.util
import os
import sys
from pathlib import Path
from types import ModuleType
from typing import Any

COMPILED_MODULES = (
    "balancer",
    "cluster",
    "downstream",
    "headers",
    "metrics",
    "proxy",
    "upstream",
    "watchdog",
    "writes",
)
_HERE = Path(__file__).parent


def _compiled_file(name: str) -> Path | None:
    for suffix in importlib.machinery.EXTENSION_SUFFIXES:
        path = _HERE / f"{name}{suffix}"
        if path.exists():
            return path
    return None


def _mode() -> tuple[bool, str]:
    if os.environ.get("ZONEMESH_PURE_PYTHON"):
        return False, "Python source (ZONEMESH_PURE_PYTHON is set)"
    checkout = (_HERE.parent / "pyproject.toml").exists()  # (an installed wheel's files are never edited)
    for name in COMPILED_MODULES:
        compiled = _compiled_file(name)
        if compiled is None:
            return False, f"Python source (gateway/{name}.py was not compiled)"
        if checkout and (_HERE / f"{name}.py").stat().st_mtime > compiled.stat().st_mtime:
            return (
                False,
                f"Python source (gateway/{name}.py changed after it was compiled; pip install -e . recompiles)",
            )
    return True, "compiled with mypyc"


class _SourceFinder:
    """Finds the compiled modules' Python source ahead of their extension modules."""

    @staticmethod
    def find_spec(fullname: str, path: Any = None, target: ModuleType | None = None) -> Any:
        package, _, name = fullname.rpartition(".")
        if package != __name__ or name not in COMPILED_MODULES:
            return None
        return importlib.util.spec_from_file_location(fullname, _HERE / f"{name}.py")


COMPILED, RUNNING = _mode()
if not COMPILED:
    sys.meta_path.insert(0, _SourceFinder())
