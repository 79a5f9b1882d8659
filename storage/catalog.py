"""The catalogue of received instances: studies, series and instances rows.

``record_instance`` and ``record_instances`` run inside the caller's write transaction, after
the files are durable. A study that receives a new instance goes back to RECEIVING (it grew), so
the assembler looks at it again. ``GroupRecorder`` records the instances of C-STORE handlers that
wait for the database at the same time in one transaction (a group commit).

Several receivers may share one PostgreSQL database: a study or series row is created with
``INSERT ... ON CONFLICT DO NOTHING``, and its counters are bumped with ``UPDATE ... SET n = n + 1
RETURNING id``, which takes the row lock and reads the id in one statement; so two associations
adding to the same study serialise on that row instead of losing an update or failing on the
unique key. (On SQLite the writer's BEGIN IMMEDIATE already serialises them.) A group bumps
each of its studies, then each of its series, once and in UID order, so two receivers' groups
take those row locks in the same order. Core statements, not ORM objects, built once: this runs
for every received instance.
"""

from __future__ import annotations

import enum
import logging
import threading
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from typing import TYPE_CHECKING, Any, cast

from sqlalchemy import Connection, Table, bindparam, insert, select, update
from sqlalchemy.dialects import postgresql, sqlite
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from storage import catalog_sqlite, clock
from storage.errors import DatabaseUnavailableError
from storage.files import StoredFile
from storage.models import Instance, Series, Study, StudyState

if TYPE_CHECKING:
    from storage.db import Database

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class InstanceMeta:
    """The header attributes aidnode keeps for routing; no names or patient IDs."""

    study_uid: str
    series_uid: str
    sop_instance_uid: str
    sop_class_uid: str
    transfer_syntax_uid: str
    sha256: str  # of the dataset bytes, file meta excluded: equal data, equal hash
    modality: str | None = None
    body_part: str | None = None
    study_description: str | None = None
    series_description: str | None = None
    image_type: str | None = None
    calling_ae: str | None = None
    called_ae: str | None = None
    calling_host: str | None = None
    association_id: str | None = None


class Recorded(enum.Enum):
    NEW = "new"
    DUPLICATE_SAME = "duplicate-same"  # same UID, same bytes: the stored copy is kept
    DUPLICATE_DIFFERENT = "duplicate-different"  # same UID, other bytes: policy decides
    REPLACED = "replaced"  # duplicate_policy = "replace": the new file took its place


def find_instance(s: Session, sop_instance_uid: str) -> Instance | None:
    return s.execute(select(Instance).where(Instance.sop_instance_uid == sop_instance_uid)
                     ).scalar_one_or_none()


# The statements are built once, with bind parameters, and run on the session's connection:
# building them per call and going through the ORM cost more CPU than the SQL did.
_studies, _series, _instances = (cast(Table, m.__table__) for m in (Study, Series, Instance))

_FIND = (select(_instances.c.id, _instances.c.sha256, _instances.c.path, _instances.c.study_id)
         .where(_instances.c.sop_instance_uid == bindparam("b_sop")))
_FIND_ANY = (select(_instances.c.sop_instance_uid)
             .where(_instances.c.sop_instance_uid.in_(bindparam("b_sops", expanding=True))))
_BUMP_STUDY = (
    update(_studies).where(_studies.c.study_instance_uid == bindparam("b_study"))
    .values(instance_count=_studies.c.instance_count + bindparam("b_n"),
            last_received_at=bindparam("b_now"),
            state=StudyState.RECEIVING, calling_ae=bindparam("b_calling_ae"),
            called_ae=bindparam("b_called_ae"), calling_host=bindparam("b_calling_host"))
    .returning(_studies.c.id))
_BUMP_SERIES = (
    update(_series).where(_series.c.series_instance_uid == bindparam("b_series"))
    .values(instance_count=_series.c.instance_count + bindparam("b_n"))
    .returning(_series.c.id))
_INSERT_INSTANCE = insert(_instances)
_REPLACE_INSTANCE = update(_instances).where(_instances.c.id == bindparam("b_id"))
_REGROW_STUDY = (update(_studies).where(_studies.c.id == bindparam("b_id"))
                 .values(state=StudyState.RECEIVING, last_received_at=bindparam("b_now")))
