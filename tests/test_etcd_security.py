"""etcd over mutual TLS with username/password auth: the registry, the catalog and the CLI all connect."""

from __future__ import annotations

import asyncio
import datetime
import ipaddress
from pathlib import Path

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

from registry.catalog import Catalog
from registry.embedded_etcd import EmbeddedEtcd
from registry.etcd import EtcdSettings
from registry.heartbeat import HeartbeatClient
from registry.model import Instance, new_instance_id
from tests.conftest import run_cli, wait_for


def _write_pem(path: Path, key: ec.EllipticCurvePrivateKey, cert: x509.Certificate) -> None:
    path.with_suffix(".crt").write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    path.with_suffix(".key").write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()
        )
    )


def make_pki(directory: Path) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by the CA."""
    now = datetime.datetime.now(datetime.UTC)
    ca_key = ec.generate_private_key(ec.SECP256R1())
    ca_name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "zonemesh test CA")])
    ca = (
        x509.CertificateBuilder().subject_name(ca_name).issuer_name(ca_name).public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number()).not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(ca_key, hashes.SHA256())
    )  # fmt: skip
    directory.mkdir(parents=True, exist_ok=True)
    (directory / "ca.crt").write_bytes(ca.public_bytes(serialization.Encoding.PEM))
    for name, usage in (
        ("server", ExtendedKeyUsageOID.SERVER_AUTH),
        ("client", ExtendedKeyUsageOID.CLIENT_AUTH),
    ):
        key = ec.generate_private_key(ec.SECP256R1())
        cert = (
            x509.CertificateBuilder().subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, name)]))
            .issuer_name(ca_name).public_key(key.public_key()).serial_number(x509.random_serial_number())
            .not_valid_before(now - datetime.timedelta(minutes=5)).not_valid_after(now + datetime.timedelta(days=1))
            .add_extension(x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                                        x509.DNSName("localhost")]), critical=False)
            .add_extension(x509.ExtendedKeyUsage([usage]), critical=False)
            .sign(ca_key, hashes.SHA256())
        )  # fmt: skip
        _write_pem(directory / name, key, cert)
    return directory


@pytest.fixture(scope="module")
def secure_etcd(tmp_path_factory: pytest.TempPathFactory):
    base = tmp_path_factory.mktemp("secure-etcd")
    tls = make_pki(base / "pki")
    server = EmbeddedEtcd(base / "etcd", tls_dir=tls)
    server.start()
    server.etcdctl("user", "add", "root", "--new-user-password=s3cret")
    server.etcdctl("auth", "enable")
    yield server, tls
    server.cleanup()


def _settings(server: EmbeddedEtcd, tls: Path, password: str = "s3cret") -> EtcdSettings:
    return EtcdSettings(
        endpoints=(server.endpoint,), ca_file=str(tls / "ca.crt"), cert_file=str(tls / "client.crt"),
        key_file=str(tls / "client.key"), username="root", password=password, timeout=2,
    )  # fmt: skip


async def test_registry_and_catalog_over_mtls_with_auth(secure_etcd) -> None:
    server, tls = secure_etcd
    settings = _settings(server, tls)
    inst = Instance(id=new_instance_id("vault"), service="vault", zone="a", address="127.0.0.1", port=8200)
    async with Catalog(settings) as catalog, HeartbeatClient(inst, settings, ttl=5) as hb:
        assert hb.registered
        await wait_for(lambda: catalog.snapshot.instances("vault"), 3)
    flags = ["--etcd", server.endpoint, "--etcd-ca", str(tls / "ca.crt"), "--etcd-cert", str(tls / "client.crt"),
             "--etcd-key", str(tls / "client.key"), "--etcd-user", "root", "--etcd-password", "s3cret"]  # fmt: skip
    inst2 = Instance(id=new_instance_id("vault"), service="vault", zone="b", address="127.0.0.1", port=8201)
    async with HeartbeatClient(inst2, settings, ttl=30):
        res = await asyncio.to_thread(run_cli, "status", *flags)
    assert res.returncode == 0, res.stderr
    assert "vault" in res.stdout and inst2.id in res.stdout


async def test_wrong_password_is_reported_not_raised(secure_etcd) -> None:
    server, tls = secure_etcd
    inst = Instance(id=new_instance_id("vault"), service="vault", zone="a", address="127.0.0.1", port=8200)
    hb = HeartbeatClient(inst, _settings(server, tls, password="wrong"), ttl=5)
    assert await hb.register(wait=1.5) is False
    assert (
        "authentication failed" in (hb.last_error or "").lower() or "invalid" in (hb.last_error or "").lower()
    )
    await hb.deregister()
