"""TLS and mutual TLS from flags, with certificates made by openssl for 127.0.0.1."""
from __future__ import annotations

import subprocess

import grpc
import pytest

from client import LoraFleetClient
from server.main import BackgroundServer
from tests.integration.conftest import make_config


def openssl(*args, cwd):
    subprocess.run(["openssl", *args], cwd=cwd, check=True, capture_output=True)


@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    d = tmp_path_factory.mktemp("pki")
    openssl("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", "ca.key", "-out", "ca.pem", "-days", "2",
            "-subj", "/CN=lorafleet-test-ca", cwd=d)
    (d / "san.cnf").write_text("subjectAltName=IP:127.0.0.1\n")
    for name in ("server", "client"):
        openssl("req", "-newkey", "rsa:2048", "-nodes", "-keyout", f"{name}.key", "-out", f"{name}.csr",
                "-subj", f"/CN={name}", cwd=d)
        openssl("x509", "-req", "-in", f"{name}.csr", "-CA", "ca.pem", "-CAkey", "ca.key", "-CAcreateserial",
                "-out", f"{name}.pem", "-days", "2", "-extfile", "san.cnf", cwd=d)
    return d


def test_tls(tiny_loaded, tmp_path, pki):
    cfg = make_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key")
    with BackgroundServer(cfg, tiny_loaded) as srv:
        with LoraFleetClient(f"127.0.0.1:{srv.port}", tls_ca=pki / "ca.pem", timeout=10) as c:
            assert c.generate("secure", max_new_tokens=2).completion_tokens >= 1
        with LoraFleetClient(f"127.0.0.1:{srv.port}", timeout=5) as plain:
            with pytest.raises(grpc.RpcError) as e:
                plain.generate("plain", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE


def test_mutual_tls_requires_client_cert(tiny_loaded, tmp_path, pki):
    cfg = make_config(tmp_path, tls_cert=pki / "server.pem", tls_key=pki / "server.key",
                      tls_client_ca=pki / "ca.pem")
    with BackgroundServer(cfg, tiny_loaded) as srv:
        with LoraFleetClient(f"127.0.0.1:{srv.port}", tls_ca=pki / "ca.pem", tls_cert=pki / "client.pem",
                             tls_key=pki / "client.key", timeout=10) as c:
            assert c.generate("mtls", max_new_tokens=2).completion_tokens >= 1
        with LoraFleetClient(f"127.0.0.1:{srv.port}", tls_ca=pki / "ca.pem", timeout=5) as anon:
            with pytest.raises(grpc.RpcError) as e:
                anon.generate("no cert", max_new_tokens=2)
            assert e.value.code() == grpc.StatusCode.UNAVAILABLE
