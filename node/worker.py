"""The ANALYZE worker (DESIGN §2 step 4): model -> SR + SC -> stored -> DELIVER jobs queued.

It claims a job with a lease, keeps it alive with a heartbeat thread, runs the model (kept loaded
between jobs), builds the result objects, writes them durably, and in ONE transaction records the
result, supersedes the previous one, marks the job succeeded and enqueues one DELIVER job per
destination. A worker that lost its lease publishes nothing.
"""

from __future__ import annotations

import gc
import logging
import os
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pydicom import dcmread
from pydicom.dataset import Dataset
from pydicom.filebase import DicomBytesIO
from sqlalchemy import select

from inference.errors import InferenceError
from inference.prediction import Finding, Prediction
from node import models, priority
from node.assembly import input_hash
from node.config import Config
from node.metrics import Metrics
from storage import catalog, clock, jobs
from storage.db import Database
from storage.errors import JobStateError, StorageError
from storage.faults import crash_point
from storage.files import FileStore
from storage.models import (
    Instance,
    Job,
    JobKind,
    JobStatus,
    Result,
    ResultObject,
    Series,
    Study,
    StudyState,
)

log = logging.getLogger(__name__)
T = TypeVar("T")
SOFTWARE_VERSION = "aidnode 0.1.0"


def encode(ds: Dataset) -> bytes:
    buf = DicomBytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def _freeze_heap() -> None:
    """Collect, then exempt every object alive now from later collections (``gc.freeze``).

    A loaded model and its libraries leave ~700 000 long-lived objects that each full
    collection scans again (0.23 s, when reading a 300-slice series back set one off). They
    live as long as the process, so the warm-up freezes them once they are loaded (a model
    loaded later, with the warm-up off, is not frozen)."""
    gc.collect()
    gc.freeze()


class Phases(dict[str, float]):
    """Seconds spent in each named step of one job, in order, for its outcome line."""

    @contextmanager
    def timed(self, name: str) -> Iterator[None]:
        started = time.perf_counter()
        try:
            yield
        finally:
            self[name] = self.get(name, 0.0) + time.perf_counter() - started

    def __str__(self) -> str:
        return ", ".join(f"{name} {secs:.2f}s" for name, secs in self.items())


def _read_all(paths: Sequence[Path]) -> list[Dataset]:
    return [dcmread(p) for p in paths]


@dataclass
class Built:
    kind: str
    label: str | None
    dataset: Dataset


