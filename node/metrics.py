"""Prometheus metrics (DESIGN §9), served on a loopback HTTP port by the service.

One registry per ``Metrics`` object, so tests and several services in one process do not share
counters. When ``aidnode serve`` runs its worker in a child process, the child serves its own
metrics on a loopback port and the parent's endpoint adds them to its own (``add_source``), so
Prometheus still scrapes one target per node.
"""

from __future__ import annotations

import logging
import urllib.request
from collections.abc import Callable, Iterable
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server
from prometheus_client.openmetrics.parser import text_string_to_metric_families
from prometheus_client.registry import Collector
from prometheus_client.samples import Sample

log = logging.getLogger(__name__)
OPENMETRICS = "application/openmetrics-text; version=1.0.0; charset=utf-8"


class Metrics:
    def __init__(self) -> None:
        r = self.registry = CollectorRegistry()
        self._server: Any = None
        self.instances_received = Counter(
            "aidnode_instances_received", "Instances received, by outcome", ["outcome"],
            registry=r)
        self.store_seconds = Histogram(
            "aidnode_store_seconds", "Time to store one instance durably (C-STORE handler)",
            buckets=(0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 1, 5), registry=r)
        self.store_group_instances = Histogram(
            "aidnode_store_group_instances", "Instances recorded per write transaction by the "
            "receiver (concurrent associations share one: a group commit)",
            buckets=(1, 2, 3, 4, 6, 8, 12, 16, 32), registry=r)
        self.associations = Counter(
            "aidnode_associations", "Associations, by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge(
            "aidnode_queue_depth", "Queued jobs, by kind", ["kind"], registry=r)
        self.queue_oldest_seconds = Gauge(
            "aidnode_queue_oldest_seconds", "Age of the oldest queued job, by kind", ["kind"],
            registry=r)
        # By worker: an unlabelled gauge would be the receiving process's own 0 on serve's
        # endpoint, hiding its worker child's value.
        self.model_idle = Gauge(
            "aidnode_model_idle", "1 while the worker's model threads run under SCHED_IDLE "
            "(inference.scheduling adaptive, while this host receives, or idle)", ["worker"],
            registry=r)
        self.jobs = Counter(
            "aidnode_jobs", "Job outcomes, by kind and outcome", ["kind", "outcome"], registry=r)
        self.inference_seconds = Histogram(
            "aidnode_inference_seconds", "Model time per study, by model version",
            ["model", "version"], buckets=(0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 300),
            registry=r)
        self.send_failures = Counter(
            "aidnode_send_failures", "Failed C-STOREs of results, by destination",
            ["destination"], registry=r)
        self.objects_sent = Counter(
            "aidnode_objects_sent", "Result objects acknowledged, by destination",
            ["destination"], registry=r)
        self.findings = Counter(
            "aidnode_findings", "Findings reported, by finding and whether positive",
            ["finding", "positive"], registry=r)
        self.disk_free_bytes = Gauge(
            "aidnode_disk_free_bytes", "Free bytes on the store's filesystem", registry=r)
        self.worker_restarts = Counter(
            "aidnode_worker_restarts", "Times the worker's child process died and was started "
            "again", registry=r)
        self._sources: list[Callable[[], str | None]] = []

    def add_source(self, source: Callable[[], str | None]) -> None:
        """Serve, beside this registry's metrics, the OpenMetrics text ``source`` returns at each
        scrape (None: nothing this time). Where a series is in both, this registry's is kept."""
        self._sources.append(source)

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port."""
        served = self.registry
        if self._sources:
            served = CollectorRegistry(auto_describe=False)
            served.register(_Merged(self.registry, self._sources))
        self._server, _thread = start_http_server(port, addr=host, registry=served)
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint and free its port (nothing when it was not started)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None


def scrape(port: int, host: str = "127.0.0.1", timeout_s: float = 2.0) -> str | None:
    """The OpenMetrics text of the endpoint on ``host:port``; None when it does not answer."""
    req = urllib.request.Request(f"http://{host}:{port}/metrics", headers={"Accept": OPENMETRICS})
    try:
        with urllib.request.urlopen(req, timeout=timeout_s) as resp:
            return str(resp.read().decode("utf-8"))
    except OSError as exc:
        log.debug("metrics of %s:%d not read: %s", host, port, exc)
        return None


class _Merged(Collector):
    """A registry's metric families with those of other processes' endpoints added in."""

    def __init__(self, own: CollectorRegistry, sources: list[Callable[[], str | None]]) -> None:
        self.own, self.sources = own, sources

    def collect(self) -> Iterable[Any]:
        families = {m.name: m for m in self.own.collect()}  # fresh objects at every scrape
        for source in self.sources:
            text = source()
            if not text:
                continue
            try:
                theirs = list(text_string_to_metric_families(text))
            except ValueError:
                log.warning("a worker process served metrics that do not parse; left out")
                continue
            for fam in theirs:
                mine = families.setdefault(fam.name, fam)
                if mine is fam:
                    continue
                seen = {_key(x) for x in mine.samples}
                mine.samples.extend(x for x in fam.samples if _key(x) not in seen)
        return list(families.values())


def _key(sample: Sample) -> tuple[str, tuple[tuple[str, str], ...]]:
    return sample.name, tuple(sorted(sample.labels.items()))
