"""The DICOM receiver: Verification and Storage SCP (PS3.4 Annex A and B).

The C-STORE handler writes the data set durably (``storage.files``) while a checker thread checks
and hashes it, records it once both are done (``storage.catalog.GroupRecorder``: in one
transaction, shared with the instances of other associations waiting for the database at the
same time) and only then answers Success; every failure answers the status from ``node.status`` and leaves no file
and no row behind.
"""

from __future__ import annotations

import hashlib
import logging
import socket
import threading
import time
import uuid
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Any, TypeVar

from pydicom.dataset import Dataset
from pydicom.uid import DeflatedExplicitVRLittleEndian
from pynetdicom import AE, ALL_TRANSFER_SYNTAXES, AllStoragePresentationContexts, _config, evt
from pynetdicom.sop_class import Verification  # type: ignore[attr-defined]

from node import filemeta, pacing, priority, responses
from node.config import Config, PeerConfig
from node.errors import DatasetTooLargeError, InvalidDatasetError
from node.guards import check_complete, check_dataset, check_inflated_size
from node.listeners import ReceiverServer, serve
from node.logging import clean
from node.metrics import Metrics
from node.status import (
    REJECT_CALLED_AE,
    REJECT_CALLING_AE,
    Status,
    status_for,
)
from storage import audit, catalog
from storage.db import Database
from storage.faults import crash_point
from storage.files import FileStore, StoredFile

log = logging.getLogger(__name__)

T = TypeVar("T")

def configure_pynetdicom() -> None:
    """The one place pynetdicom's module switches are set: no identifiers in its logs."""
    _config.LOG_REQUEST_IDENTIFIERS = False
    _config.LOG_RESPONSE_IDENTIFIERS = False
    _config.LOG_HANDLER_LEVEL = "none"
    logging.getLogger("pynetdicom").setLevel(logging.WARNING)


def set_nodelay(sock: socket.socket | None) -> None:
    """TCP_NODELAY: without it Nagle + delayed ACK stalls DICOM at ~20 images/s."""
    if sock is not None:
        try:
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        except OSError:
            pass  # the peer already closed; nothing to tune


def peer_allowed(peers: list[PeerConfig], calling_ae: str, host: str) -> bool:
    """True when some peer entry allows this calling AE title from this host."""
    for p in peers:
        if p.ae_title in ("*", calling_ae) and (p.host is None or p.host == host):
            return True
    return False


@dataclass
class _AssocStats:
    id: str
    calling_ae: str
    host: str
    started: float
    stored: int = 0
    failed: int = 0


