"""`zonemesh up` end to end: the demo shop on free ports, traffic through both gateways, a clean stop."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import pytest

from registry.embedded_etcd import die_with_parent
from tests.conftest import run_cli

REPO = Path(__file__).resolve().parent.parent


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie (exited, not yet reaped by its parent) is not running
        with open(f"/proc/{pid}/stat") as fh:
            return fh.read().split(")")[-1].split()[0] != "Z"
    except OSError:
        return False


def _wait_state(data_dir: Path, proc: subprocess.Popen | None, timeout: float = 90) -> dict:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            state = json.loads((data_dir / "up.json").read_text())
            if state.get("ready"):
                return state
        except (OSError, ValueError):
            pass
        if proc is not None and proc.poll() is not None:
            raise AssertionError(f"zonemesh up exited {proc.returncode}")
        time.sleep(0.2)
    raise AssertionError("zonemesh up did not become ready")


async def _shop_traffic(state: dict) -> None:
    a, b = state["gateways"]["a"]["url"], state["gateways"]["b"]["url"]
    async with aiohttp.ClientSession() as s:
        async with s.get(f"{a}/", headers={"Host": "frontend.mesh"}) as r:
            home = await r.json()
        assert r.status == 200 and home["catalog"]["answered_from_zone"] == "a"
        # frontend (zone a) -> orders, which only runs in zone b: the call crosses zones.
        versions = set()
        for _ in range(30):
            async with s.post(f"{a}/frontend/checkout") as r:
                checkout = await r.json()
            assert r.status == 201, checkout  # the order was created (frontend relays orders' status)
            order = checkout["order"]
            assert order["answered_from_zone"] == "b" and order["orders_zone"] == "b"
            assert order["payment"]["status"] == "approved"
            versions.add(order["orders_version"])
        assert "v1" in versions  # the canary split sends most traffic to v1
        async with s.get(f"{b}/items", headers={"Host": "catalog.mesh"}) as r:
            assert r.status == 200 and (await r.json())["served_by"] == "catalog in zone b"
        statuses = []
        for _ in range(15):  # the shop route allows a burst of 10 per client
            async with s.get(f"{a}/api/items", headers={"Host": "shop.example.com"}) as r:
                statuses.append(r.status)
        assert statuses[:10] == [200] * 10 and 429 in statuses


async def test_up_runs_the_shop_and_stops_cleanly(tmp_path: Path) -> None:
    data_dir = tmp_path / "mesh"
    log = open(tmp_path / "up.out", "wb")  # noqa: SIM115
    cmd = [sys.executable, "-m", "zonemesh.cli", "up", "--free-ports", "--data-dir", str(data_dir)]
    proc = subprocess.Popen(die_with_parent(cmd),
                            cwd=REPO, stdout=log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL)  # fmt: skip
    try:
        state = _wait_state(data_dir, proc)
        out = (tmp_path / "up.out").read_text()
        assert "zonemesh is up" in out and "route/orders-canary created" in out and "Try:" in out
        status = run_cli("status", "-o", "json", "--etcd", state["etcd"])
        services = json.loads(status.stdout)["services"]
        assert set(services) == {"frontend", "catalog", "orders", "payments"}
        assert services["payments"]["b"][0]["tags"] == {"lang": "stdlib"}  # registered by the agent
        await _shop_traffic(state)
        pids = [c["pid"] for c in state["children"]]
        assert all(_alive(p) for p in pids)
        proc.send_signal(signal.SIGINT)
        assert proc.wait(60) == 0
    finally:
        if proc.poll() is None:
            proc.kill()
        log.close()
    assert "stopped; nothing left running" in (tmp_path / "up.out").read_text()
    assert not [p for p in pids if _alive(p)]
    assert json.loads((data_dir / "up.json").read_text())["stopped"] is True


def test_detach_and_down(tmp_path: Path) -> None:
    data_dir = tmp_path / "mesh"
    mesh = tmp_path / "mini.yaml"
    mesh.write_text(
        "zones: [a, b]\nservices:\n"
        "  - {name: hello, zone: b, run: ['{python}', -m, zonemesh.cli, demo-service, --service, hello, --zone, b]}\n"
    )
    res = subprocess.run([sys.executable, "-m", "zonemesh.cli", "up", str(mesh), "--detach", "--free-ports",
                          "--data-dir", str(data_dir)], cwd=REPO, capture_output=True, text=True, timeout=120)  # fmt: skip
    assert res.returncode == 0, res.stderr
    assert "zonemesh is up" in res.stdout and "zonemesh down" in res.stdout
    state = json.loads((data_dir / "up.json").read_text())
    pids = [state["pid"], *(c["pid"] for c in state["children"])]
    assert all(_alive(p) for p in pids)
    down = run_cli("down", "--data-dir", str(data_dir), timeout=90)
    assert down.returncode == 0 and "stopped" in down.stdout
    deadline = time.monotonic() + 10
    while time.monotonic() < deadline and any(_alive(p) for p in pids):
        time.sleep(0.1)
    assert not [p for p in pids if _alive(p)]
    assert "nothing is running" in run_cli("down", "--data-dir", str(data_dir)).stdout


@pytest.mark.parametrize(
    ("content", "message"),
    [
        ("zones: [a]\nservices: [{name: x, zone: q, run: [true]}]\n", "services[0].zone"),
        ("services: [{name: x}]\n", "services[0]: needs name, zone and run"),
        ("zones: [a\n", "not valid YAML"),
    ],
)
def test_bad_mesh_file_is_named(tmp_path: Path, content: str, message: str) -> None:
    mesh = tmp_path / "mesh.yaml"
    mesh.write_text(content)
    res = run_cli("up", str(mesh), "--free-ports", "--data-dir", str(tmp_path / "d"))
    assert res.returncode == 2 and message in res.stderr and len(res.stderr.strip().splitlines()) == 1, (
        res.stderr
    )
