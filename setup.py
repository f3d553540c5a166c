"""Build hook: compiles the gateway's request path with mypyc (``ZONEMESH_PURE_PYTHON=1`` skips it).

The compiled modules behave as their Python source does; ``gateway/__init__.py`` falls back to the source
when a module was edited after it was compiled. Everything else about the package is in pyproject.toml.
"""

import os
import sys

from setuptools import setup

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from gateway import COMPILED_MODULES  # noqa: E402  (the modules every proxied request runs through)

ext_modules = []
if not os.environ.get("ZONEMESH_PURE_PYTHON"):
    from mypyc.build import mypycify

    # --follow-imports=skip: everything outside these modules is Any to mypyc, so wrong or missing type
    # stubs of other packages (httptools declares URL.path as bytes; it can be None) never become checks.
    sources = [f"gateway/{name}.py" for name in COMPILED_MODULES]
    ext_modules = mypycify(["--ignore-missing-imports", "--follow-imports=skip", *sources], opt_level="3")

setup(ext_modules=ext_modules)
