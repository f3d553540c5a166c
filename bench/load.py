"""Load generators: wrk (with a Lua hook for p99.9) when installed, else a bundled asyncio generator."""

from __future__ import annotations

import asyncio
import os
import re
import shutil
import subprocess
import tempfile
import time
from dataclasses import dataclass

import uvloop

WRK_LUA = """
done = function(summary, latency, requests)
  io.write(string.format("ZM %d %d %f %f %f %f\\n", summary.requests, summary.errors.status + summary.errors.connect
    + summary.errors.read + summary.errors.write + summary.errors.timeout, latency:percentile(50),
    latency:percentile(99), latency:percentile(99.9), summary.duration))
end
"""


@dataclass
class LoadResult:
    tool: str
    requests: int
    errors: int
    seconds: float
    p50_ms: float
    p99_ms: float
    p999_ms: float

    @property
    def rps(self) -> float:
        return self.requests / self.seconds if self.seconds else 0.0


def wrk_path() -> str | None:
    return shutil.which("wrk")


def run_wrk(url: str, host: str | None, connections: int, seconds: float, threads: int = 1) -> LoadResult:
    with tempfile.NamedTemporaryFile("w", suffix=".lua", delete=False) as fh:
        fh.write(WRK_LUA)
        script = fh.name
    try:
        cmd = [
            "wrk",
            f"-t{threads}",
            f"-c{connections}",
            f"-d{max(1, int(seconds))}s",
            "-s",
            script,
            "--timeout",
            "5s",
        ]
        if host:
            cmd += ["-H", f"Host: {host}"]
        out = subprocess.run([*cmd, url], capture_output=True, text=True, timeout=seconds + 60).stdout
    finally:
        os.unlink(script)
    m = re.search(r"^ZM (\d+) (\d+) ([\d.]+) ([\d.]+) ([\d.]+) ([\d.]+)$", out, re.M)
    if not m:
        raise RuntimeError(f"could not parse wrk output: {out[-500:]}")
    reqs, errs, p50, p99, p999, dur_us = m.groups()
    return LoadResult("wrk", int(reqs), int(errs), float(dur_us) / 1e6, float(p50) / 1000, float(p99) / 1000,
                      float(p999) / 1000)  # fmt: skip


async def _conn_worker(
    host: str, port: int, request: bytes, deadline: float, lat: list[float], errs: list[int]
) -> None:
    try:
        reader, writer = await asyncio.open_connection(host, port)
    except OSError:
        errs[0] += 1
        return
    try:
        while time.perf_counter() < deadline:
            t0 = time.perf_counter()
            writer.write(request)
            head = await reader.readuntil(b"\r\n\r\n")
            m = re.search(rb"(?i)content-length:\s*(\d+)", head)
            if m:
                await reader.readexactly(int(m.group(1)))
            else:  # chunked
                while True:
                    size = int((await reader.readline()).strip().split(b";")[0], 16)
                    await reader.readexactly(size + 2)
                    if size == 0:
                        break
            if not head.startswith(b"HTTP/1.1 2"):
                errs[0] += 1
            lat.append(time.perf_counter() - t0)
    except (OSError, asyncio.IncompleteReadError, ValueError):
        errs[0] += 1
    finally:
        writer.close()


def run_bundled(
    host: str, port: int, path: str, host_header: str, connections: int, seconds: float
) -> LoadResult:
    """Keep-alive HTTP/1.1 load from this process (one core); used when wrk is not installed."""
    request = f"GET {path} HTTP/1.1\r\nHost: {host_header}\r\n\r\n".encode()
    lat: list[float] = []
    errs = [0]

    async def main() -> float:
        start = time.perf_counter()
        deadline = start + seconds
        await asyncio.gather(
            *(_conn_worker(host, port, request, deadline, lat, errs) for _ in range(connections))
        )
        return time.perf_counter() - start

    elapsed = uvloop.run(main())
    lat.sort()

    def pct(p: float) -> float:
        return lat[min(len(lat) - 1, int(len(lat) * p))] * 1000 if lat else 0.0

    return LoadResult("bundled", len(lat), errs[0], elapsed, pct(0.5), pct(0.99), pct(0.999))


FORCE_BUNDLED = False  # set by --load bundled


def run_load(
    url_host: str, port: int, path: str, host_header: str, connections: int, seconds: float
) -> LoadResult:
    if wrk_path() and not FORCE_BUNDLED:
        return run_wrk(f"http://{url_host}:{port}{path}", host_header, connections, seconds)
    return run_bundled(url_host, port, path, host_header, connections, seconds)
