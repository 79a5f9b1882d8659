"""The DELIVER sender (DESIGN §2 step 5): C-STORE result objects to a destination.

Each acknowledged object is recorded at once (a ``Delivery`` row), so a retry sends only what is
missing; a crash between the acknowledgement and the record resends one object, a harmless
duplicate since result UIDs are deterministic. Failures retry with exponential backoff and
jitter up to the destination's ``max_attempts``, then dead-letter. A per-destination circuit
breaker stops claiming work for a destination after repeated failures, for a cool-down.
"""

from __future__ import annotations

import logging
import ssl
import time
from dataclasses import dataclass, field
from pathlib import Path

from sqlalchemy import select
from sqlalchemy.orm import Session

from node.config import Config, DestinationConfig, TLSConfig
from node.errors import AssociationError, SendError
from node.metrics import Metrics
from node.scu import Peer, send_files
from node.status import is_success, is_warning
from storage import audit, clock, jobs
from storage.db import Database
from storage.errors import JobStateError
from storage.faults import crash_point
from storage.files import FileStore
from storage.models import Delivery, Job, JobKind, JobStatus, ResultObject, Study, StudyState

log = logging.getLogger(__name__)


def client_tls(tls: TLSConfig | None) -> ssl.SSLContext | None:
    """A client TLS context (TLS 1.2 or later) for a destination, or None for plain DICOM.

    ``ca`` verifies the PACS's certificate (the system store when absent); ``cert``/``key`` are
    our client certificate for mutual TLS.
    """
    if tls is None:
        return None
    ctx = ssl.create_default_context(ssl.Purpose.SERVER_AUTH,
                                     cafile=str(tls.ca) if tls.ca else None)
    ctx.minimum_version = ssl.TLSVersion.TLSv1_2
    if not tls.verify_peer:
        ctx.check_hostname = False
        ctx.verify_mode = ssl.CERT_NONE
    if tls.cert:
        ctx.load_cert_chain(str(tls.cert), str(tls.key) if tls.key else None)
    return ctx


@dataclass
class Breaker:
    """Opens after ``failures`` consecutive failures; closed again after ``cooldown_s``."""

    failures: int
    cooldown_s: float
    count: int = 0
    open_until: float = 0.0

    def is_open(self, now: float) -> bool:
        return now < self.open_until

    def record(self, ok: bool, now: float) -> None:
        if ok:
            self.count, self.open_until = 0, 0.0
            return
        self.count += 1
        if self.count >= self.failures:
            self.open_until = now + self.cooldown_s


