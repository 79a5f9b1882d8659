"""Audit events: associations, instances received, results sent, admin actions.

Details hold AE titles, hosts, UIDs and counts only, never patient names or IDs.
"""

from __future__ import annotations

import enum
from typing import Any

from sqlalchemy import select
from sqlalchemy.orm import Session

from storage import clock
from storage.models import AuditEvent


class AuditKind(enum.StrEnum):
    ASSOCIATION_ACCEPTED = "association-accepted"
    ASSOCIATION_REJECTED = "association-rejected"
    INSTANCES_RECEIVED = "instances-received"
    RESULTS_SENT = "results-sent"
    ADMIN = "admin"
    WORKER_PROCESS_DIED = "worker-process-died"


def record(s: Session, kind: AuditKind, *, ae_title: str | None = None, host: str | None = None,
           **detail: Any) -> None:
    s.add(AuditEvent(at=clock.now(), kind=kind.value, ae_title=ae_title, host=host,
                     detail=detail))


def recent(s: Session, limit: int = 100, kind: str | None = None) -> list[AuditEvent]:
    q = select(AuditEvent).order_by(AuditEvent.id.desc()).limit(limit)
    if kind:
        q = q.where(AuditEvent.kind == kind)
    return list(s.execute(q).scalars())
