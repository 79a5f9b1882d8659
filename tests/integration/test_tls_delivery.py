"""Results delivered over DICOM TLS (mutual TLS), with certificates generated for the test."""

from __future__ import annotations

import ssl
from collections.abc import Callable
from pathlib import Path

import pytest
from sqlalchemy import func, select

from node.standin import StandInPACS
from storage.models import Job, JobKind, JobStatus
from tests.conftest import RunningNode
from tests.integration.test_pipeline import send, write_study
from tests.peers import free_port, wait_for
from tests.tlsgen import make_pki

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A CA, a server certificate for 127.0.0.1 and a client certificate, all signed by it."""
    return make_pki(tmp_path_factory.mktemp("pki"))


def server_context(pki: Path) -> ssl.SSLContext:
    ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH, cafile=str(pki / "ca.pem"))
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    ctx.verify_mode = ssl.CERT_REQUIRED  # mutual TLS: the client must present a certificate
    ctx.load_cert_chain(str(pki / "server.pem"), str(pki / "server.key"))
    return ctx


def deliver_status(node: RunningNode) -> tuple[JobStatus | None, int]:
    with node.db.read() as s:
        row = s.execute(select(Job.status, Job.attempts).where(
            Job.kind == JobKind.DELIVER)).first()
        return (row[0], row[1]) if row else (None, 0)


@pytest.mark.parametrize("with_client_cert", [True, False])
def test_delivery_over_mutual_tls(node_service: Callable[..., RunningNode], untrained_model: Path,
                                  pki: Path, tmp_path: Path, with_client_cert: bool) -> None:
    pacs = StandInPACS(tmp_path / "pacs", ae_title="PACS")
    port = pacs.start(port=free_port(), ssl_context=server_context(pki))
    tls = {"ca": str(pki / "ca.pem")}
    if with_client_cert:
        tls |= {"cert": str(pki / "client.pem"), "key": str(pki / "client.key")}
    try:
        node = node_service(
            rules=[{"name": "chest", "model": str(untrained_model), "destinations": ["pacs"],
                    "match": {"modality": ["DX"]}}],
            destinations=[{"name": "pacs", "ae_title": "PACS", "host": "127.0.0.1",
                           "port": port, "tls": tls, "backoff_base_s": 0.2,
                           "backoff_max_s": 0.5}],
            inference={"workers": 1, "models_dir": "models"})
        send(node, write_study(tmp_path / "study", seed=11))
        if with_client_cert:
            wait_for(lambda: deliver_status(node)[0] == JobStatus.SUCCEEDED, 120,
                     what="the delivery over TLS")
            assert len(pacs.received) >= 2  # the SR and at least one SC
        else:  # the PACS requires a client certificate: refused, retried, nothing received
            wait_for(lambda: deliver_status(node)[1] >= 2, 120, what="two refused attempts")
            assert deliver_status(node)[0] != JobStatus.SUCCEEDED
            assert pacs.received == []
            with node.db.read() as s:
                err = s.execute(select(func.max(Job.last_error)).where(
                    Job.kind == JobKind.DELIVER)).scalar()
            assert err
    finally:
        pacs.stop()