@dataclass
class Sender:
    config: Config
    db: Database
    store: FileStore
    metrics: Metrics
    name: str = "sender"
    breakers: dict[str, Breaker] = field(default_factory=dict)

    def breaker(self, dest: DestinationConfig) -> Breaker:
        if dest.name not in self.breakers:
            self.breakers[dest.name] = Breaker(dest.breaker_failures, dest.breaker_cooldown_s)
        return self.breakers[dest.name]

    def open_destinations(self) -> tuple[str, ...]:
        now = time.monotonic()
        return tuple(n for n, b in self.breakers.items() if b.is_open(now))

    def peer_for(self, dest: DestinationConfig, study: Study) -> Peer:
        """Where to send: the destination, or with ``reply_to_sender`` the study's sender."""
        if not dest.reply_to_sender:
            return Peer(dest.ae_title, dest.host, dest.port, tls=client_tls(dest.tls))
        if not study.calling_ae or not study.calling_host:
            raise SendError("reply_to_sender: the study's sender is unknown", retryable=False)
        port = next((p.port for p in self.config.peers
                     if p.ae_title == study.calling_ae and p.port), dest.port)
        return Peer(study.calling_ae, study.calling_host, port, tls=client_tls(dest.tls))

    def run_once(self) -> bool:
        """Claim and run one DELIVER job; False when none was due."""
        with self.db.write() as s:
            job = jobs.claim(s, JobKind.DELIVER, self.name,
                             exclude_destinations=self.open_destinations())
        if job is None:
            return False
        started = time.monotonic()
        try:
            dest = self.config.destination(job.destination or "")
        except KeyError:
            outcome = self._fail(job, None, f"destination {job.destination!r} is not configured",
                                 retryable=False)
        else:
            try:
                outcome = self._deliver(job, dest)
            except (SendError, AssociationError, OSError) as exc:
                self.metrics.send_failures.labels(dest.name).inc()
                self.breaker(dest).record(False, time.monotonic())
                outcome = self._fail(job, dest, str(exc),
                                     retryable=getattr(exc, "retryable", True))
            except Exception as exc:
                log.exception("DELIVER job %d: unexpected error", job.id)
                outcome = self._fail(job, dest, f"{type(exc).__name__}: {exc}",
                                     retryable=bool(getattr(exc, "retryable", True)))
        log.info("DELIVER job %d to %s %s in %.2fs", job.id, job.destination, outcome,
                 time.monotonic() - started)
        return True

    def _fail(self, job: jobs.Claimed, dest: DestinationConfig | None, error: str,
              retryable: bool) -> str:
        policy = jobs.RetryPolicy(max_attempts=job.max_attempts,
                                  base_s=dest.backoff_base_s if dest else 5,
                                  max_s=dest.backoff_max_s if dest else 900)
        try:
            with self.db.write() as s:
                status = jobs.fail(s, job.id, job.token, error, retryable=retryable,
                                   policy=policy)
        except JobStateError as exc:
            return f"lost its lease ({exc})"
        if status == JobStatus.FAILED and job.study_id is not None:
            with self.db.write() as s:
                study = s.get(Study, job.study_id)
                if study is not None:
                    study.state = StudyState.FAILED
        self.metrics.jobs.labels("DELIVER", status.value.lower()).inc()
        return f"{'will retry' if status == JobStatus.QUEUED else 'dead-lettered'}: {error}"

    def _deliver(self, job: jobs.Claimed, dest: DestinationConfig) -> str:
        result_id = int(job.payload["result_id"])
        # This result's objects the destination has not acknowledged yet (a retry resumes);
        # the (object_id, destination) unique index answers it, however many were sent before.
        acknowledged = select(Delivery.id).where(Delivery.object_id == ResultObject.id,
                                                 Delivery.destination == dest.name).exists()
        with self.db.read() as s:
            objects = list(s.execute(select(ResultObject).where(
                ResultObject.result_id == result_id, ~acknowledged)
                .order_by(ResultObject.id)).scalars())
            study = s.get(Study, job.study_id) if job.study_id else None
        if objects:
            if study is None:
                raise SendError("the study of this delivery no longer exists", retryable=False)
            peer = self.peer_for(dest, study)
            by_path = {self.store.path(o.path): o for o in objects}

            def record(path: Path, status: int) -> None:
                crash_point("sender.after_ack")  # the PACS answered; nothing recorded yet
                with self.db.write() as s:  # renew the lease: long sends are not re-queued
                    if not jobs.heartbeat(s, job.id, job.token):
                        raise JobStateError(f"job {job.id}: lease lost during the send")
                if is_success(status) or is_warning(status):
                    with self.db.write() as s:
                        s.add(Delivery(object_id=by_path[path].id, job_id=job.id,
                                       destination=dest.name, status=status,
                                       sent_at=clock.now()))
                    self.metrics.objects_sent.labels(dest.name).inc()

            results = send_files(peer, list(by_path), calling_ae=self.config.node.ae_title,
                                 on_sent=record)
            bad = [(p, st) for p, st in results if not (is_success(st) or is_warning(st))]
            if bad:
                st = bad[0][1]
                # A7xx (out of resources) may pass; other refusals will not change on a retry.
                raise SendError(f"{len(bad)} of {len(results)} objects refused by {peer} "
                                f"(status 0x{st & 0xFFFF:04X})", status=st,
                                retryable=(st & 0xFF00) == 0xA700 or st == -1)
        self.breaker(dest).record(True, time.monotonic())
        with self.db.write() as s:
            jobs.succeed(s, job.id, job.token, f"{len(objects)} objects sent")
            audit.record(s, audit.AuditKind.RESULTS_SENT, ae_title=dest.ae_title,
                         host=dest.host, destination=dest.name, result=result_id,
                         objects=len(objects))
            if job.study_id is not None:
                self._mark_sent(s, job.study_id, job.id)
        self.metrics.jobs.labels("DELIVER", "succeeded").inc()
        return f"succeeded: {len(objects)} objects sent"

    @staticmethod
    def _mark_sent(s: Session, study_id: int, job_id: int) -> None:
        pending = s.execute(select(Job.id).where(
            Job.study_id == study_id, Job.kind == JobKind.DELIVER, Job.id != job_id,
            Job.status.in_([JobStatus.QUEUED, JobStatus.RUNNING]))).first()
        study = s.get(Study, study_id)
        if pending is None and study is not None and study.state == StudyState.ANALYSED:
            study.state = StudyState.SENT