@dataclass
class Receiver:
    """Everything the SCP handlers need, passed to them as a bound argument."""

    config: Config
    db: Database
    store: FileStore
    metrics: Metrics
    _stats: dict[int, _AssocStats] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)
    #: Marked at each C-STORE for this host's worker processes (``scheduling = "adaptive"``).
    beacon: priority.ReceivingBeacon | None = None
    #: Checks and hashes each received data set while its handler writes the file: the
    #: checks run while the handler's fsyncs wait on the disk, off the CPU and without the
    #: interpreter's lock. At most one thread per association (an association has one C-STORE
    #: in flight), each made when first needed.
    checker: ThreadPoolExecutor = field(init=False)
    #: Records the rows; the handlers waiting for the database at the same time share one
    #: transaction (``catalog.GroupRecorder``).
    recorder: catalog.GroupRecorder = field(init=False)

    def __post_init__(self) -> None:
        self.recorder = catalog.GroupRecorder(
            self.db, replace=self.config.storage.duplicate_policy == "replace",
            on_commit=self.metrics.store_group_instances.observe)
        self.checker = ThreadPoolExecutor(max_workers=self.config.node.max_associations,
                                          thread_name_prefix="store-check")
        if self.beacon is None and self.config.inference.scheduling == "adaptive":
            try:
                self.beacon = priority.ReceivingBeacon(priority.beacon_path(self.store.root))
            except OSError as exc:
                log.warning("no receiving beacon (%s): a worker process on this host keeps "
                            "its model at its niceness while this receiver receives", exc)

    def close(self) -> None:
        """Once no association is served any more: end the checker threads, release the
        beacon's file."""
        self.checker.shutdown(wait=True)
        if self.beacon is not None:
            self.beacon.close()

    def beside(self, fn: Callable[..., T], *args: Any) -> Future[T]:
        """``fn(*args)`` in a checker thread; here and now once ``close()`` ended them (an
        association that outlived the stop's grace period goes on storing)."""
        try:
            return self.checker.submit(fn, *args)
        except RuntimeError:  # cannot schedule new futures after shutdown
            done: Future[T] = Future()
            try:
                done.set_result(fn(*args))
            except Exception as exc:  # noqa: BLE001 - handed over as the pool would
                done.set_exception(exc)
            return done

    # -- association events --------------------------------------------------------------

    def stats(self, assoc: Any) -> _AssocStats:
        with self._lock:
            st = self._stats.get(id(assoc))
            if st is None:
                st = _AssocStats(id=str(uuid.uuid4()), calling_ae=assoc.requestor.ae_title,
                                 host=assoc.requestor.address, started=time.monotonic())
                self._stats[id(assoc)] = st
            return st

    def finish(self, assoc: Any, outcome: str) -> None:
        with self._lock:
            st = self._stats.pop(id(assoc), None)
        if st is None:
            return
        secs = time.monotonic() - st.started
        log.info("association %s from %s@%s %s: %d stored, %d failed in %.2fs", st.id,
                 clean(st.calling_ae), st.host, outcome, st.stored, st.failed, secs)
        try:
            with self.db.write() as s:
                audit.record(s, audit.AuditKind.INSTANCES_RECEIVED, ae_title=st.calling_ae,
                             host=st.host, association=st.id, outcome=outcome, stored=st.stored,
                             failed=st.failed, seconds=round(secs, 3))
        except Exception:
            log.exception("could not record the audit event for association %s", st.id)


def on_conn_open(event: evt.Event) -> None:
    set_nodelay(getattr(event.assoc.dul.socket, "socket", None))
    responses.attach(event.assoc)


def on_requested(event: evt.Event, rx: Receiver) -> None:
    """A-ASSOCIATE-RQ received: apply the allow-list (AE title, optionally bound to a host)."""
    assoc = event.assoc
    rq = assoc.requestor.primitive
    assert rq is not None  # EVT_REQUESTED fires after the A-ASSOCIATE-RQ arrived
    calling, called = rq.calling_ae_title.strip(), rq.called_ae_title.strip()
    host = assoc.requestor.address
    reject = None
    if called != rx.config.node.ae_title:
        reject, why = REJECT_CALLED_AE, f"called AE {clean(called)!r} is not ours"
    elif not peer_allowed(rx.config.peers, calling, host):
        reject, why = REJECT_CALLING_AE, "calling AE not allowed from this host"
    if reject is None:
        if rx.beacon is not None:  # instances may follow: the model yields before the first
            rx.beacon.mark()
        return
    log.warning("rejecting association from %s@%s: %s", clean(calling), host, why)
    rx.metrics.associations.labels("rejected").inc()
    assoc.acse.send_reject(*reject)
    # send_reject only queues the PDU; pynetdicom closes the socket as soon as this handler
    # returns. Wait, as pynetdicom's own rejections do, until the DUL has sent it and is idle,
    # or the peer sees a dropped connection instead of the A-ASSOCIATE-RJ.
    assoc.kill()
    try:
        with rx.db.write() as s:
            audit.record(s, audit.AuditKind.ASSOCIATION_REJECTED, ae_title=calling[:16],
                         host=host, reason=why)
    except Exception:
        log.exception("could not record the rejection audit event")


def on_established(event: evt.Event, rx: Receiver) -> None:
    st = rx.stats(event.assoc)
    rx.metrics.associations.labels("accepted").inc()
    log.debug("association %s established with %s@%s", st.id, clean(st.calling_ae), st.host)
    try:
        with rx.db.write() as s:
            audit.record(s, audit.AuditKind.ASSOCIATION_ACCEPTED, ae_title=st.calling_ae,
                         host=st.host, association=st.id)
    except Exception:
        log.exception("could not record the association audit event")


