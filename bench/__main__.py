"""``python -m bench``: zonemesh side by side with the direct path, nginx and HAProxy, in one run.

Sections: proxy throughput/latency, cross-zone hop cost, config propagation, registry scale, registration.
Prints markdown tables, writes ``results.json`` and ``latency.png`` (when matplotlib is installed) to --out.
``--setup`` installs the peers from Debian packages first; ``--quick`` is the seconds-long smoke run CI uses.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.request
from pathlib import Path
from typing import Any

import gateway
from bench import load as bench_load
from bench.load import LoadResult, run_load, wrk_path
from bench.peers import (
    PROXY_CORES,
    Proc,
    haproxy_bin,
    nginx_bin,
    pinned,
    start_haproxy,
    start_nginx,
    wait_port,
)
from registry.embedded_etcd import EmbeddedEtcd, die_with_parent, free_port
from registry.etcd import EtcdSettings
from registry.heartbeat import SyncHeartbeatClient
from registry.keys import Keys
from registry.model import Instance, new_instance_id


def log(msg: str) -> None:
    print(f"[bench] {msg}", file=sys.stderr, flush=True)


def http_get(url: str, host: str | None = None, timeout: float = 2) -> tuple[int, bytes]:
    req = urllib.request.Request(url, headers={"Host": host} if host else {})
    try:
        with urllib.request.urlopen(req, timeout=timeout) as r:
            return r.status, r.read()
    except urllib.error.HTTPError as e:
        return e.code, e.read()
    except OSError:
        return 0, b""


class Gateway:
    """A real ``zonemesh gateway`` process."""

    def __init__(self, settings: EtcdSettings, zone: str, workers: int = 1) -> None:
        self.port, self.admin = free_port(), free_port()
        self.zone = zone
        cmd = [sys.executable, "-m", "zonemesh.cli", "--log-level", "warning", "gateway", "--zone", zone, "--listen",
               f"127.0.0.1:{self.port}", "--admin", f"127.0.0.1:{self.admin}", "--no-access-log",
               "--workers", str(workers)]  # fmt: skip
        cores = PROXY_CORES if workers == 1 else ",".join(str(c) for c in range(os.cpu_count() or 1))
        self.started = time.perf_counter()
        self.proc = subprocess.Popen(die_with_parent(pinned(cmd, cores)), env={**os.environ, **settings.env()},
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip

    def wait_ready(self, timeout: float = 120) -> float:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if http_get(f"http://127.0.0.1:{self.admin}/readyz")[0] == 200:
                return time.perf_counter() - self.started
            if self.proc.poll() is not None:
                raise RuntimeError(f"gateway {self.zone} exited with {self.proc.returncode}")
            time.sleep(0.02)
        raise RuntimeError("gateway not ready")

    def catalog(self) -> dict:
        return json.loads(http_get(f"http://127.0.0.1:{self.admin}/v1/catalog", timeout=30)[1] or b"{}")

    def wait_known(self, service: str, count: int = 1, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            zones = self.catalog().get("services", {}).get(service, {})
            if sum(len(v) for v in zones.values()) >= count:
                return
            time.sleep(0.05)
        raise RuntimeError(f"gateway never saw {service}")

    def wait_gateways(self, count: int, timeout: float = 30) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if sum(len(v) for v in self.catalog().get("gateways", {}).values()) >= count:
                return
            time.sleep(0.05)
        raise RuntimeError("gateways did not see each other")

    def rss_mb(self) -> float:
        with open(f"/proc/{self.proc.pid}/status") as fh:
            for line in fh:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) / 1024
        return 0.0

    def stop(self) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def pct(values: list[float], p: float) -> float:
    if not values:
        return 0.0
    s = sorted(values)
    return s[min(len(s) - 1, int(round(p * (len(s) - 1))))]


class Bench:
    def __init__(self, args: argparse.Namespace) -> None:
        self.args = args
        self.tmp = Path(tempfile.mkdtemp(prefix="zonemesh-bench-"))
        self.tmp.chmod(0o755)  # nginx workers run unprivileged and must read the files it serves
        self.results: dict[str, Any] = {
            "machine": machine(),
            "tool": "wrk" if wrk_path() and not bench_load.FORCE_BUNDLED else "bundled asyncio generator",
        }
        self.procs: list[Proc] = []
        self.gateways: list[Gateway] = []
        self.heartbeats: list[SyncHeartbeatClient] = []

    # --- setup ------------------------------------------------------------------------------------------
    def __enter__(self) -> Bench:
        cores = os.cpu_count() or 1
        if (
            cores > 1
        ):  # this process and its children (load generator, upstream, etcd) stay off the proxy's core
            os.sched_setaffinity(0, set(range(1, cores)))
        self.etcd = EmbeddedEtcd(self.tmp / "etcd").start()
        self.settings = EtcdSettings(endpoints=(self.etcd.endpoint,), prefix="/bench")
        self.upstream_port = free_port()
        if nginx_bin():
            self.procs.append(start_nginx(self.tmp / "nginx-upstream", self.upstream_port, None))
            self.results["upstream"] = "nginx (1 worker, static 100 B / 64 KiB)"
        else:
            cmd = [sys.executable, "-m", "bench.upstream", str(self.upstream_port)]
            self.procs.append(Proc("upstream", cmd))
            wait_port(self.upstream_port)
            self.results["upstream"] = "bench.upstream (uvloop + httptools, 100 B / 64 KiB)"
        self.register("bench", "a", self.upstream_port)
        return self

    def __exit__(self, *exc: object) -> None:
        for hb in self.heartbeats:
            hb.stop()
        for gw in self.gateways:
            gw.stop()
        for p in self.procs:
            p.stop()
        self.etcd.cleanup()
        shutil.rmtree(self.tmp, ignore_errors=True)

    def register(self, service: str, zone: str, port: int, settings: EtcdSettings | None = None) -> None:
        inst = Instance(
            id=new_instance_id(service), service=service, zone=zone, address="127.0.0.1", port=port
        )
        hb = SyncHeartbeatClient(inst, settings or self.settings, ttl=10)
        hb.start()
        self.heartbeats.append(hb)

    def gateway(self, zone: str, workers: int = 1, settings: EtcdSettings | None = None) -> Gateway:
        gw = Gateway(settings or self.settings, zone, workers)
        self.gateways.append(gw)
        gw.wait_ready()
        return gw

    def load(self, port: int, path: str, host: str, conns: int) -> LoadResult:
        run_load("127.0.0.1", port, path, host, conns, 1)  # warm-up: connections, pools, caches
        return run_load("127.0.0.1", port, path, host, conns, self.args.seconds)

    # --- 1. throughput ----------------------------------------------------------------------------------
    def throughput(self) -> None:
        """Every target in turn, ``--rounds`` times over (so a slow minute of the machine hits all of them, not
        one); each row is the round with the median req/s, with the spread of the rounds beside it."""
        runs: dict[tuple[str, str, int], list[LoadResult]] = {}
        bodies = ["small"] if self.args.quick else ["small", "big"]
        conns_list = [32] if self.args.quick else [32, 256]
        targets: list[tuple[str, Any]] = [("direct", None)]
        targets += [("zonemesh 1 worker", 1)] + ([] if self.args.quick else [("zonemesh 2 workers", 2)])
        if not self.args.quick and nginx_bin():
            targets.append(("nginx", "nginx"))
        if not self.args.quick and haproxy_bin():
            targets.append(("haproxy", "haproxy"))
        if not self.args.quick:
            targets.append(("python floor (no features)", "floor"))
        for round_no in range(1, self.args.rounds + 1):
            for label, kind in targets:
                self._throughput_target(label, kind, bodies, conns_list, round_no, runs)
        rows = []
        for (label, body, conns), results in runs.items():
            r = sorted(results, key=lambda x: x.rps)[len(results) // 2]
            rows.append({"target": label, "body": body, "connections": conns, "rps": round(r.rps),
                         "p50_ms": r.p50_ms, "p99_ms": r.p99_ms, "p999_ms": r.p999_ms,
                         "errors": sum(x.errors for x in results), "rounds_rps": [round(x.rps) for x in results]})  # fmt: skip
        nginx = {(r["body"], r["connections"]): r for r in rows if r["target"] == "nginx"}
        for r in rows:
            ref = nginx.get((r["body"], r["connections"]))
            r["vs_nginx_rps"] = round(r["rps"] / ref["rps"], 2) if ref and ref["rps"] else None
            r["vs_nginx_p99"] = round(r["p99_ms"] / ref["p99_ms"], 2) if ref and ref["p99_ms"] else None
            # The same ratio round by round (each round's runs are minutes apart at most):
            r["vs_nginx_rps_rounds"] = (
                [round(a / b, 2) for a, b in zip(r["rounds_rps"], ref["rounds_rps"], strict=True)]
                if ref
                else None
            )
        self.results["throughput"] = rows

    def _throughput_target(self, label: str, kind: Any, bodies: list[str], conns_list: list[int], round_no: int,
                           runs: dict[tuple[str, str, int], list[LoadResult]]) -> None:  # fmt: skip
        """One target: started, loaded with every body and connection count, stopped."""
        stop = None
        if kind is None:
            port, host = self.upstream_port, "upstream"
        elif isinstance(kind, int):
            gw = self.gateway("a", kind)
            gw.wait_known("bench")
            port, host, stop = gw.port, "bench.mesh", gw.stop
        elif kind == "nginx":
            port = free_port()
            p = start_nginx(self.tmp / "nginx-proxy", port, self.upstream_port)
            host, stop = "bench", p.stop
        elif kind == "haproxy":
            hport = free_port()
            p = start_haproxy(self.tmp / "haproxy", hport, self.upstream_port)
            port, host, stop = hport, "bench", p.stop
        else:
            port = free_port()
            p = Proc("floor", [sys.executable, "-m", "bench.floor", str(port), str(self.upstream_port)],
                     cores=PROXY_CORES)  # fmt: skip
            wait_port(port)
            host, stop = "bench", p.stop
        for body in bodies:
            for conns in conns_list:
                r = self.load(port, f"/{body}", host, conns)
                log(f"round {round_no} {label:<20} {body:<5} c={conns:<4} {r.rps:>9.0f} req/s  "
                    f"p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms  errors {r.errors}")  # fmt: skip
                runs.setdefault((label, body, conns), []).append(r)
        if stop:
            stop()

    # --- 2. cross-zone ----------------------------------------------------------------------------------
    def cross_zone(self) -> None:
        self.register("far", "b", self.upstream_port)
        a, b = self.gateway("a"), self.gateway("b")
        a.wait_known("far")
        a.wait_gateways(2)
        rows = []
        for label, host in (("local (client -> gw a -> service)", "bench.mesh"),
                            ("cross-zone (client -> gw a -> gw b -> service)", "far.mesh")):  # fmt: skip
            r = self.load(a.port, "/small", host, 32)
            log(f"{label:<48} {r.rps:>8.0f} req/s  p50 {r.p50_ms:.2f} ms  p99 {r.p99_ms:.2f} ms")
            rows.append({"path": label, "rps": round(r.rps), "p50_ms": r.p50_ms, "p99_ms": r.p99_ms,
                         "errors": r.errors})  # fmt: skip
        a.stop()
        b.stop()
        self.results["cross_zone"] = rows

    # --- 3. propagation ---------------------------------------------------------------------------------
    def propagation(self) -> None:
        n_gw = 2 if self.args.quick else self.args.gateways
        gws = [self.gateway("abcdefgh"[i % 8]) for i in range(n_gw)]
        writes = 20 if self.args.quick else self.args.writes
        keys = Keys(self.settings.prefix)
        totals, per_gw = asyncio.run(self._propagate(gws, writes, keys))
        res = {"gateways": n_gw, "writes": writes, "all_p50_ms": pct(totals, 0.5), "all_p99_ms": pct(totals, 0.99),
               "all_max_ms": max(totals), "one_p50_ms": pct(per_gw, 0.5), "one_p99_ms": pct(per_gw, 0.99)}  # fmt: skip
        log(f"propagation to {n_gw} gateways over {writes} writes: p50 {res['all_p50_ms']:.1f} ms, "
            f"p99 {res['all_p99_ms']:.1f} ms, max {res['all_max_ms']:.1f} ms")  # fmt: skip
        for gw in gws:
            gw.stop()
        self.results["propagation"] = res

    async def _propagate(
        self, gws: list[Gateway], writes: int, keys: Keys
    ) -> tuple[list[float], list[float]]:
        client = self.settings.client()
        key = (keys.policy + "routes/prop").encode()
        conns = [await asyncio.open_connection("127.0.0.1", gw.port) for gw in gws]
        req = b"GET / HTTP/1.1\r\nHost: prop.example.com\r\n\r\n"

        async def fetch(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> bytes:
            writer.write(req)
            head = await reader.readuntil(b"\r\n\r\n")
            n = int(head.lower().split(b"content-length:")[1].split(b"\r\n")[0])
            return await reader.readexactly(n)

        async def until(conn: tuple, want: bytes, t0: float) -> float:
            while True:
                if await fetch(*conn) == want:
                    return (time.perf_counter() - t0) * 1000
                await asyncio.sleep(0.0002)

        totals, per_gw = [], []
        try:
            for i in range(writes):
                body = f"v{i}"
                value = json.dumps({"match": {"hosts": ["prop.example.com"]},
                                    "direct_response": {"status": 200, "body": body}}).encode()  # fmt: skip
                t0 = time.perf_counter()
                await client.put(key, value)
                times = await asyncio.wait_for(
                    asyncio.gather(*(until(c, body.encode(), t0) for c in conns)), 30
                )
                totals.append(max(times))
                per_gw += times
        finally:
            for _, w in conns:
                w.close()
            await client.close()
        return totals, per_gw

    # --- 4. registry scale ------------------------------------------------------------------------------
    def scale(self) -> None:
        quick = self.args.quick
        instances = 200 if quick else self.args.scale_instances
        services = 20 if quick else self.args.scale_services
        routes = 50 if quick else self.args.scale_routes
        rows = []
        for label, n_inst, n_svc, n_routes in (("10 instances", 10, 1, 0),
                                                (f"{instances} instances / {services} services / {routes} routes",
                                                 instances, services, routes)):  # fmt: skip
            settings = EtcdSettings(endpoints=self.settings.endpoints, prefix=f"/scale-{n_inst}")
            t_fill = time.perf_counter()
            asyncio.run(_fill(settings, n_inst, n_svc, n_routes))
            fill_s = time.perf_counter() - t_fill
            self.register("hot", "a", self.upstream_port, settings)
            gw = Gateway(settings, "a")
            self.gateways.append(gw)
            ready_s = gw.wait_ready()
            gw.wait_known("hot")
            synced_s = time.perf_counter() - gw.started
            rss = gw.rss_mb()
            r = self.load(gw.port, "/small", "hot.mesh", 32)
            rss_after = gw.rss_mb()
            log(
                f"{label:<48} sync {synced_s:.2f} s  rss {rss_after:.0f} MB  {r.rps:.0f} req/s  p50 {r.p50_ms:.2f} ms"
            )
            rows.append({"registry": label, "instances": n_inst + 1, "routes": n_routes, "fill_s": round(fill_s, 2),
                         "ready_s": round(ready_s, 2), "synced_s": round(synced_s, 2), "rss_mb": round(rss, 1),
                         "rss_after_load_mb": round(rss_after, 1), "rps": round(r.rps), "p50_ms": r.p50_ms,
                         "p99_ms": r.p99_ms})  # fmt: skip
            gw.stop()
        self.results["scale"] = rows

    # --- 5. registration --------------------------------------------------------------------------------
    def registration(self) -> None:
        gw = self.gateway("a")
        ttl = 2 if self.args.quick else 5
        rows = []
        t0 = time.perf_counter()
        self.register("fresh", "a", self.upstream_port)
        while http_get(f"http://127.0.0.1:{gw.port}/small", "fresh.mesh")[0] != 200:
            time.sleep(0.001)
        rows.append({"event": "register() to routable", "ms": round((time.perf_counter() - t0) * 1000, 1)})
        for how in ("graceful stop (SIGTERM)", "crash (kill -9)"):
            cmd = [sys.executable, "-m", "zonemesh.cli", "demo-service", "--service", "victim", "--zone", "a",
                   "--ttl", str(ttl)]  # fmt: skip
            p = subprocess.Popen(die_with_parent(cmd), env={**os.environ, **self.settings.env()},
                                 stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)  # fmt: skip
            while http_get(f"http://127.0.0.1:{gw.port}/", "victim.mesh")[0] != 200:
                time.sleep(0.01)
            t0 = time.perf_counter()
            p.send_signal(signal.SIGTERM if how.startswith("graceful") else signal.SIGKILL)
            if how.startswith("crash"):
                # Traffic stops first (passive outlier ejection), then the lease expires and it leaves the catalog.
                while http_get(f"http://127.0.0.1:{gw.port}/", "victim.mesh")[0] != 503:
                    time.sleep(0.002)
                rows.append({"event": "crash (kill -9) to no traffic (outlier ejection)",
                             "ms": round((time.perf_counter() - t0) * 1000, 1)})  # fmt: skip
            while gw.catalog().get("services", {}).get("victim"):
                time.sleep(0.005)
            label = f"{how} to removed from the catalog" + (
                f" (lease TTL {ttl} s)" if how.startswith("crash") else ""
            )
            rows.append({"event": label, "ms": round((time.perf_counter() - t0) * 1000, 1)})
            p.wait()
        for r in rows:
            log(f"{r['event']:<56} {r['ms']:.1f} ms")
        gw.stop()
        self.results["registration"] = rows


async def _fill(settings: EtcdSettings, instances: int, services: int, routes: int) -> None:
    """Write instances (never dialed: port 9) and routes straight to etcd, 128 puts per transaction."""
    keys = Keys(settings.prefix)
    client = settings.client()
    ops = []
    for n in range(instances):
        svc, zone = f"svc-{n % services}", "ab"[n % 2]
        inst = Instance(id=f"i{n}", service=svc, zone=zone, address="127.0.0.1", port=9)
        ops.append(client.transactions.put(keys.instance(svc, zone, inst.id).encode(), inst.to_json()))
    for n in range(routes):
        route = {
            "match": {"hosts": [f"r{n}.example.com"]},
            "direct_response": {"status": 200, "body": str(n)},
        }
        ops.append(client.transactions.put(f"{keys.policy}routes/r{n}".encode(), json.dumps(route).encode()))
    try:
        for i in range(0, len(ops), 128):
            await client.transaction(compare=[], success=ops[i : i + 128], failure=[])
    finally:
        await client.close()


def machine() -> dict[str, Any]:
    cpu = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpu": cpu,
        "cores": os.cpu_count(),
        "python": platform.python_version(),
        "kernel": platform.release(),
        "gateway": gateway.RUNNING,  # compiled with mypyc, or the Python source (and why)
    }


def markdown(results: dict[str, Any]) -> str:
    out = [f"Machine: {results['machine']['cores']} cores, {results['machine']['cpu']}, Python "
           f"{results['machine']['python']}; gateway request path: {results['machine']['gateway']}; load: "
           f"{results['tool']}; upstream: {results['upstream']}", ""]  # fmt: skip
    if "throughput" in results:
        out += ["| target | body | conns | req/s | p50 ms | p99 ms | p99.9 ms | errors | req/s vs nginx | p99 vs nginx "
                "| req/s vs nginx by round |", "|---|---|---|---|---|---|---|---|---|---|---|"]  # fmt: skip
        for r in results["throughput"]:
            by_round = " / ".join(str(x) for x in r.get("vs_nginx_rps_rounds") or []) or "-"
            out.append(f"| {r['target']} | {r['body']} | {r['connections']} | {r['rps']} | {r['p50_ms']:.2f} | "
                       f"{r['p99_ms']:.2f} | {r['p999_ms']:.2f} | {r['errors']} | {r['vs_nginx_rps'] or '-'} | "
                       f"{r['vs_nginx_p99'] or '-'} | {by_round} |")  # fmt: skip
        out.append("")
    if "cross_zone" in results:
        out += ["| path | req/s | p50 ms | p99 ms |", "|---|---|---|---|"]
        out += [
            f"| {r['path']} | {r['rps']} | {r['p50_ms']:.2f} | {r['p99_ms']:.2f} |"
            for r in results["cross_zone"]
        ]
        out.append("")
    if "propagation" in results:
        p = results["propagation"]
        out += ["| config propagation | gateways | writes | p50 ms | p99 ms | max ms |", "|---|---|---|---|---|---|",
                f"| etcd write -> in force on all | {p['gateways']} | {p['writes']} | {p['all_p50_ms']:.1f} | "
                f"{p['all_p99_ms']:.1f} | {p['all_max_ms']:.1f} |",
                f"| etcd write -> in force on one | {p['gateways']} | {p['writes']} | {p['one_p50_ms']:.1f} | "
                f"{p['one_p99_ms']:.1f} | |", ""]  # fmt: skip
    if "scale" in results:
        out += ["| registry | catalog+policy sync s | RSS MB | RSS after load MB | req/s | p50 ms | p99 ms |",
                "|---|---|---|---|---|---|---|"]  # fmt: skip
        out += [f"| {r['registry']} | {r['synced_s']} | {r['rss_mb']} | {r['rss_after_load_mb']} | {r['rps']} | "
                f"{r['p50_ms']:.2f} | {r['p99_ms']:.2f} |" for r in results["scale"]]  # fmt: skip
        out.append("")
    if "registration" in results:
        out += ["| registration | ms |", "|---|---|"]
        out += [f"| {r['event']} | {r['ms']} |" for r in results["registration"]]
    return "\n".join(out)


def plot(results: dict[str, Any], path: Path) -> bool:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    rows = [r for r in results.get("throughput", []) if r["body"] == "small" and r["connections"] == 32]
    if not rows:
        return False
    fig, ax = plt.subplots(figsize=(8, 4))
    labels = [r["target"] for r in rows]
    xs = range(len(rows))
    for offset, key, name in ((-0.25, "p50_ms", "p50"), (0, "p99_ms", "p99"), (0.25, "p999_ms", "p99.9")):
        ax.bar([x + offset for x in xs], [r[key] for r in rows], width=0.25, label=name)
    ax.set_xticks(list(xs), labels)
    plt.setp(ax.get_xticklabels(), rotation=15, ha="right")
    ax.set_ylabel("latency (ms)")
    ax.set_title("100 B responses, 32 keep-alive connections")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    return True


def main() -> int:
    ap = argparse.ArgumentParser(prog="python -m bench", description=__doc__)
    ap.add_argument("--quick", action="store_true", help="seconds-long smoke run (CI)")
    ap.add_argument("--setup", action="store_true", help="apt-get install nginx-light haproxy wrk first")
    ap.add_argument("--seconds", type=float, default=10.0, help="per load run")
    ap.add_argument(
        "--rounds", type=int, help="throughput: every target this many times, in turn (default 3; 1 quick)"
    )
    ap.add_argument("--gateways", type=int, default=3, help="gateways for the propagation test")
    ap.add_argument("--writes", type=int, default=200)
    ap.add_argument("--scale-instances", type=int, default=10_000)
    ap.add_argument("--scale-services", type=int, default=500)
    ap.add_argument("--scale-routes", type=int, default=1000)
    ap.add_argument(
        "--only", help="comma-separated sections: throughput,cross_zone,propagation,scale,registration"
    )
    ap.add_argument("--load", choices=["auto", "wrk", "bundled"], default="auto", help="load generator")
    ap.add_argument("--out", default="bench/results", help="where results.json and latency.png go")
    args = ap.parse_args()
    if args.quick:
        args.seconds = min(args.seconds, 1.0)
    if args.rounds is None:
        args.rounds = 1 if args.quick else 3
    if args.rounds < 1:
        ap.error("--rounds: at least 1")
    if args.load == "bundled":
        bench_load.FORCE_BUNDLED = True
    elif args.load == "wrk" and not wrk_path():
        ap.error("--load wrk: wrk is not installed (python -m bench --setup installs it)")
    if args.setup:
        subprocess.run(["apt-get", "update", "-qq"], check=False)
        subprocess.run(["apt-get", "install", "-y", "-qq", "nginx-light", "haproxy", "wrk"], check=True,
                       env={**os.environ, "DEBIAN_FRONTEND": "noninteractive"})  # fmt: skip
    sections = (args.only or "throughput,cross_zone,propagation,scale,registration").split(",")
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    with Bench(args) as bench:
        for section in sections:
            log(f"--- {section}")
            getattr(bench, section)()
        results = bench.results
    (out / "results.json").write_text(json.dumps(results, indent=2))
    plotted = plot(results, out / "latency.png")
    print(markdown(results))
    print(f"\nresults: {out / 'results.json'}" + (f", plot: {out / 'latency.png'}" if plotted else ""))
    return 0


if __name__ == "__main__":
    sys.exit(main())
