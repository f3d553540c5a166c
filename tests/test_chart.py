"""The Helm chart, rendered and linted by real Helm (helm-python-sdk), every object validated against the
Kubernetes schemas (kubernetes-validate), and its gateway ConfigMap used to configure a real gateway."""

from __future__ import annotations

import asyncio
from pathlib import Path
from typing import Any

import aiohttp
import helm_python
import kubernetes_validate
import pytest
import yaml

from registry.etcd import EtcdSettings
from tests.conftest import Procs
from tests.mesh import GatewayProc

CHART = Path(__file__).resolve().parent.parent / "charts" / "zonemesh"
K8S = "1.30"


def render(values: dict[str, Any] | None = None) -> list[dict[str, Any]]:
    chart = helm_python.Chart.load(CHART)
    out = chart.render(values, name="shop", namespace="mesh", is_install=True)
    docs = [d for text in out.values() for d in yaml.safe_load_all(text) if d]
    for d in docs:
        kubernetes_validate.validate(d, K8S, strict=True)
    return docs


def find(docs: list[dict], kind: str, name: str) -> dict:
    matches = [d for d in docs if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(matches) == 1, (
        f"{kind}/{name} not rendered: {[(d['kind'], d['metadata']['name']) for d in docs]}"
    )
    return matches[0]


def env_of(container: dict) -> dict[str, Any]:
    return {e["name"]: e.get("value", e.get("valueFrom")) for e in container["env"]}


def test_lint_is_clean() -> None:
    report = helm_python.lint(CHART, strict=True)
    assert report["errors"] == [] and not [m for m in report["messages"] if m["severity"] >= 2], report


def test_default_values_per_zone_objects_and_wiring() -> None:
    docs = render()
    endpoints = ",".join(
        f"shop-zonemesh-etcd-{i}.shop-zonemesh-etcd-headless.mesh.svc:2379" for i in range(3)
    )
    for zone in ("a", "b"):
        dep = find(docs, "Deployment", f"shop-zonemesh-gateway-{zone}")
        pod = dep["spec"]["template"]["spec"]
        (c,) = pod["containers"]
        assert c["args"][:3] == ["--config=/etc/zonemesh/gateway.yaml", "gateway", f"--zone={zone}"]
        assert "--listen=0.0.0.0:8080" in c["args"] and "--admin=0.0.0.0:9901" in c["args"]
        assert "--advertise=$(POD_IP)" in c["args"]
        env = env_of(c)
        assert env["ZONEMESH_ETCD_ENDPOINTS"] == endpoints and env["ZONEMESH_PREFIX"] == "/zonemesh"
        assert c["livenessProbe"]["httpGet"] == {"path": "/healthz", "port": "admin"}
        assert c["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": "admin"}
        assert (
            c["securityContext"]["readOnlyRootFilesystem"] is True and pod["securityContext"]["runAsNonRoot"]
        )
        assert c["resources"]["requests"]["cpu"] == "250m"
        assert dep["spec"]["replicas"] == 2
        svc = find(docs, "Service", f"shop-zonemesh-gateway-{zone}")
        assert svc["spec"]["selector"]["zonemesh.io/zone"] == zone
        assert {p["port"] for p in svc["spec"]["ports"]} == {8080, 9901}
        assert (
            find(docs, "PodDisruptionBudget", f"shop-zonemesh-gateway-{zone}")["spec"]["maxUnavailable"] == 1
        )
    sts = find(docs, "StatefulSet", "shop-zonemesh-etcd")
    assert sts["spec"]["replicas"] == 3 and sts["spec"]["serviceName"] == "shop-zonemesh-etcd-headless"
    cmd = sts["spec"]["template"]["spec"]["containers"][0]["command"]
    assert any(
        a.startswith("--initial-cluster=shop-zonemesh-etcd-0=http://") and a.count("=http://") == 3
        for a in cmd
    )
    assert find(docs, "Service", "shop-zonemesh-etcd-headless")["spec"]["clusterIP"] == "None"
    assert find(docs, "PodDisruptionBudget", "shop-zonemesh-etcd")["spec"]["minAvailable"] == 2
    control = find(docs, "Deployment", "shop-zonemesh-control")["spec"]["template"]["spec"]["containers"][0]
    assert env_of(control)["ZONEMESH_CONTROL_TOKEN"] == {
        "secretKeyRef": {"name": "shop-zonemesh-control-token", "key": "token"}
    }
    assert find(docs, "Secret", "shop-zonemesh-control-token")["data"]["token"]
    assert not [d for d in docs if d["kind"] in ("HorizontalPodAutoscaler", "NetworkPolicy")]


def test_external_etcd_hpa_networkpolicy_topology_and_tls() -> None:
    docs = render(
        {
            "zones": [{"name": "eu1", "topologyZone": "europe-west1-b"}, {"name": "eu2"}, {"name": "us1"}],
            "etcd": {
                "enabled": False,
                "endpoints": ["etcd-0.db:2379", "etcd-1.db:2379"],
                "tls": {"secretName": "etcd-client"},
                "auth": {"secretName": "etcd-auth"},
            },  # fmt: skip
            "gateway": {"autoscaling": {"enabled": True, "maxReplicas": 6}, "workers": 2},
            "control": {"tokenSecret": "my-token"},
            "networkPolicy": {"enabled": True},
            "prefix": "/prod",
        }
    )
    assert not [d for d in docs if d["kind"] == "StatefulSet"]
    assert not [d for d in docs if d["kind"] == "Secret"]  # the token Secret is the user's own
    for zone in ("eu1", "eu2", "us1"):
        dep = find(docs, "Deployment", f"shop-zonemesh-gateway-{zone}")
        assert "replicas" not in dep["spec"]  # the HPA owns it
        hpa = find(docs, "HorizontalPodAutoscaler", f"shop-zonemesh-gateway-{zone}")
        assert (
            hpa["spec"]["maxReplicas"] == 6
            and hpa["spec"]["scaleTargetRef"]["name"] == dep["metadata"]["name"]
        )
        c = dep["spec"]["template"]["spec"]["containers"][0]
        env = env_of(c)
        assert (
            env["ZONEMESH_ETCD_ENDPOINTS"] == "etcd-0.db:2379,etcd-1.db:2379"
            and env["ZONEMESH_PREFIX"] == "/prod"
        )
        assert env["ZONEMESH_ETCD_CA"] == "/etc/zonemesh/etcd-tls/ca.crt"
        assert env["ZONEMESH_ETCD_PASSWORD"] == {"secretKeyRef": {"name": "etcd-auth", "key": "password"}}
        assert "--workers=2" in c["args"]
    pinned = find(docs, "Deployment", "shop-zonemesh-gateway-eu1")["spec"]["template"]["spec"]["affinity"]
    term = pinned["nodeAffinity"]["requiredDuringSchedulingIgnoredDuringExecution"]["nodeSelectorTerms"][0]
    assert term["matchExpressions"][0] == {"key": "topology.kubernetes.io/zone", "operator": "In",
                                           "values": ["europe-west1-b"]}  # fmt: skip
    assert "affinity" not in find(docs, "Deployment", "shop-zonemesh-gateway-eu2")["spec"]["template"]["spec"]
    assert {d["metadata"]["name"] for d in docs if d["kind"] == "NetworkPolicy"} == {
        "shop-zonemesh-gateway", "shop-zonemesh-control"}  # fmt: skip


@pytest.mark.parametrize(
    ("values", "needle"),
    [
        ({"zones": [{"name": "Bad_Zone"}]}, "zones"),
        ({"etcd": {"enabled": False}}, "endpoints"),
        ({"gateway": {"port": 70000, "adminPort": 9901}}, "port"),
        ({"etcd": {"enabled": True, "replicas": 2}}, "replicas"),
    ],
)
def test_schema_rejects_bad_values(values: dict, needle: str) -> None:
    with pytest.raises(helm_python.HelmError) as info:
        render(values)
    assert needle in str(info.value)


async def test_rendered_gateway_config_configures_a_real_gateway(
    settings: EtcdSettings, procs: Procs, tmp_path
) -> None:
    docs = render(
        {"gateway": {"config": {"request-timeout": 7, "max-header-bytes": 4096, "balancer": "round_robin"}}}
    )
    config = tmp_path / "gateway.yaml"
    config.write_text(find(docs, "ConfigMap", "shop-zonemesh-gateway")["data"]["gateway.yaml"])
    gw = await GatewayProc(procs, settings, "a", config_file=str(config)).ready()
    async with aiohttp.ClientSession() as s, s.get(f"{gw.admin}/v1/config") as r:
        cfg = await r.json()
    assert cfg["timeouts"]["request"] == 7 and cfg["limits"]["max_header_bytes"] == 4096
    assert cfg["routing"]["balancer"] == "round_robin"
    await asyncio.sleep(0)
