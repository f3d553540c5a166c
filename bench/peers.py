"""nginx and HAProxy as reverse proxies (and nginx as the upstream) when installed, configured like the
gateway: one worker, keep-alive pools to the same upstream."""

from __future__ import annotations

import os
import shutil
import socket
import subprocess
import time
from pathlib import Path

from registry.embedded_etcd import die_with_parent

PROXY_CORES = "0"  # the proxy under test gets core 0; the load generator and the upstream share the rest


def pinned(cmd: list[str], cores: str = PROXY_CORES) -> list[str]:
    """``cmd`` restricted to ``cores`` (util-linux taskset), so every proxy is measured on the same core."""
    taskset = shutil.which("taskset")
    return [taskset, "-c", cores, *cmd] if taskset and (os.cpu_count() or 1) > 1 else cmd


def nginx_bin() -> str | None:
    return shutil.which("nginx") or (
        str(Path("/usr/sbin/nginx")) if Path("/usr/sbin/nginx").exists() else None
    )


def haproxy_bin() -> str | None:
    return shutil.which("haproxy") or (
        str(Path("/usr/sbin/haproxy")) if Path("/usr/sbin/haproxy").exists() else None
    )


NGINX = """
worker_processes 1;
pid {dir}/nginx.pid;
error_log {dir}/error.log warn;
events {{ worker_connections 4096; }}
http {{
  access_log off;
  keepalive_requests 1000000;
  client_body_temp_path {dir}/tmp; proxy_temp_path {dir}/tmp; fastcgi_temp_path {dir}/tmp;
  uwsgi_temp_path {dir}/tmp; scgi_temp_path {dir}/tmp;
{http}
}}
"""

NGINX_UPSTREAM = """
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location = /small {{ default_type text/plain; return 200 '{small}'; }}
    location = /big {{ default_type application/octet-stream; alias {dir}/big.bin; }}
    location / {{ default_type text/plain; return 200 '{small}'; }}
  }}
"""

NGINX_PROXY = """
  upstream backend {{ server 127.0.0.1:{upstream}; keepalive 512; }}
  server {{
    listen 127.0.0.1:{port} reuseport backlog=4096;
    location / {{
      proxy_pass http://backend;
      proxy_http_version 1.1;
      proxy_set_header Connection "";
      proxy_set_header X-Forwarded-For $proxy_add_x_forwarded_for;
      proxy_buffering on;
    }}
  }}
"""

HAPROXY = """
global
  nbthread 1
  maxconn 8000
defaults
  mode http
  timeout connect 2s
  timeout client 30s
  timeout server 30s
  option http-keep-alive
  option forwardfor
frontend fe
  bind 127.0.0.1:{port}
  default_backend be
backend be
  http-reuse always
  server s1 127.0.0.1:{upstream} maxconn 1000
"""


def wait_port(port: int, timeout: float = 10) -> None:
    """Until something accepts connections on 127.0.0.1:``port``."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with socket.socket() as s:
            if s.connect_ex(("127.0.0.1", port)) == 0:
                return
        time.sleep(0.05)
    raise RuntimeError(f"nothing listening on port {port}")


class Proc:
    def __init__(self, name: str, cmd: list[str], cores: str | None = None) -> None:
        self.name = name
        cmd = pinned(cmd, cores) if cores else cmd
        self.proc = subprocess.Popen(
            die_with_parent(cmd), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL
        )

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_nginx(workdir: Path, port: int, upstream: int | None) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "tmp").mkdir(exist_ok=True)
    (workdir / "big.bin").write_bytes(b"y" * 65536)
    if upstream is None:
        http = NGINX_UPSTREAM.format(dir=workdir, port=port, small="x" * 100)
    else:
        http = NGINX_PROXY.format(port=port, upstream=upstream)
    (workdir / "nginx.conf").write_text(NGINX.format(dir=workdir, http=http.strip("\n")))
    p = Proc("nginx", [nginx_bin() or "nginx", "-c", str(workdir / "nginx.conf"), "-p", str(workdir),
                       "-g", "daemon off;"], cores=None if upstream is None else PROXY_CORES)  # fmt: skip
    wait_port(port)
    return p


def start_haproxy(workdir: Path, port: int, upstream: int) -> Proc:
    workdir.mkdir(parents=True, exist_ok=True)
    (workdir / "haproxy.cfg").write_text(HAPROXY.format(port=port, upstream=upstream))
    p = Proc(
        "haproxy", [haproxy_bin() or "haproxy", "-f", str(workdir / "haproxy.cfg"), "-db"], cores=PROXY_CORES
    )
    wait_port(port)
    return p