def on_released(event: evt.Event, rx: Receiver) -> None:
    rx.finish(event.assoc, "released")


def on_aborted(event: evt.Event, rx: Receiver) -> None:
    rx.finish(event.assoc, "aborted")


def handle_echo(event: evt.Event) -> int:
    return Status.SUCCESS


# -- C-STORE -------------------------------------------------------------------------------


def _text(ds: Dataset, keyword: str, limit: int = 64) -> str | None:
    try:
        value = ds.get(keyword)
    except Exception as exc:  # pydicom decodes lazily: a broken element fails here, 0xC210
        raise InvalidDatasetError(f"{keyword} cannot be decoded: {exc}") from exc
    if value is None or value == "":
        return None
    if not isinstance(value, str):
        value = "\\".join(str(v) for v in value) if hasattr(value, "__iter__") else str(value)
    return clean(value)[:limit]


def handle_store(event: evt.Event, rx: Receiver) -> int | tuple[int, Dataset]:
    """Store one instance durably, then answer (DESIGN §2 step 2, §5)."""
    if rx.beacon is not None:
        rx.beacon.mark()
    with pacing.storing(event.assoc):
        return _store(event, rx)


def _checked(event: evt.Event, rx: Receiver, st: _AssocStats, raw: bytes,
             limit: int) -> catalog.InstanceMeta:
    """In a checker thread: check the data set (its bytes, then its header) and describe it
    for its row."""
    syntax = event.context.transfer_syntax
    if syntax == DeflatedExplicitVRLittleEndian:
        # Before pynetdicom inflates it all at once; then the inflated bytes are checked
        # like any other data set (explicit VR little endian under the deflate).
        check_complete(check_inflated_size(raw, limit), False, True)
    else:
        check_complete(raw, syntax.is_implicit_VR, syntax.is_little_endian)
    try:
        ds = event.dataset
    except Exception as exc:
        raise InvalidDatasetError(f"dataset cannot be decoded: {exc}") from exc
    check_dataset(ds, event.request, rx.config.node.max_pixel_bytes,
                  str(event.context.abstract_syntax))
    return catalog.InstanceMeta(
        study_uid=ds.StudyInstanceUID, series_uid=ds.SeriesInstanceUID,
        sop_instance_uid=ds.SOPInstanceUID, sop_class_uid=ds.SOPClassUID,
        transfer_syntax_uid=str(event.context.transfer_syntax),
        sha256=hashlib.sha256(raw).hexdigest(), modality=_text(ds, "Modality", 16),
        body_part=_text(ds, "BodyPartExamined"),
        study_description=_text(ds, "StudyDescription"),
        series_description=_text(ds, "SeriesDescription"),
        image_type=_text(ds, "ImageType", 128), calling_ae=st.calling_ae,
        called_ae=rx.config.node.ae_title, calling_host=st.host, association_id=st.id)


def _write(rx: Receiver, event: evt.Event, raw: bytes) -> StoredFile:
    """The free-space check, then the file, fsynced, in place."""
    rx.store.check_space(len(raw))
    # What event.encoded_dataset(include_meta=True) puts before the data set (Event.file_meta:
    # the command's UIDs and the context's transfer syntax), without copying the data set
    # twice more to build it.
    request: Any = event.request  # a C_STORE primitive: this runs for EVT_C_STORE only
    header = filemeta.header(str(request.AffectedSOPClassUID),
                             str(request.AffectedSOPInstanceUID), event.context.transfer_syntax)
    return rx.store.write([header, raw])


