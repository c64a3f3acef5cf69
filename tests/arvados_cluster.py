"""A test Arvados cluster: the contract-faithful API server (``arvados_api_server``)
over TLS with a fresh self-signed certificate (trustme), and two real
``keep-ingest keepstore`` processes sharing its blob signing key and TTL.

``cluster`` is module-scoped (one cluster per test module, its state reset before
each test); ``cluster.env(tmp_path)`` is the environment for a CLI run against it
(``ARVADOS_API_HOST``, ``ARVADOS_API_TOKEN``, ``ARVADOS_API_HOST_INSECURE=1``, and
HOME, caches and config under ``tmp_path`` so no user file is read or written).
"""

from __future__ import annotations

import ssl
import urllib.parse
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
import trustme
from arvados_api_server import SIGNING_KEY, SIGNING_TTL, USER_TOKEN, ApiServer, ClusterState
from conftest import cli_env
from keepstore_fixture import KeepstoreProcess, _stop_all, start_keepstores


@dataclass
class TestCluster:
    server: ApiServer
    state: ClusterState
    keepstores: list[KeepstoreProcess]
    ca_file: Path

    @property
    def host(self) -> str:
        return self.server.host

    def env(self, tmp_path: Path, token: str = USER_TOKEN, **extra: str) -> dict[str, str]:
        home = tmp_path / "home"
        home.mkdir(parents=True, exist_ok=True)
        return cli_env(tmp_path, {
            "ARVADOS_API_HOST": self.host, "ARVADOS_API_TOKEN": token, "ARVADOS_API_HOST_INSECURE": "1",
            "HOME": str(home), "XDG_CACHE_HOME": str(tmp_path / "xdg-cache"),
            "XDG_CONFIG_HOME": str(tmp_path / "xdg-config"), "XDG_CONFIG_DIRS": str(tmp_path / "xdg-dirs"),
            "ARVADOS_KEEP_SERVICES": "", **extra})

    def stored_blocks(self) -> list[str]:
        """Every block file on every keepstore volume."""
        return sorted(p.name for ks in self.keepstores for v in ks.volumes if v.exists()
                      for p in v.glob("*/*") if len(p.name) == 32)


@pytest.fixture(scope="module")
def cluster(tmp_path_factory) -> Iterator[TestCluster]:
    base = tmp_path_factory.mktemp("cluster")
    ca = trustme.CA()
    cert = ca.issue_cert("127.0.0.1", "localhost")
    ca_file = base / "ca.pem"
    ca.cert_pem.write_to_path(str(ca_file))
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    cert.configure_cert(ctx)
    keepstores = start_keepstores(base, 2, signing_key=SIGNING_KEY, signing_ttl=SIGNING_TTL)
    state = ClusterState()
    for i, ks in enumerate(keepstores):
        url = urllib.parse.urlsplit(ks.url)
        state.keep_services.append({"uuid": f"zzzzz-bi6l4-{i:015d}", "service_host": url.hostname,
                                    "service_port": url.port, "service_ssl_flag": False,
                                    "service_type": "disk", "read_only": False})
    server = ApiServer(state, ctx)
    try:
        server.start()
        yield TestCluster(server, state, keepstores, ca_file)
    finally:
        server.stop()
        _stop_all(keepstores)


@pytest.fixture
def fresh_cluster(cluster) -> TestCluster:
    """The module's cluster with no collections and no request log."""
    cluster.state.reset()
    cluster.state.max_request_size = 128 * 1024 * 1024
    return cluster