@dataclass
class Analyzer:
    config: Config
    db: Database
    store: FileStore
    metrics: Metrics
    name: str = "worker"
    _predictors: dict[str, Any] = field(default_factory=dict)
    tune_thread: bool = False  # the service sets it: lower priority, capped CPU threads
    #: The service sets it where no receiver shares the process (``serve``'s worker child, a
    #: ``--role worker``): with ``inference.scheduling = "idle"`` or ``"adaptive"`` the
    #: computation then runs in a thread of its own (``_compute``), under SCHED_IDLE always
    #: or while this host receives (``node.priority``).
    idle_cpu: bool = False
    _prepared: bool = False
    _compute_thread: priority.ModelThread | None = None
    _priority: priority.ModelPriority | None = None
    #: The service's: set when it stops, so that the warm-up does not hold the stop up.
    stopping: threading.Event = field(default_factory=threading.Event)
    _warmed: bool = False

    def _prepare_thread(self) -> None:
        """Once, in the worker's own thread: lower its priority (the model's CPU threads,
        created from it, inherit that) and cap the model's CPU threads."""
        self._prepared = True
        cfg = self.config.inference
        try:
            os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), cfg.nice)
        except (AttributeError, OSError) as exc:  # not Linux, or not allowed: run as is
            log.debug("could not set the worker's niceness: %s", exc)
        import torch

        threads = cfg.cpu_threads or max(1, (os.cpu_count() or 1) - 1)
        if torch.get_num_threads() != threads:
            torch.set_num_threads(threads)
        if self.idle_cpu:
            self._compute_thread, self._priority = priority.model_thread(
                cfg, self.store.root,
                lambda idle: self.metrics.model_idle.labels(self.name).set(int(idle)))

    def close(self) -> None:
        """Stop moving the model between classes; let its thread, if any, end after the call
        in progress."""
        if self._priority is not None:
            self._priority.close()  # the model's threads back under SCHED_OTHER
            self._priority = None
        if self._compute_thread is not None:
            self._compute_thread.close()
            self._compute_thread = None

    def _compute(self, fn: Callable[..., T], *args: Any, until_stop: bool = False) -> T:
        """Run ``fn`` (loading a model, decoding the images, the model, building the results)
        in the model's thread when there is one, so that the CPU threads the model's library
        starts from it are idle too; the database's transactions and the lease heartbeat stay
        in threads of normal class (niceness only), so the worker never holds the database's
        write lock while waiting for CPU time it may not get. With ``until_stop``, stopping
        the service raises ``priority.StopRequested`` here instead of waiting for ``fn``."""
        if self._compute_thread is None:
            return fn(*args)
        return self._compute_thread.run(fn, *args,
                                        stopping=self.stopping if until_stop else None)

    def predictor(self, ref: models.ModelRef) -> Any:
        """The loaded model for ``ref`` (loaded once, kept for later jobs)."""
        key = f"{ref.directory}:{ref.version}"
        if key not in self._predictors:
            from inference.package import load_package
            from inference.predict import Predictor

            pkg = load_package(ref.directory)
            self._predictors[key] = Predictor(pkg, device=self.config.inference.device,
                                              batch_size=self.config.inference.batch_size,
                                              max_image_bytes=self.config.node.max_pixel_bytes)
            log.info("model %s %s loaded on %s", ref.name, ref.version,
                     self._predictors[key].device)
        return self._predictors[key]

    def warm_up(self) -> None:
        """Once, before the first job: load every model a rule names and build one throwaway
        result with each (a synthetic phantom, nothing stored or counted), so the first study
        does not pay for model loading and highdicom's first use. A model that cannot be
        loaded is logged; its jobs fail as they would have."""
        self._warmed = True
        from inference.synthetic import phantom_study

        for name in sorted({rule.model for rule in self.config.rules}):
            started = time.perf_counter()
            try:
                ref = models.resolve(self.config, name)
                predictor = self._compute(self.predictor, ref, until_stop=True)
                loaded = time.perf_counter() - started
                phantoms = phantom_study(seed=0, size=256, nodule=True)
                prediction = self._compute(predictor.predict, phantoms, until_stop=True)
                self._compute(self._build, str(phantoms[0].StudyInstanceUID), phantoms,
                              prediction, None, predictor, until_stop=True)
            except priority.StopRequested:
                # A stop that came during the warm-up (on a busy machine the model's thread
                # may take long) need not wait for it: nothing of it is kept.
                log.info("stopping: the warm-up is left unfinished")
                return
            except Exception as exc:  # noqa: BLE001 - reported; the jobs will say it again
                log.warning("could not warm up model %r: %s", name, exc)
                continue
            log.info("model %s %s warmed up: loaded in %.2fs, a throwaway result built in "
                     "%.2fs", ref.name, ref.version, loaded,
                     time.perf_counter() - started - loaded)
        # Before the first job, while nothing but the models and libraries is alive: later, in
        # a process that also receives, a freeze would keep the cycles of associations in
        # flight from ever being collected.
        _freeze_heap()

    # -- one job ---------------------------------------------------------------------------

    def run_once(self) -> bool:
        """Claim and process one ANALYZE job; False when none was due."""
        if self.tune_thread and not self._prepared:
            self._prepare_thread()
        if self.config.inference.warm_up and not self._warmed:
            self.warm_up()
            if self.stopping.is_set():
                return False
        with self.db.write() as s:
            job = jobs.claim(s, JobKind.ANALYZE, self.name)
        if job is None:
            return False
        started = time.monotonic()
        lost = threading.Event()
        stop = threading.Event()
        phases = Phases()
        beat = threading.Thread(target=self._heartbeat, args=(job, stop, lost), daemon=True)
        beat.start()
        try:
            outcome = self._process(job, lost, phases)
        except Exception as exc:
            if getattr(exc, "maybe_committed", False) and self._succeeded(job.id):
                # The publishing COMMIT raised after it took effect: the job is done.
                self.metrics.jobs.labels("ANALYZE", "succeeded").inc()
                outcome = "succeeded (its COMMIT reported a failure after taking effect)"
            else:
                retryable = bool(getattr(exc, "retryable", False))
                if not isinstance(exc, InferenceError | StorageError | models.ModelNotFoundError):
                    log.exception("ANALYZE job %d: unexpected error", job.id)
                outcome = self._fail(job, f"{type(exc).__name__}: {exc}", retryable)
        finally:
            stop.set()
            beat.join()
        log.info("ANALYZE job %d %s in %.2fs (%s)", job.id, outcome, time.monotonic() - started,
                 phases or "no step ran")
        return True

    def _heartbeat(self, job: jobs.Claimed, stop: threading.Event,
                   lost: threading.Event) -> None:
        interval = max(0.5, self.config.inference.lease_s / 3)
        while not stop.wait(interval):
            try:
                with self.db.write() as s:
                    if not jobs.heartbeat(s, job.id, job.token):
                        lost.set()
                        return
            except StorageError:
                log.warning("heartbeat for job %d failed; will try again", job.id)

    def _succeeded(self, job_id: int) -> bool:
        try:
            with self.db.read() as s:
                job = s.get(Job, job_id)
                return job is not None and job.status == JobStatus.SUCCEEDED
        except StorageError:  # cannot tell: report the failure as it came
            return False

    def _fail(self, job: jobs.Claimed, error: str, retryable: bool) -> str:
        try:
            with self.db.write() as s:
                status = jobs.fail(s, job.id, job.token, error, retryable=retryable)
                if status == jobs.F and job.study_id is not None:
                    study = s.get(Study, job.study_id)
                    if study is not None:
                        study.state = StudyState.FAILED
        except JobStateError as exc:
            return f"lost its lease ({exc})"
        self.metrics.jobs.labels("ANALYZE", status.value.lower()).inc()
        return f"{status.value.lower()}: {error}"

    def _inputs(self, job: jobs.Claimed) -> tuple[Study, list[Instance], Result | None]:
        with self.db.read() as s:
            study = s.get(Study, job.study_id)
            if study is None:
                raise JobStateError(f"study of job {job.id} no longer exists")
            q = (select(Instance).join(Series, Instance.series_id == Series.id)
                 .where(Instance.study_id == study.id,
                        Series.series_instance_uid.in_(job.payload.get("series", [])))
                 .order_by(Instance.id))
            instances = list(s.execute(q).scalars())
            previous = s.execute(select(Result).where(
                Result.study_id == study.id, Result.superseded_by.is_(None))
                .order_by(Result.id.desc())).scalars().first()
            if previous is not None:
                _ = previous.objects  # load while the session is open
        return study, instances, previous

    def _process(self, job: jobs.Claimed, lost: threading.Event, phases: Phases) -> str:
        """Analyse the job's series and publish the result; ``phases`` gets each step's time
        (model loading, reading the instances, the model, building and storing the results,
        the publishing transaction)."""
        with phases.timed("read"):
            study, instances, previous = self._inputs(job)
        if not instances:
            raise JobStateError("the selected series hold no instances (purged?)")
        ref = models.resolve(self.config, job.payload.get("model", models.DEMO))
        with phases.timed("load"):
            predictor = self._compute(self.predictor, ref)
        with phases.timed("read"):
            paths = [self.store.path(i.path) for i in instances]
            self.store.prefetch(paths)
            datasets = self._compute(_read_all, paths)
        with phases.timed("model"):
            prediction: Prediction = self._compute(predictor.predict, datasets)
        self.metrics.inference_seconds.labels(ref.name, ref.version).observe(prediction.seconds)
        with phases.timed("build"):
            built = self._compute(self._build, study.study_instance_uid, datasets, prediction,
                                  previous, predictor)
        for finding in prediction.findings:
            self.metrics.findings.labels(finding.label.key, str(finding.present).lower()).inc()
        with phases.timed("store"):
            written = [(b, self.store.write(encode(b.dataset), kind="results")) for b in built]
        crash_point("worker.after_model")
        if lost.is_set():
            for _, f in written:
                self.store.remove(f.path)
            raise JobStateError("lease lost during analysis; results discarded")
        try:
            with phases.timed("publish"):
                return self._publish(job, study, prediction, previous, written, instances)
        except BaseException as exc:
            if not catalog.keep_after_failure(self.db, exc, [f.path for _, f in written]):
                for _, f in written:
                    self.store.remove(f.path)
            raise

    def _build(self, study_uid: str, datasets: Sequence[Dataset], p: Prediction,
               previous: Result | None, predictor: Any) -> list[Built]:
        from inference.pixels import display_uint8
        from inference.sc import build_heatmap_sc
        from inference.sr import build_sr
        from inference.uids import result_uids

        r = self.config.results
        uids = result_uids(study_uid, [d.SOPInstanceUID for d in datasets],
                           p.model_name, p.model_version)
        predecessor = None
        if previous is not None:
            sr_obj = next((o for o in previous.objects if o.kind == "SR"), None)
            if sr_obj is not None:
                predecessor = dcmread(self.store.path(sr_obj.path), stop_before_pixels=True)
        out = [Built("SR", None, build_sr(
            p, datasets, uids=uids, series_number=r.sr_series_number,
            series_description=r.sr_series_description, software_version=SOFTWARE_VERSION,
            predecessor=predecessor, institution_name=r.institution_name))]
        findings: list[Finding] = list(p.positive())
        if not findings and self.config.inference.heatmap_when_negative == "top" and p.findings:
            findings = [max(p.findings, key=lambda f: f.probability)]
        by_uid = {d.SOPInstanceUID: d for d in datasets}
        windowing = getattr(getattr(predictor, "package", None), "windowing", None)
        for n, f in enumerate(findings, 1):
            src = by_uid[f.image.sop_instance_uid]
            frame = (f.image.frame_number or 1) - 1
            display = (display_uint8(src, frame, windowing) if windowing is not None
                       else display_uint8(src, frame))
            out.append(Built("SC", f.label.key, build_heatmap_sc(
                f, src, display, series_uid=uids.sc_series,
                instance_uid=uids.sc_instance(f.label.key), series_number=r.sc_series_number,
                instance_number=n, series_description=r.sc_series_description,
                synthetic_demo=p.synthetic_demo)))
        return out

    def _publish(self, job: jobs.Claimed, study: Study, p: Prediction, previous: Result | None,
                 written: list[tuple[Built, Any]], instances: list[Instance]) -> str:
        """Record the result keyed by the instances actually analysed (the study may have grown
        since the job was queued), supersede the previous one, succeed, queue deliveries."""
        rule = next((r for r in self.config.rules if r.name == job.payload.get("rule")), None)
        shadow = rule is not None and rule.mode == "shadow"
        destinations = [] if shadow or rule is None else list(rule.destinations)
        with self.db.write() as s:
            # The lease first: a stale worker is refused before its rows collide with the
            # result of the worker that reclaimed the job.
            jobs.succeed(s, job.id, job.token,
                         f"{len(written)} objects, {len(p.positive())} positive")
            result = Result(study_id=study.id, job_id=job.id, rule=job.payload.get("rule"),
                            model_name=p.model_name, model_version=p.model_version,
                            input_hash=input_hash([i.sop_instance_uid for i in instances]),
                            summary=p.summary(),
                            shadow=shadow, created_at=clock.now())
            s.add(result)
            s.flush()
            for b, f in written:
                s.add(ResultObject(result_id=result.id, kind=b.kind,
                                   sop_class_uid=str(b.dataset.SOPClassUID),
                                   sop_instance_uid=str(b.dataset.SOPInstanceUID),
                                   path=f.path, label=b.label))
            if previous is not None:
                old = s.get(Result, previous.id)
                if old is not None:
                    old.superseded_by = result.id
            for name in destinations:
                dest = self.config.destination(name)
                jobs.enqueue(s, JobKind.DELIVER, study_id=study.id, destination=name,
                             payload={"result_id": result.id}, max_attempts=dest.max_attempts)
            st = s.get(Study, study.id)
            if st is not None and st.state == StudyState.QUEUED:
                st.state = StudyState.ANALYSED
        self.metrics.jobs.labels("ANALYZE", "succeeded").inc()
        return (f"succeeded: {len(p.positive())}/{len(p.findings)} findings positive, "
                f"{len(written)} objects, {len(destinations)} deliveries queued")