#: INSERT unless a row with the same unique key exists (it may be another receiver's).
_INSERT_IGNORE = {
    (name, table.name): dialect.insert(table).on_conflict_do_nothing(index_elements=[key])
    for name, dialect in (("postgresql", postgresql), ("sqlite", sqlite))
    for table, key in ((_studies, "study_instance_uid"), (_series, "series_instance_uid"))}


def _insert_ignore(conn: Connection, table: Table, values: dict[str, Any]) -> None:
    conn.execute(_INSERT_IGNORE[conn.dialect.name, table.name], values)


def _bump_study(conn: Connection, m: InstanceMeta, now: datetime, n: int) -> int | None:
    """Count ``n`` more instances in the study (back to RECEIVING: it grew); its id, or None
    when it does not exist yet. The UPDATE locks the row until the commit."""
    return conn.execute(_BUMP_STUDY, {
        "b_study": m.study_uid, "b_n": n, "b_now": now, "b_calling_ae": m.calling_ae,
        "b_called_ae": m.called_ae, "b_calling_host": m.calling_host}).scalar_one_or_none()


def _study_id(conn: Connection, ms: Sequence[InstanceMeta], now: datetime) -> int:
    """Count the instances ``ms`` (all new, of one study) in their study, made from the first
    if it does not exist; the last names the association's AEs and host."""
    study_id = _bump_study(conn, ms[-1], now, len(ms))
    if study_id is None:
        first = ms[0]
        _insert_ignore(conn, _studies, {
            "study_instance_uid": first.study_uid, "study_description": first.study_description,
            "state": StudyState.RECEIVING, "instance_count": 0, "first_received_at": now,
            "last_received_at": now})
        study_id = _bump_study(conn, ms[-1], now, len(ms))
    assert study_id is not None
    return study_id


def _series_id(conn: Connection, study_id: int, ms: Sequence[InstanceMeta]) -> int:
    bump = {"b_series": ms[0].series_uid, "b_n": len(ms)}
    series_id = conn.execute(_BUMP_SERIES, bump).scalar_one_or_none()
    if series_id is None:
        m = ms[0]
        _insert_ignore(conn, _series, {
            "study_id": study_id, "series_instance_uid": m.series_uid, "modality": m.modality,
            "body_part": m.body_part, "series_description": m.series_description,
            "sop_class_uid": m.sop_class_uid, "image_type": m.image_type, "instance_count": 0})
        series_id = conn.execute(_BUMP_SERIES, bump).scalar_one_or_none()
    assert series_id is not None
    return series_id


def _insert_new(conn: Connection, items: Sequence[tuple[InstanceMeta, StoredFile]],
                now: datetime) -> None:
    """The rows of instances new to the catalogue, each UID once: every study bumped once,
    then every series, in UID order, then the instances in one executemany."""
    studies: dict[str, list[InstanceMeta]] = {}
    series: dict[str, list[InstanceMeta]] = {}
    for m, _ in items:
        studies.setdefault(m.study_uid, []).append(m)
        series.setdefault(m.series_uid, []).append(m)
    study_ids = {uid: _study_id(conn, studies[uid], now) for uid in sorted(studies)}
    series_ids = {uid: _series_id(conn, study_ids[series[uid][0].study_uid], series[uid])
                  for uid in sorted(series)}
    conn.execute(_INSERT_INSTANCE, [{
        "study_id": study_ids[m.study_uid], "series_id": series_ids[m.series_uid],
        "sop_instance_uid": m.sop_instance_uid, "sop_class_uid": m.sop_class_uid,
        "transfer_syntax_uid": m.transfer_syntax_uid, "path": stored.path,
        "size": stored.size, "sha256": m.sha256, "received_at": now,
        "association_id": m.association_id} for m, stored in items])


def _record_known(conn: Connection, m: InstanceMeta, stored: StoredFile, replace: bool,
                  now: datetime) -> tuple[Recorded, str | None]:
    """An instance whose UID has a row already: a duplicate, or its replacement."""
    existing = conn.execute(_FIND, {"b_sop": m.sop_instance_uid}).one()
    if existing.sha256 == m.sha256:
        return Recorded.DUPLICATE_SAME, stored.path
    if not replace:
        return Recorded.DUPLICATE_DIFFERENT, stored.path
    conn.execute(_REPLACE_INSTANCE, {
        "b_id": existing.id, "path": stored.path, "size": stored.size, "sha256": m.sha256,
        "transfer_syntax_uid": m.transfer_syntax_uid, "received_at": now})
    conn.execute(_REGROW_STUDY, {"b_id": existing.study_id, "b_now": now})
    return Recorded.REPLACED, existing.path


