"""The receiver's DICOM TLS port (``[node.tls]``): TLS >= 1.2, client certificates verified
against ``ca_bundle`` (mutual TLS); every refused client stores nothing and leaves both ports
serving. Certificates are generated for the test (tests/tlsgen.py).
"""

from __future__ import annotations

import logging
import re
import socket
import ssl
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest
from pydicom.dataset import Dataset
from pydicom.uid import CTImageStorage, ExplicitVRLittleEndian
from pynetdicom import AE

from node import cli
from node.config import load_config
from node.errors import ConfigError
from node.status import REJECT_TOO_MANY, Status
from tests.conftest import NODE_AE, RunningNode
from tests.dicomgen import ct_series, write_all
from tests.integration.test_receiver import assert_consistent, rejection, send
from tests.peers import free_port, storescu, wait_for
from tests.tlsgen import make_ca, make_cert, make_pki

NodeFactory = Callable[..., RunningNode]


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Our CA with a server and a client certificate, and a rogue CA with its own client."""
    folder = make_pki(tmp_path_factory.mktemp("pki"))
    make_ca(folder, "rogue-ca")
    make_cert(folder, "rogue-client", ca="rogue-ca")
    return folder


def tls_table(pki: Path, *, mutual: bool = True, **extra: object) -> dict[str, object]:
    table: dict[str, object] = {"port": free_port(), "certificate": str(pki / "server.pem"),
                                "private_key": str(pki / "server.key"), **extra}
    if mutual:
        table["ca_bundle"] = str(pki / "ca.pem")
    return table


def client_context(pki: Path, cert: str | None = "client") -> ssl.SSLContext:
    """A client that trusts our CA and shows ``<cert>.pem`` (None: no certificate)."""
    context = ssl.create_default_context(ssl.Purpose.SERVER_AUTH, cafile=str(pki / "ca.pem"))
    if cert is not None:
        context.load_cert_chain(str(pki / f"{cert}.pem"), str(pki / f"{cert}.key"))
    return context


def tls_1_1_context(pki: Path) -> ssl.SSLContext:
    """A client that speaks TLS 1.1 only (security level 0, or OpenSSL 3 will not even try)."""
    context = client_context(pki)
    with pytest.warns(DeprecationWarning, match="TLSv1_1 is deprecated"):
        context.minimum_version = ssl.TLSVersion.TLSv1_1
    with pytest.warns(DeprecationWarning, match="TLSv1_1 is deprecated"):
        context.maximum_version = ssl.TLSVersion.TLSv1_1
    context.set_ciphers("DEFAULT:@SECLEVEL=0")
    return context


def tls_port(node: RunningNode) -> int:
    assert node.config.node.tls is not None
    return int(node.config.node.tls.port)


def store_over_tls(node: RunningNode, ds: Dataset, context: ssl.SSLContext | None,
                   ) -> list[int] | None:
    """C-STORE ``ds`` to the TLS port (``context`` None: in plain text); the statuses, or None
    when no association was established."""
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = ae.connection_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    tls_args = None if context is None else (context, "127.0.0.1")
    assoc = ae.associate(node.host, tls_port(node), ae_title=NODE_AE, tls_args=tls_args)
    try:
        if not assoc.is_established:
            return None
        rsp = assoc.send_c_store(ds)
        assoc.release()
        return [int(rsp.Status)] if "Status" in rsp else []
    finally:
        ae.shutdown()


def assert_both_ports_serve(node: RunningNode, pki: Path) -> None:
    (plain,) = ct_series(1, rows=16, cols=16)
    assert send(node, plain) == [Status.SUCCESS]
    # Released; the node's thread for it may still be ending (it counts toward a limit of 1).
    wait_for(lambda: not node.service.server.active_associations, 10,
             what="the plain association to end")
    (secure,) = ct_series(1, rows=16, cols=16)
    assert store_over_tls(node, secure, client_context(pki)) == [Status.SUCCESS]
    assert {plain.SOPInstanceUID, secure.SOPInstanceUID} <= set(node.instance_paths())
    assert_consistent(node)


# -- the TLS port ---------------------------------------------------------------------------


@pytest.mark.integration
def test_a_trusted_client_certificate_stores_over_tls(node_service: NodeFactory,
                                                      pki: Path) -> None:
    node = node_service(node={"tls": tls_table(pki)})
    (ds,) = ct_series(1, rows=16, cols=16)

    assert store_over_tls(node, ds, client_context(pki)) == [Status.SUCCESS]

    paths = node.instance_paths()
    assert set(paths) == {ds.SOPInstanceUID}
    assert (node.store.root / paths[ds.SOPInstanceUID]).is_file()
    assert_consistent(node)


#: client -> (its TLS context, what OpenSSL on the node says about it)
REFUSED_CLIENTS: dict[str, tuple[Callable[[Path], ssl.SSLContext | None], str]] = {
    "plain text": (lambda pki: None, "WRONG_VERSION_NUMBER|UNKNOWN_PROTOCOL|HTTP_REQUEST"),
    "certificate from an untrusted CA": (lambda pki: client_context(pki, "rogue-client"),
                                         "CERTIFICATE_VERIFY_FAILED"),
    "no client certificate": (lambda pki: client_context(pki, None),
                              "PEER_DID_NOT_RETURN_A_CERTIFICATE"),
    "TLS 1.1 only": (tls_1_1_context, "UNSUPPORTED_PROTOCOL|VERSION_TOO_LOW"),
}


@pytest.mark.integration
@pytest.mark.parametrize("client", list(REFUSED_CLIENTS))
def test_a_refused_client_stores_nothing_and_both_ports_go_on(
        node_service: NodeFactory, pki: Path, client: str,
        caplog: pytest.LogCaptureFixture) -> None:
    node = node_service(node={"tls": tls_table(pki)})
    make_context, reason = REFUSED_CLIENTS[client]
    (ds,) = ct_series(1, rows=16, cols=16)

    assert store_over_tls(node, ds, make_context(pki)) is None

    refusal = re.compile(rf"TLS handshake with 127\.0\.0\.1 refused: .*({reason})")
    wait_for(lambda: any(r.name == "node.listeners" and refusal.search(r.getMessage())
                         for r in caplog.records), 10, what=f"the node to log {reason}")
    assert node.instance_count() == 0
    assert node.files() == []
    assert_both_ports_serve(node, pki)


@pytest.mark.integration
def test_a_stalled_handshake_holds_no_other_tls_client(node_service: NodeFactory,
                                                       pki: Path) -> None:
    node = node_service(node={"tls": tls_table(pki)})
    with socket.create_connection((node.host, tls_port(node)), timeout=10):
        # connected, never sends a ClientHello: the accept loop must not wait on it
        (ds,) = ct_series(1, rows=16, cols=16)
        assert store_over_tls(node, ds, client_context(pki)) == [Status.SUCCESS]
    assert node.instance_count() == 1


@pytest.mark.integration
def test_without_a_ca_bundle_no_client_certificate_is_needed(node_service: NodeFactory,
                                                            pki: Path) -> None:
    node = node_service(node={"tls": tls_table(pki, mutual=False)})
    (ds,) = ct_series(1, rows=16, cols=16)

    assert store_over_tls(node, ds, client_context(pki, None)) == [Status.SUCCESS]
    assert node.instance_count() == 1


@pytest.mark.integration
def test_both_ports_share_the_association_limit(node_service: NodeFactory, pki: Path) -> None:
    node = node_service(node={"max_associations": 1, "tls": tls_table(pki)})
    ae = AE(ae_title="TLSSCU")
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    held = ae.associate(node.host, tls_port(node), ae_title=NODE_AE,
                        tls_args=(client_context(pki), "127.0.0.1"))
    try:
        assert held.is_established
        assert rejection(node) == REJECT_TOO_MANY
    finally:
        held.release()
        ae.shutdown()
    wait_for(lambda: not node.service.server.active_associations, 10,
             what="the TLS association to end")
    assert_both_ports_serve(node, pki)


@pytest.mark.integration
def test_stopping_the_service_closes_both_ports(node_service: NodeFactory, pki: Path) -> None:
    node = node_service(node={"tls": tls_table(pki)})
    node.service.stop(grace_s=5)

    for port in (node.port, tls_port(node)):
        with pytest.raises(ConnectionRefusedError):
            socket.create_connection((node.host, port), timeout=5).close()


@pytest.mark.integration
def test_stopping_waits_for_an_association_in_progress_on_the_tls_port(
        node_service: NodeFactory, pki: Path) -> None:
    """A stop drains the TLS port as it drains the plain one: the association in progress may
    still store, and the stop ends once it is released."""
    node = node_service(node={"tls": tls_table(pki)})
    ae = AE(ae_title="TLSSCU")
    ae.acse_timeout = ae.dimse_timeout = ae.network_timeout = 10
    ae.add_requested_context(CTImageStorage, ExplicitVRLittleEndian)
    held = ae.associate(node.host, tls_port(node), ae_title=NODE_AE,
                        tls_args=(client_context(pki), "127.0.0.1"))
    try:
        assert held.is_established
        stopping = threading.Thread(target=node.service.stop, kwargs={"grace_s": 60})
        stopping.start()
        wait_for(lambda: not _accepting(node, node.port) and not _accepting(node, tls_port(node)),
                 10, what="both ports to close")
        # Both ports are closed and the stop now drains: it must wait for this association
        # (before the fix it went on at once, the TLS port's associations out of its sight).
        time.sleep(1)
        assert stopping.is_alive() and not node.service.stopping.is_set()
        (ds,) = ct_series(1, rows=16, cols=16)
        rsp = held.send_c_store(ds)  # the association in progress finishes its work
        assert int(rsp.Status) == Status.SUCCESS
        held.release()
        stopping.join(timeout=30)
        assert not stopping.is_alive()
    finally:
        if held.is_established:
            held.abort()
        ae.shutdown()
    assert ds.SOPInstanceUID in node.instance_paths()


def _accepting(node: RunningNode, port: int) -> bool:
    try:
        socket.create_connection((node.host, port), timeout=2).close()
    except OSError:
        return False
    return True


# -- configuration ----------------------------------------------------------------------------


def write_config(folder: Path, tls_lines: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "config.toml"
    path.write_text(f"[node]\nport = 11112\n\n[node.tls]\n{tls_lines}", encoding="utf-8")
    return path


def test_tls_paths_resolve_against_the_config_file(tmp_path: Path, pki: Path) -> None:
    folder = tmp_path / "etc"
    folder.mkdir()
    for name in ("server.pem", "server.key", "ca.pem"):
        (folder / name).write_bytes((pki / name).read_bytes())
    path = write_config(folder, 'port = 2762\ncertificate = "server.pem"\n'
                                'private_key = "server.key"\nca_bundle = "ca.pem"\n')

    tls = load_config(path, environ={}).node.tls

    assert tls is not None
    assert (tls.certificate, tls.private_key, tls.ca_bundle) == (
        folder.resolve() / "server.pem", folder.resolve() / "server.key",
        folder.resolve() / "ca.pem")
    assert tls.min_version == "1.2"


@pytest.mark.parametrize(("line", "problem"), [
    ('min_version = "1.1"', r'node\.tls\.min_version \(line 7\): .*must be "1\.2" or "1\.3"'),
    ("min_version = 1.0", r"node\.tls\.min_version \(line 7\): .*TLS below 1\.2 is refused"),
    ("port = 11112", r"node\.tls\.port \(line 7\): must differ from node\.port \(11112\)"),
    ('ca_bundle = "nope.pem"', r"node\.tls\.ca_bundle \(line 7\): no such file: .*nope\.pem"),
])
def test_a_bad_tls_listener_names_its_key_and_line(tmp_path: Path, pki: Path, line: str,
                                                   problem: str) -> None:
    path = write_config(tmp_path, f'certificate = "{pki / "server.pem"}"\n'
                                  f'private_key = "{pki / "server.key"}"\n{line}\n')
    with pytest.raises(ConfigError, match=problem):
        load_config(path, environ={})


def test_config_check_accepts_a_tls_listener(tmp_path: Path, pki: Path,
                                             capsys: pytest.CaptureFixture[str]) -> None:
    path = write_config(tmp_path, f'port = 2762\ncertificate = "{pki / "server.pem"}"\n'
                                  f'private_key = "{pki / "server.key"}"\n'
                                  f'ca_bundle = "{pki / "ca.pem"}"\nmin_version = "1.3"\n')
    with pytest.raises(SystemExit) as exc:
        cli.main(["-c", str(path), "config", "check", "--json"])
    out = capsys.readouterr().out
    assert exc.value.code == 0, out
    assert '"min_version": "1.3"' in out and str(pki / "ca.pem") in out


def test_an_unreadable_key_fails_at_start_with_the_key_named(pki: Path, tmp_path: Path) -> None:
    from node.listeners import server_context

    bad = tmp_path / "bad.key"
    bad.write_text("not a key\n")
    tls = load_config(write_config(tmp_path, f'certificate = "{pki / "server.pem"}"\n'
                                             f'private_key = "{bad}"\n'), environ={}).node.tls
    assert tls is not None
    with pytest.raises(ConfigError, match="node.tls: cannot load the certificate"):
        server_context(tls)


@pytest.mark.integration
def test_the_tls_listener_logs_where_it_listens(node_service: NodeFactory, pki: Path,
                                               caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="node.listeners")
    node = node_service(node={"tls": tls_table(pki)})
    assert any(f"DICOM TLS on 127.0.0.1:{tls_port(node)} (TLS >= 1.2, client certificates "
               "required)" in r.getMessage() for r in caplog.records)


@pytest.mark.integration
def test_dcmtk_storescu_stores_over_mutual_tls(node_service: NodeFactory, pki: Path,
                                               tmp_path: Path) -> None:
    node = node_service(node={"tls": tls_table(pki)})
    series = ct_series(3, rows=16, cols=16)
    write_all(series, tmp_path / "send")

    done = storescu(node.host, tls_port(node), [tmp_path / "send"], called_aet=NODE_AE,
                    extra_args=["+tls", str(pki / "client.key"), str(pki / "client.pem"),
                                "+cf", str(pki / "ca.pem")])

    assert done.returncode == 0, done.stdout + done.stderr
    assert set(node.instance_paths()) == {ds.SOPInstanceUID for ds in series}
    assert_consistent(node)
