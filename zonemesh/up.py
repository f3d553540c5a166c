"""``zonemesh up``: a whole local mesh in one command (etcd and the demo services, for now)."""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

from registry.embedded_etcd import EmbeddedEtcd, free_port
from registry.etcd import EtcdSettings
from zonemesh.status import collect, render


def _say(msg: str) -> None:
    print(f"[zonemesh up] {msg}", flush=True)


def _port_free(port: int) -> bool:
    import socket

    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def run_up(args: argparse.Namespace) -> int:
    zones = [z.strip() for z in args.zones.split(",") if z.strip()]
    data_dir = Path(args.data_dir).resolve()
    logs = data_dir / "logs"
    logs.mkdir(parents=True, exist_ok=True)
    port = args.etcd_port if _port_free(args.etcd_port) else free_port()
    _say(f"starting etcd on 127.0.0.1:{port} (data in {data_dir / 'etcd'})")
    etcd = EmbeddedEtcd(data_dir / "etcd", client_port=port, log_path=logs / "etcd.log")
    etcd.start()
    settings = EtcdSettings(endpoints=(etcd.endpoint,))
    env = {**os.environ, **settings.env()}
    children: list[tuple[str, subprocess.Popen[bytes]]] = []
    try:
        for zone in zones:
            name = f"hello-{zone}"
            _say(f"starting demo service 'hello' in zone {zone} (log {logs / name}.log)")
            with open(logs / f"{name}.log", "ab") as log:
                proc = subprocess.Popen(
                    [sys.executable, "-m", "zonemesh.cli", "demo-service", "--service", "hello", "--zone", zone],
                    env=env, stdout=log, stderr=log, stdin=subprocess.DEVNULL,
                )  # fmt: skip
            children.append((name, proc))
        data = _wait_registered(settings, len(zones), children)
        print(render(data, "table"), flush=True)
        _say("mesh is up. In another shell:")
        print(f"    export ZONEMESH_ETCD_ENDPOINTS={etcd.endpoint}\n    zonemesh status", flush=True)
        _say("press Ctrl-C to stop everything")
        _wait_for_signal(children)
    finally:
        _say("stopping")
        for _, proc in children:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
        for name, proc in children:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                _say(f"{name} did not stop in 10 s; killing it")
                proc.kill()
                proc.wait()
        etcd.stop()
        _say("stopped")
    return 0


def _wait_registered(settings: EtcdSettings, count: int, children: list, timeout: float = 20.0) -> dict:
    deadline = time.monotonic() + timeout
    while True:
        for name, proc in children:
            if proc.poll() is not None:
                raise SystemExit(f"[zonemesh up] {name} exited with {proc.returncode}; see its log")
        data = asyncio.run(collect(settings))
        if sum(len(v) for zones in data["services"].values() for v in zones.values()) >= count:
            return data
        if time.monotonic() > deadline:
            raise SystemExit("[zonemesh up] services did not register within 20 s; see the logs")
        time.sleep(0.2)


def _wait_for_signal(children: list) -> None:
    stop = {"flag": False}

    def handler(signum: int, frame: object) -> None:
        stop["flag"] = True

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    while not stop["flag"]:
        for name, proc in children:
            if proc.poll() is not None:
                _say(f"{name} exited with {proc.returncode}; stopping the mesh")
                return
        time.sleep(0.2)