def record_instances(s: Session | Connection, items: Sequence[tuple[InstanceMeta, StoredFile]],
                     replace: bool = False) -> list[tuple[Recorded, str | None]]:
    """Insert the rows for durable files, in one transaction (the caller's).

    Returns, for each item in order, what happened and, when a file is no longer referenced (a
    duplicate that was not kept, or the file a replacement displaced), its relative path for
    the caller to remove after the commit. The outcome is the one recording the items one
    after the other would give: of two items with one UID, the first is recorded and the
    second is its duplicate.
    """
    conn = s.connection() if isinstance(s, Session) else s
    now = clock.now()
    known = set(conn.execute(_FIND_ANY, {"b_sops": sorted(
        {m.sop_instance_uid for m, _ in items})}).scalars())
    new: list[int] = []  # the first item of each UID without a row
    later: list[int] = []  # the rest, recorded once the new rows exist
    for i, (m, _) in enumerate(items):
        if m.sop_instance_uid in known:
            later.append(i)
        else:
            known.add(m.sop_instance_uid)
            new.append(i)
    outcomes: list[tuple[Recorded, str | None]] = [(Recorded.NEW, None)] * len(items)
    if new:
        _insert_new(conn, [items[i] for i in new], now)
    for i in later:
        outcomes[i] = _record_known(conn, *items[i], replace, now)
    return outcomes


def record_group(db: Database, items: Sequence[tuple[InstanceMeta, StoredFile]],
                 replace: bool = False) -> list[tuple[Recorded, str | None]]:
    """``record_instances`` in a write transaction of its own, committed before it returns.

    On SQLite the common case (new instances of known series) is written in plain sqlite3
    (``storage.catalog_sqlite``); anything else, and every other database, goes through
    ``record_instances``.
    """
    if db.is_sqlite:
        try:
            with db.sqlite_write() as conn:
                catalog_sqlite.record_new(conn, items, clock.now())
        except catalog_sqlite.NotCommon:
            pass  # rolled back: the general way below
        else:
            return [(Recorded.NEW, None)] * len(items)
    with db.write_connection() as conn:
        return record_instances(conn, items, replace)


def record_instance(s: Session | Connection, m: InstanceMeta, stored: StoredFile,
                    replace: bool = False) -> tuple[Recorded, str | None]:
    """``record_instances`` for one file."""
    return record_instances(s, [(m, stored)], replace)[0]


@dataclass(eq=False)
class _Pending:
    """One handler's instance, waiting in a ``GroupRecorder``."""

    meta: InstanceMeta
    stored: StoredFile
    woken: threading.Event = field(default_factory=threading.Event)
    lead: bool = False  # woken to record the queue, not with an outcome
    outcome: tuple[Recorded, str | None] | None = None
    error: BaseException | None = None

    def result(self) -> tuple[Recorded, str | None]:
        if self.error is not None:
            raise self.error
        assert self.outcome is not None
        return self.outcome


