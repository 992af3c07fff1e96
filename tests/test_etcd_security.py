"""TLS (CA, client certificate) and user/password auth against etcd servers started with them."""

from __future__ import annotations

import datetime
import ipaddress
import os
import subprocess

import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from elastic.errors import RendezvousConnectionError
from elastic.rendezvous.etcd_client import EtcdConfig, connect
from elastic.rendezvous.etcd_server import EtcdServer, find_etcd_binary
from helpers import SCRIPTS, elastic_run

PLAIN = os.path.join(SCRIPTS, "plain_ddp.py")


def _cert(subject: str, issuer_key, issuer_name, *, ca: bool, key=None):
    key = key or ec.generate_private_key(ec.SECP256R1())
    now = datetime.datetime.now(datetime.timezone.utc)
    builder = (
        x509.CertificateBuilder()
        .subject_name(x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .issuer_name(issuer_name or x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, subject)]))
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.BasicConstraints(ca=ca, path_length=None), critical=True)
    )
    if not ca:
        builder = builder.add_extension(
            x509.SubjectAlternativeName([x509.IPAddress(ipaddress.ip_address("127.0.0.1")),
                                         x509.DNSName("localhost")]), critical=False)
    cert = builder.sign(issuer_key or key, hashes.SHA256())
    return key, cert


def _write(path, key, cert) -> tuple[str, str]:
    (path.with_suffix(".key")).write_bytes(key.private_bytes(
        serialization.Encoding.PEM, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    (path.with_suffix(".crt")).write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    return str(path.with_suffix(".crt")), str(path.with_suffix(".key"))


@pytest.fixture
def tls_etcd(tmp_path):
    ca_key, ca_cert = _cert("test-ca", None, None, ca=True)
    ca_file, _ = _write(tmp_path / "ca", ca_key, ca_cert)
    server_files = _write(tmp_path / "server", *_cert("127.0.0.1", ca_key, ca_cert.subject, ca=False))
    client_files = _write(tmp_path / "client", *_cert("client", ca_key, ca_cert.subject, ca=False))
    args = ["--cert-file", server_files[0], "--key-file", server_files[1],
            "--trusted-ca-file", ca_file, "--client-cert-auth"]
    with EtcdServer(extra_args=args) as server:
        yield server, ca_file, client_files


def test_tls_with_client_certificate(tls_etcd, tmp_path):
    server, ca, (cert, key) = tls_etcd
    client = connect(EtcdConfig(server.endpoint, ca_cert=ca, cert=cert, key=key))
    client.put("/tls", "ok")
    client.close()
    proc = elastic_run("--rdzv-endpoint", server.endpoint, "--rdzv-conf",
                       f"ca_cert={ca},cert={cert},key={key},last_call_timeout=0.5",
                       "--nproc-per-node", "2", PLAIN, str(tmp_path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err
    assert (tmp_path / "result.json").exists()


def test_tls_server_refuses_plaintext_with_clear_error(tls_etcd):
    server, *_ = tls_etcd
    with pytest.raises(RendezvousConnectionError, match="cannot reach etcd"):
        connect(EtcdConfig(server.endpoint, timeout=2))


@pytest.fixture
def auth_etcd():
    with EtcdServer() as server:
        etcdctl = os.path.join(os.path.dirname(find_etcd_binary()), "etcdctl")
        base = [etcdctl, f"--endpoints=http://{server.endpoint}"]
        subprocess.run([*base, "user", "add", "root", "--new-user-password=s3cret"], check=True,
                       capture_output=True)
        subprocess.run([*base, "auth", "enable"], check=True, capture_output=True)
        yield server


def test_user_password_auth(auth_etcd, tmp_path):
    client = connect(EtcdConfig(auth_etcd.endpoint, user="root", password="s3cret"))
    client.put("/auth", "ok")
    client.close()
    (tmp_path / "password").write_text("s3cret")
    proc = elastic_run("--rdzv-endpoint", auth_etcd.endpoint, "--rdzv-conf",
                       f"user=root,password_file={tmp_path / 'password'},last_call_timeout=0.5", PLAIN, str(tmp_path))
    out, err = proc.communicate(timeout=120)
    assert proc.returncode == 0, err


def test_wrong_password_is_a_clear_one_line_error(auth_etcd, tmp_path):
    (tmp_path / "password").write_text("wrong")
    proc = elastic_run("--rdzv-endpoint", auth_etcd.endpoint, "--rdzv-conf",
                       f"user=root,password_file={tmp_path / 'password'}", PLAIN, str(tmp_path))
    out, err = proc.communicate(timeout=60)
    assert proc.returncode != 0
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "etcd refused the credentials" in lines[0], err
