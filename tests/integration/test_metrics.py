"""The Prometheus endpoint: scraped before and after traffic, the counters move."""

from __future__ import annotations

import re
import socket
import urllib.request
from collections.abc import Callable
from pathlib import Path

import pytest
from prometheus_client.parser import text_string_to_metric_families
from pynetdicom import AE
from pynetdicom.sop_class import CTImageStorage  # type: ignore[attr-defined]

from node import metrics
from node.metrics import Metrics
from storage import audit
from tests.conftest import RunningNode
from tests.dicomgen import ct_series
from tests.peers import free_port, wait_for

pytestmark = pytest.mark.integration


def scrape(port: int) -> dict[str, float]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as r:
        text = r.read().decode()
    out = {}
    for line in text.splitlines():
        m = re.match(r"^(aidnode_[a-z_]+(?:\{[^}]*\})?) ([0-9.e+-]+)$", line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


Series = dict[tuple[str, tuple[tuple[str, str], ...]], float]


def samples(port: int) -> Series:
    """Every sample the endpoint serves, in Prometheus's text format, which must parse and
    name no series twice."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as r:
        text = r.read().decode()
    out: Series = {}
    for family in text_string_to_metric_families(text):
        for s in family.samples:
            key = (s.name, tuple(sorted(s.labels.items())))
            assert key not in out, f"{key} served twice"
            out[key] = s.value
    return out


def test_another_processs_metrics_are_served_beside_ours_each_series_once() -> None:
    """What ``aidnode serve`` does with its worker's child process: the child's endpoint is
    read at every scrape; where both have a series (the gauges both processes set), ours."""
    child, parent = Metrics(), Metrics()
    try:
        child_port = child.serve("127.0.0.1", 0)
        parent.add_source(lambda: metrics.scrape(child_port))
        port = parent.serve("127.0.0.1", 0)
        child.jobs.labels("ANALYZE", "succeeded").inc()
        child.inference_seconds.labels("demo", "1.0").observe(0.3)
        child.disk_free_bytes.set(5)
        child.model_idle.labels("w0").set(1)  # only workers set it: the child's shows
        parent.instances_received.labels("new").inc(3)
        parent.disk_free_bytes.set(7)
        got = samples(port)
        assert got[("aidnode_jobs_total", (("kind", "ANALYZE"), ("outcome", "succeeded")))] == 1
        assert got[("aidnode_inference_seconds_count", (("model", "demo"), ("version", "1.0")))] \
            == 1
        assert got[("aidnode_instances_received_total", (("outcome", "new"),))] == 3
        assert got[("aidnode_disk_free_bytes", ())] == 7
        assert got[("aidnode_model_idle", (("worker", "w0"),))] == 1
        child.close()  # gone: ours alone, and the scrape still answers
        got = samples(port)
        assert ("aidnode_jobs_total", (("kind", "ANALYZE"), ("outcome", "succeeded"))) not in got
        assert got[("aidnode_disk_free_bytes", ())] == 7
    finally:
        child.close()
        parent.close()


def test_metrics_move_with_traffic(node_service: Callable[..., RunningNode]) -> None:
    port = free_port()
    node = node_service(metrics={"enabled": True, "port": port})
    assert node.service.metrics_port == port
    before = scrape(port)
    assert before.get('aidnode_instances_received_total{outcome="new"}', 0) == 0
    ae = AE("MODALITY")
    ae.add_requested_context(CTImageStorage)
    assoc = ae.associate(node.host, node.port, ae_title=node.ae_title)
    assert assoc.is_established
    series = ct_series(5, rows=32, cols=32)
    statuses = [assoc.send_c_store(ds).Status for ds in series]
    statuses.append(assoc.send_c_store(series[0]).Status)  # a duplicate
    assoc.release()
    assert statuses == [0] * 6
    after = scrape(port)
    assert after['aidnode_instances_received_total{outcome="new"}'] == 5
    assert after['aidnode_instances_received_total{outcome="duplicate-same"}'] == 1
    assert after["aidnode_store_seconds_count"] == 6
    assert after['aidnode_associations_total{outcome="accepted"}'] == 1
    # Housekeeping publishes the queue gauges: one ANALYZE job queued for the stable study.
    wait_for(lambda: scrape(port).get('aidnode_queue_depth{kind="ANALYZE"}') == 1, 20,
             what="the queue gauge to show the job")
    assert scrape(port)["aidnode_disk_free_bytes"] > 0
    # The association is audited with its count, and nothing identifies the patient.
    wait_for(lambda: _received(node), 10, what="the audit event")
    events = _received(node)
    assert events[0].detail["stored"] == 6
    assert "TEST^ID" not in str([e.detail for e in events])


def _received(node: RunningNode) -> list[audit.AuditEvent]:  # type: ignore[name-defined]
    with node.db.read() as s:
        return audit.recent(s, kind=audit.AuditKind.INSTANCES_RECEIVED.value)


def _port_is_free(port: int) -> bool:
    """Whether a server could listen on ``port`` (SO_REUSEADDR, as servers bind: a scrape's
    connection in TIME_WAIT does not hold the port, a listener does)."""
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
    return True


def test_a_failed_start_and_a_stop_free_the_metrics_port(
        node_service: Callable[..., RunningNode], tmp_path: Path) -> None:
    from node.config import load_config
    from node.service import Service, open_storage
    from tests.conftest import node_config_text

    first = node_service(metrics={"enabled": True, "port": free_port()})
    metrics_port = free_port()
    path = tmp_path / "second.toml"
    path.write_text(node_config_text(first.port, metrics={"enabled": True, "port": metrics_port}),
                    encoding="utf-8")
    cfg = load_config(path, environ={})
    database, files = open_storage(cfg)
    database.upgrade()
    second = Service(cfg, database, files)
    with pytest.raises(OSError):  # the DICOM port is the first node's
        second.start(cfg.node.host, first.port)
    assert _port_is_free(metrics_port)
    # A started node frees it when it stops.
    third = Service(cfg, database, files)
    third.start(cfg.node.host, free_port())
    assert not _port_is_free(metrics_port)
    assert "aidnode_disk_free_bytes" in scrape(metrics_port)  # it is this node's endpoint
    third.stop(grace_s=1)
    assert _port_is_free(metrics_port)
