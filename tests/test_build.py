"""The compiled request path: installed compiled, and the Python source when asked for or when stale."""

from __future__ import annotations

import importlib.machinery
import os
import subprocess
import sys
from pathlib import Path

import pytest

import gateway

SUFFIX = importlib.machinery.EXTENSION_SUFFIXES[0]
SHOW = (
    "import gateway, gateway.proxy, gateway.downstream; print(gateway.RUNNING); print(gateway.proxy.__file__)"
)


def run_python(code: str, **env: str) -> list[str]:
    out = subprocess.run([sys.executable, "-c", code], env={**os.environ, **env}, capture_output=True, text=True,
                         timeout=60, check=True)  # fmt: skip
    return out.stdout.splitlines()


@pytest.mark.skipif(bool(os.environ.get("ZONEMESH_PURE_PYTHON")), reason="installed without compiling")
def test_the_install_compiled_the_request_path() -> None:
    running, proxy_file = run_python(SHOW)
    assert running == "compiled with mypyc", running
    assert proxy_file.endswith(SUFFIX)


def test_pure_python_switch_runs_the_source() -> None:
    running, proxy_file = run_python(SHOW, ZONEMESH_PURE_PYTHON="1")
    assert "ZONEMESH_PURE_PYTHON" in running
    assert proxy_file.endswith("proxy.py")


def test_a_source_edited_after_compiling_runs_all_from_source(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    here = tmp_path / "gateway"
    here.mkdir()
    (tmp_path / "pyproject.toml").touch()  # a source checkout
    for name in gateway.COMPILED_MODULES:
        (here / f"{name}.py").touch()
        os.utime(here / f"{name}.py", (1_000, 1_000))
        (here / f"{name}{SUFFIX}").touch()
    monkeypatch.setattr(gateway, "_HERE", here)
    monkeypatch.delenv("ZONEMESH_PURE_PYTHON", raising=False)
    assert gateway._mode() == (True, "compiled with mypyc")
    os.utime(here / "proxy.py")  # edited now, after its compiled module
    compiled, reason = gateway._mode()
    assert not compiled and "gateway/proxy.py changed after it was compiled" in reason
    os.utime(here / "proxy.py", (1_000, 1_000))
    (here / f"upstream{SUFFIX}").unlink()
    assert gateway._mode() == (False, "Python source (gateway/upstream.py was not compiled)")