class GroupRecorder:
    """Records the instances of concurrent C-STORE handlers, several per write transaction.

    A handler whose instance finds no other handler recording takes the write turn and records
    its instance, and every instance queued by then, in one transaction: one BEGIN, one COMMIT
    (one WAL fsync on SQLite) for the group, and a few statements for it rather than a few per
    instance. Handlers that queue meanwhile wait; when the group is committed, the first of
    them records the next group. One association alone is recorded one instance at a time,
    as before. Each handler gets its own instance's outcome, after its commit:

    - the database unavailable (locked past the busy timeout, unreachable, a failed COMMIT
      that may have taken effect): every handler of the group gets that error;
    - any other failure (a unique key taken by another receiver's commit meanwhile, one row
      the database refuses): each instance is recorded again in a transaction of its own, so
      only the instance at fault fails; a unique key taken meanwhile is retried once, as the
      duplicate it now is.
    """

    def __init__(self, db: Database, replace: bool = False,
                 on_commit: Callable[[int], None] | None = None) -> None:
        self.db = db
        self.replace = replace
        self.on_commit = on_commit  # called with the number of instances in each transaction
        self._lock = threading.Lock()
        self._queue: list[_Pending] = []
        self._leading = False  # a handler is recording a group

    def record(self, meta: InstanceMeta, stored: StoredFile) -> tuple[Recorded, str | None]:
        """Record one durable file; returns as ``record_instance`` once its row is committed."""
        me = _Pending(meta, stored)
        with self._lock:
            self._queue.append(me)
            me.lead = not self._leading
            self._leading = True
        if not me.lead:
            me.woken.wait()
            if not me.lead:
                return me.result()
        with self._lock:
            group, self._queue = self._queue, []
        try:
            self._record(group)
        finally:
            for p in group:
                if p.outcome is None and p.error is None:  # a BaseException stopped the group
                    p.error = DatabaseUnavailableError(  # perhaps after its COMMIT
                        "the recording was interrupted", maybe_committed=True)
                if p is not me:
                    p.woken.set()
            with self._lock:
                if self._queue:
                    self._queue[0].lead = True
                    self._queue[0].woken.set()
                else:
                    self._leading = False
        return me.result()

    def _record(self, group: list[_Pending]) -> None:
        if len(group) == 1:
            self._alone(group[0])
            return
        group = sorted(group, key=lambda p: (p.meta.study_uid, p.meta.series_uid,
                                             p.meta.sop_instance_uid))
        try:
            outcomes = self._transaction(group)
        except DatabaseUnavailableError as exc:
            for p in group:
                p.error = exc
            return
        except Exception as exc:  # noqa: BLE001 - one instance at a time tells whose it is
            log.warning("recording %d instances together failed (%s); recording them one "
                        "by one", len(group), exc)
            for p in group:
                self._alone(p)
            return
        for p, outcome in zip(group, outcomes, strict=True):
            p.outcome = outcome
        self._committed(len(group))

    def _alone(self, p: _Pending) -> None:
        try:
            try:
                (p.outcome,) = self._transaction([p])
            except IntegrityError:  # another receiver committed this UID first: a duplicate now
                (p.outcome,) = self._transaction([p])
        except Exception as exc:  # noqa: BLE001 - the handler answers for it
            p.error = exc
            return
        self._committed(1)

    def _transaction(self, group: list[_Pending]) -> list[tuple[Recorded, str | None]]:
        return record_group(self.db, [(p.meta, p.stored) for p in group], self.replace)

    def _committed(self, n: int) -> None:
        if self.on_commit is not None:
            try:
                self.on_commit(n)
            except Exception:  # the rows are committed: a failing callback must not say otherwise
                log.exception("the group-commit callback failed")


def is_recorded(s: Session, path: str) -> bool:
    """Whether a row (an instance or a result object) names the file at ``path``."""
    from storage.models import ResultObject

    return any(s.execute(select(column).where(column == path).limit(1)).first() is not None
               for column in (Instance.path, ResultObject.path))


def keep_after_failure(db: Database, exc: BaseException, paths: Iterable[str]) -> bool:
    """After ``exc`` ended the transaction that was to record ``paths``: whether the new files
    must stay instead of being removed.

    A COMMIT can fail after the server has committed (a PostgreSQL connection lost while the
    server answered; ``DatabaseUnavailableError.maybe_committed``). Rows then name the files,
    and removing them loses what they hold: an instance whose re-send is taken for a duplicate
    of its row, results that can never be delivered. When the database cannot say, the files
    stay too; a file that no row names is removed at the next start.
    """
    if not getattr(exc, "maybe_committed", False):
        return False
    paths = list(paths)
    try:
        with db.read() as s:
            recorded = any(is_recorded(s, p) for p in paths)
    except Exception:  # noqa: BLE001 - cannot tell: keep the files
        log.warning("the COMMIT for %s failed and the database cannot say whether it took "
                    "effect; the files are kept", ", ".join(paths))
        return True
    if recorded:
        log.warning("the COMMIT for %s failed after it took effect; the files are kept",
                    ", ".join(paths))
    return recorded


def known_paths(s: Session) -> set[str]:
    """Every file path the database references (instances and result objects)."""
    from storage.models import ResultObject

    paths = set(s.execute(select(Instance.path)).scalars())
    paths.update(s.execute(select(ResultObject.path)).scalars())
    return paths
