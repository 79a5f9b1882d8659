"""The registry of running processes, on SQLite and PostgreSQL: register, heartbeat, stale,
jobs in hand, deregister."""

from __future__ import annotations

from storage import jobs, registry
from storage.db import Database
from storage.models import JobKind
from tests.conftest import FrozenClock


def test_a_process_registers_beats_goes_stale_and_leaves(any_db: Database,
                                                        frozen_clock: FrozenClock) -> None:
    with any_db.write() as s:
        registry.register(s, "gpu-1.example.org:4242", "worker", "0.1.0")
        registry.register(s, "pacs-gw:7", "receiver", "0.1.0")
    with any_db.write() as s:
        jobs.enqueue(s, JobKind.ANALYZE)
        jobs.enqueue(s, JobKind.ANALYZE)
        assert jobs.claim(s, JobKind.ANALYZE, "gpu-1.example.org:4242/worker-0") is not None
    with any_db.read() as s:
        views = {v.name: v for v in registry.nodes(s)}
    gpu = views["gpu-1.example.org:4242"]
    assert (gpu.host, gpu.pid, gpu.role, gpu.jobs_in_hand, gpu.stale) == (
        "gpu-1.example.org", 4242, "worker", 1, False)
    assert views["pacs-gw:7"].jobs_in_hand == 0

    frozen_clock.advance(registry.STALE_AFTER_S + 1)
    with any_db.write() as s:
        assert registry.heartbeat(s, "pacs-gw:7")
    with any_db.read() as s:
        assert [v.name for v in registry.live(s)] == ["pacs-gw:7"]  # gpu-1 fell silent
        assert [v.name for v in registry.nodes(s) if v.stale] == ["gpu-1.example.org:4242"]

    with any_db.write() as s:
        registry.deregister(s, "pacs-gw:7")
        assert not registry.heartbeat(s, "pacs-gw:7")  # gone: the service re-registers then
        registry.register(s, "pacs-gw:7", "receiver", "0.1.0")
    frozen_clock.advance(registry.FORGET_AFTER.total_seconds() + 1)
    with any_db.write() as s:  # a day-old stale row is dropped when anyone registers
        registry.register(s, "pacs-gw:8", "sender", "0.1.0")
    with any_db.read() as s:
        assert [v.name for v in registry.nodes(s)] == ["pacs-gw:8"]
