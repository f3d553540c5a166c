"""Build hook: compiles the gateway's request path with mypyc (``ZONEMESH_PURE_PYTHON=1`` skips it).

The compiled modules behave as their Python source does; ``gateway/__init__.py`` falls back to the source
when a module was edited after it was compiled. Everything else about the package is in pyproject.toml.
"""

import os

from setuptools import setup

# The modules every proxied request runs through (see bench/README.md for what compiling them buys).
COMPILED = [
    "gateway/balancer.py",
    "gateway/cluster.py",
    "gateway/downstream.py",
    "gateway/metrics.py",
    "gateway/proxy.py",
    "gateway/upstream.py",
    "gateway/watchdog.py",
]

ext_modules = []
if not os.environ.get("ZONEMESH_PURE_PYTHON"):
    from mypyc.build import mypycify

    ext_modules = mypycify(["--ignore-missing-imports", "--follow-imports=skip", *COMPILED], opt_level="3")

setup(ext_modules=ext_modules)
