"""Fuzz the C-STORE handler, ``node.scp.handle_store``, through pynetdicom's own ``Event``.

Hypothesis makes the data set bytes a peer sends: random bytes under any transfer syntax,
data sets built element by element (hostile UIDs, wrong VRs, odd lengths, nested sequences;
``tests/fuzz/dicombytes.py``) and byte-level mutations of valid instances. For each, the
handler must answer one of the statuses DESIGN §5 declares, never 0x0110 (an exception no
rule in ``node.status`` maps: a bug), store exactly what was received when it answers Success,
and leave the store and the database agreeing: one file per row, no partial file.

Warnings are ignored inside the handler as in production (pytest turns them into errors, and
pydicom warns about every invalid value it reads). The store is emptied after each example,
so examples do not depend on each other and hypothesis can shrink a failure. Run longer by
hand: ``AIDNODE_FUZZ_EXAMPLES=20000 python3 -m pytest tests/fuzz -x``.
"""

from __future__ import annotations

import logging
import re
import shutil
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from io import BytesIO
from pathlib import Path
from types import SimpleNamespace

import pytest
from hypothesis import event, example, given
from hypothesis import strategies as st
from pydicom.uid import UID, ExplicitVRLittleEndian, ImplicitVRLittleEndian
from pynetdicom import evt
from pynetdicom.dimse_primitives import C_STORE
from pynetdicom.events import Event
from pynetdicom.presentation import PresentationContextTuple
from sqlalchemy import delete, select

from node.config import Config, NodeConfig
from node.metrics import Metrics
from node.scp import Receiver, handle_store
from node.status import Status
from storage.db import Database
from storage.files import FileStore
from storage.models import Instance, Series, Study
from tests.fuzz.dicombytes import (
    ANY_SYNTAX,
    FUZZ,
    LE_SYNTAXES,
    REPORT_WARNING,
    SERIES,
    SOP_CLASS,
    SOP_INSTANCE,
    STUDY,
    VALID,
    Element,
    dataset_bytes,
    elements,
    encode,
    mutated,
    valid_uids,
)

pytestmark = pytest.mark.filterwarnings(REPORT_WARNING)

DECLARED = {Status.SUCCESS, Status.WARNING_ELEMENTS_DISCARDED, Status.ERROR_DATASET_MISMATCH,
            Status.ERROR_CANNOT_UNDERSTAND, Status.REFUSED_OUT_OF_RESOURCES}
CT_IMAGE = "1.2.840.10008.5.1.4.1.1.2"
UID_SYNTAX = re.compile(r"(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*")  # PS3.5 9.1
PEER = SimpleNamespace(requestor=SimpleNamespace(ae_title="FUZZER", address="127.0.0.1"))


class _Errors(logging.Handler):
    """Keeps what the handler logs at ERROR: an unexpected exception's traceback."""

    def __init__(self) -> None:
        super().__init__(logging.ERROR)
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@dataclass
class Harness:
    rx: Receiver
    errors: _Errors = field(default_factory=_Errors)

    def c_store(self, raw: bytes, sop_class: str, sop_uid: str, syntax: UID) -> int:
        """One C-STORE-RQ carrying ``raw``, answered by the handler."""
        req = C_STORE()
        req.MessageID = 1
        req.AffectedSOPClassUID = sop_class
        req.AffectedSOPInstanceUID = sop_uid
        req.Priority = 2
        req.DataSet = BytesIO(raw)
        event = Event(PEER, evt.EVT_C_STORE,  # type: ignore[arg-type]
                      {"request": req,
                       "context": PresentationContextTuple(1, sop_class, UID(syntax))})
        self.errors.lines.clear()
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            status = handle_store(event, self.rx)
        assert isinstance(status, int)
        return status

    def rows(self) -> dict[str, str]:
        with self.rx.db.read() as s:
            return {u: p for u, p in s.execute(select(Instance.sop_instance_uid, Instance.path))}

    def check(self, status: int, raw: bytes, sop_uid: str) -> None:
        """The status is declared; the store and the database agree; Success stored ``raw``."""
        assert status in DECLARED, f"0x{status:04X}\n" + "\n".join(self.errors.lines)
        rows = self.rows()
        assert sorted(self.rx.store.files("instances")) == sorted(rows.values())
        assert list(self.rx.store.tmp.iterdir()) == []
        if status == Status.SUCCESS:
            assert list(rows) == [sop_uid]
            assert self.rx.store.read(rows[sop_uid]).endswith(raw)
        elif status != Status.WARNING_ELEMENTS_DISCARDED:
            assert rows == {}

    def store_and_check(self, raw: bytes, sop_class: str, sop_uid: str, syntax: UID,
                        twice: bool = False) -> int:
        try:
            status = self.c_store(raw, sop_class, sop_uid, syntax)
            self.check(status, raw, sop_uid)
            if twice:  # the same bytes again: the same answer, still one copy
                again = self.c_store(raw, sop_class, sop_uid, syntax)
                assert again == status, f"0x{again:04X} after 0x{status:04X}"
                self.check(again, raw, sop_uid)
            return status
        finally:
            self.reset()

    def reset(self) -> None:
        with self.rx.db.write() as s:
            for model in (Instance, Series, Study):
                s.execute(delete(model))
        shutil.rmtree(self.rx.store.root / "instances")
        (self.rx.store.root / "instances").mkdir()


