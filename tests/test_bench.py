"""CI runs only a seconds-long smoke of the benchmark: it must start everything and produce its tables."""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent


def test_bench_quick_smoke(tmp_path: Path) -> None:
    workdirs = set(Path(tempfile.gettempdir()).glob("zonemesh-bench-*"))
    res = subprocess.run([sys.executable, "-m", "bench", "--quick", "--rounds", "2", "--load", "bundled", "--out", str(tmp_path)],
                         cwd=REPO, capture_output=True, text=True, timeout=240)  # fmt: skip
    assert res.returncode == 0, res.stderr[-3000:]
    for header in ("| target | body | conns | req/s", "| path | req/s", "| config propagation", "| registry |",
                   "| registration | ms |"):  # fmt: skip
        assert header in res.stdout, res.stdout
    results = json.loads((tmp_path / "results.json").read_text())
    assert {r["target"] for r in results["throughput"]} == {"direct", "zonemesh 1 worker"}
    assert all(r["rps"] > 0 and r["errors"] == 0 for r in results["throughput"])
    assert all(len(r["rounds_rps"]) == 2 and r["rps"] in r["rounds_rps"] for r in results["throughput"])
    assert results["propagation"]["writes"] == 20 and results["propagation"]["all_p50_ms"] > 0
    assert len(results["scale"]) == 2 and len(results["registration"]) == 4
    assert set(Path(tempfile.gettempdir()).glob("zonemesh-bench-*")) <= workdirs  # its work dir is removed
