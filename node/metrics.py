"""Prometheus metrics (DESIGN §9), served on a loopback HTTP port by the service.

One registry per ``Metrics`` object, so tests and several services in one process do not share
counters.
"""

from __future__ import annotations

from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, start_http_server


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
        self.associations = Counter(
            "aidnode_associations", "Associations, by outcome", ["outcome"], registry=r)
        self.queue_depth = Gauge(
            "aidnode_queue_depth", "Queued jobs, by kind", ["kind"], registry=r)
        self.queue_oldest_seconds = Gauge(
            "aidnode_queue_oldest_seconds", "Age of the oldest queued job, by kind", ["kind"],
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

    def serve(self, host: str, port: int) -> int:
        """Start the HTTP endpoint in a daemon thread; returns the bound port."""
        self._server, _thread = start_http_server(port, addr=host, registry=self.registry)
        return int(self._server.server_address[1])

    def close(self) -> None:
        """Stop the HTTP endpoint and free its port (nothing when it was not started)."""
        if self._server is not None:
            self._server.shutdown()
            self._server.server_close()
            self._server = None