@pytest.fixture(scope="module")
def harness(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Harness]:
    root: Path = tmp_path_factory.mktemp("fuzz-store")
    db = Database(f"sqlite:///{root / 'aidnode.db'}")
    db.upgrade()
    cfg = Config(node=NodeConfig(max_dataset_bytes=4096, max_pixel_bytes=1 << 16))
    h = Harness(Receiver(cfg, db, FileStore(root / "store"), Metrics()))
    logging.getLogger("node.scp").addHandler(h.errors)
    yield h
    logging.getLogger("node.scp").removeHandler(h.errors)
    db.dispose()


def command_uid(elements: list[Element], tag: int, fallback: str) -> str:
    """The data set's own UID for ``tag`` when it is a valid one, else ``fallback``."""
    for e in elements:
        if e.tag == tag and isinstance(e.value, bytes):
            text = e.value.decode("latin-1").rstrip("\0 ")
            if len(text) <= 64 and UID_SYNTAX.fullmatch(text):
                return text
    return fallback


@pytest.mark.parametrize("ds", VALID, ids=["CT", "CR"])
@pytest.mark.parametrize("syntax", LE_SYNTAXES, ids=["implicit", "explicit"])
def test_the_valid_instances_are_stored(harness: Harness, ds: object, syntax: UID) -> None:
    """The fuzzers' starting points are stored: the harness can answer Success."""
    raw = dataset_bytes(ds, syntax)  # type: ignore[arg-type]
    assert harness.store_and_check(raw, ds.SOPClassUID, ds.SOPInstanceUID,  # type: ignore[attr-defined]
                                   syntax, twice=True) == Status.SUCCESS


@FUZZ
@given(raw=st.binary(max_size=5000), syntax=st.sampled_from(ANY_SYNTAX),
       sop_uid=valid_uids)
@example(raw=b"\x08\x00\x16\x00UI\xff\xff" + bytes(range(7, 200)),
         syntax=ExplicitVRLittleEndian, sop_uid="1.2.3")
def test_random_bytes(harness: Harness, raw: bytes, syntax: UID, sop_uid: str) -> None:
    event(f"0x{harness.store_and_check(raw, CT_IMAGE, sop_uid, syntax):04X}")


@FUZZ
@given(els=elements(), implicit=st.booleans(), same_uids=st.booleans(),
       fallback=valid_uids, twice=st.booleans())
def test_data_sets_built_element_by_element(harness: Harness, els: list[Element],
                                            implicit: bool, same_uids: bool, fallback: str,
                                            twice: bool) -> None:
    sop_class = command_uid(els, SOP_CLASS, CT_IMAGE) if same_uids else CT_IMAGE
    sop_uid = command_uid(els, SOP_INSTANCE, fallback) if same_uids else fallback
    syntax = ImplicitVRLittleEndian if implicit else ExplicitVRLittleEndian
    raw = encode(els, implicit=implicit)
    event(f"0x{harness.store_and_check(raw, sop_class, sop_uid, syntax, twice):04X}")


@FUZZ
@given(data=st.data(), index=st.sampled_from(range(len(VALID))),
       syntax=st.sampled_from(LE_SYNTAXES), twice=st.booleans())
def test_mutated_valid_instances(harness: Harness, data: st.DataObject, index: int,
                                 syntax: UID, twice: bool) -> None:
    ds = VALID[index]
    raw = data.draw(mutated(dataset_bytes(ds, syntax)), label="mutated")
    event(f"0x{harness.store_and_check(raw, ds.SOPClassUID, ds.SOPInstanceUID, syntax, twice):04X}")


@pytest.mark.parametrize("broken", [
    Element(0x00080060, "UL", b"\x00"),  # Modality as UL with one byte: BytesLengthException
    Element(0x00080008, "BS", b"ORIGINAL"),  # ImageType with a VR that does not exist
], ids=["modality-UL-1-byte", "image-type-VR-BS"])
def test_an_undecodable_routing_attribute_is_0xC210(harness: Harness, broken: Element) -> None:
    """Found by fuzzing: the UIDs are fine but an attribute read for routing cannot be decoded.
    The handler answered 0x0110 (an unexpected error) instead of 0xC210."""
    els = [Element(SOP_CLASS, "UI", b"1.2.840.10008.5.1.4.1.1.2\0"),
           Element(SOP_INSTANCE, "UI", b"1.2.3.4\0"), Element(STUDY, "UI", b"1.2.3\0"),
           Element(SERIES, "UI", b"1.2.3.5\0"), broken]
    raw = encode(sorted(els, key=lambda e: e.tag), implicit=False)
    status = harness.store_and_check(raw, CT_IMAGE, "1.2.3.4", ExplicitVRLittleEndian)
    assert status == Status.ERROR_CANNOT_UNDERSTAND