def _store(event: evt.Event, rx: Receiver) -> int | tuple[int, Dataset]:
    started = time.perf_counter()
    st = rx.stats(event.assoc)
    stored_path: str | None = None
    try:
        raw = event.encoded_dataset(include_meta=False)
        limit = rx.config.node.max_dataset_bytes
        if len(raw) > limit:
            raise DatasetTooLargeError(f"dataset is larger than node.max_dataset_bytes ({limit})")
        checking = rx.beside(_checked, event, rx, st, raw, limit)
        try:
            stored = _write(rx, event, raw)
        except Exception:
            checking.result()  # a refused data set is answered for that, as if checked first
            raise
        stored_path = stored.path  # removed below if the checks refuse the data set
        meta = checking.result()
        outcome, unused = rx.recorder.record(meta, stored)
        stored_path = None  # committed: the file belongs to the database now
        crash_point("scp.after_commit")
        if unused:
            try:
                rx.store.remove(unused)
            except OSError:  # the instance is stored; an unreferenced file is swept at start
                log.warning("could not remove unreferenced file %s", unused)
    except Exception as exc:
        if stored_path is not None and not catalog.keep_after_failure(rx.db, exc,
                                                                      [stored_path]):
            try:
                rx.store.remove(stored_path)
            except OSError:  # no row names it: it is swept at the next start
                log.warning("could not remove the unrecorded file %s", stored_path)
        status = status_for(exc)
        st.failed += 1
        rx.metrics.instances_received.labels("failed").inc()
        level = logging.ERROR if status == Status.PROCESSING_FAILURE else logging.WARNING
        log.log(level, "C-STORE from %s refused with 0x%04X: %s", clean(st.calling_ae),
                status, clean(str(exc), 300), exc_info=status == Status.PROCESSING_FAILURE)
        return int(status)
    rx.metrics.store_seconds.observe(time.perf_counter() - started)
    st.stored += 1
    if outcome is catalog.Recorded.DUPLICATE_DIFFERENT:
        rx.metrics.instances_received.labels("duplicate-different").inc()
        log.warning("instance %s received again with different content; kept the first",
                    meta.sop_instance_uid)
        return int(Status.WARNING_ELEMENTS_DISCARDED)
    rx.metrics.instances_received.labels(outcome.value).inc()
    return int(Status.SUCCESS)


def build_ae(cfg: Config) -> AE:
    """An AE offering Verification and every storage SOP class with all transfer syntaxes."""
    configure_pynetdicom()
    if cfg.node.adaptive_polling:
        pacing.install()
    else:
        pacing.uninstall()
    ae = AE(ae_title=cfg.node.ae_title)
    ae.maximum_associations = cfg.node.max_associations
    ae.acse_timeout = cfg.node.acse_timeout_s
    ae.dimse_timeout = cfg.node.dimse_timeout_s
    ae.network_timeout = cfg.node.network_timeout_s
    ae.maximum_pdu_size = cfg.node.max_pdu
    ae.add_supported_context(Verification)
    for cx in AllStoragePresentationContexts:
        if cx.abstract_syntax is not None:
            ae.add_supported_context(cx.abstract_syntax, ALL_TRANSFER_SYNTAXES)
    return ae


def handlers(rx: Receiver) -> list[Any]:
    return [
        (evt.EVT_CONN_OPEN, on_conn_open),
        (evt.EVT_REQUESTED, on_requested, [rx]),
        (evt.EVT_ESTABLISHED, on_established, [rx]),
        (evt.EVT_RELEASED, on_released, [rx]),
        (evt.EVT_ABORTED, on_aborted, [rx]),
        (evt.EVT_C_ECHO, handle_echo),
        (evt.EVT_C_STORE, handle_store, [rx]),
    ]


def start(rx: Receiver, host: str | None = None, port: int | None = None) -> ReceiverServer:
    """Start the SCP without blocking, and its DICOM TLS port when ``node.tls`` is set.

    Returns the plain port's server; ``.shutdown()`` (or ``server_close()``) stops both ports.
    """
    ae = build_ae(rx.config)
    address = (host or rx.config.node.host, rx.config.node.port if port is None else port)
    server = serve(ae, address, handlers(rx), rx.config.node)
    log.info("listening on %s:%d as %s", *server.server_address[:2], rx.config.node.ae_title)
    return server


__all__ = ["Receiver", "build_ae", "handle_store", "start"]
