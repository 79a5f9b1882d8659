"""Control characters from peers (an AE title, a UID, patient and series text) never reach the
log raw: the service's own handler (``node.logging.setup``) writes them as ``?``, so a peer can
neither forge a log line (CR/LF) nor drive a terminal (ESC). Nor do they reach the database's
descriptions, which the CLI prints.
"""

from __future__ import annotations

import io
import re
from collections.abc import Callable

import pytest
from sqlalchemy import select

from node.status import Status
from storage.models import Series, Study
from tests.conftest import RunningNode
from tests.dicomgen import ct_series
from tests.hostile.rawpdu import (
    ABORT,
    ASSOCIATE_AC,
    P_DATA_TF,
    RawPeer,
    command_status,
    encode_dataset,
)
from tests.hostile.test_datasets import command_with_uid, with_uid
from tests.integration.test_receiver import assert_still_serving, send

pytestmark = [
    pytest.mark.integration,
    pytest.mark.filterwarnings("ignore:Invalid value for VR UI:UserWarning"),  # as in production
]

NodeFactory = Callable[..., RunningNode]
PeerFactory = Callable[[RunningNode], RawPeer]
MARK = "INJECTED"


def assert_no_raw_control_characters(text: str) -> None:
    assert "\r" not in text and "\x1b" not in text and "\x00" not in text
    assert not re.search(rf"^{MARK}", text, re.MULTILINE), "a peer started a log line"


def test_control_characters_from_peers_reach_the_log_as_question_marks(
        node_service: NodeFactory, raw_peer: PeerFactory, service_log: io.StringIO) -> None:
    node = node_service()

    # an A-ASSOCIATE-RQ whose calling AE title carries CR LF and ESC: pynetdicom cannot decode it
    title = f"A\r\n{MARK}\x1b[1m".encode()
    assert raw_peer(node).associate(calling=title).kind == ABORT

    # a C-STORE whose SOP Instance UID carries them, in the command and in the data set
    (ds,) = ct_series(1, rows=16, cols=16)
    uid = f"1.2.3\r\n{MARK}\x1b[1m".encode()
    peer = raw_peer(node)
    assert peer.associate().kind == ASSOCIATE_AC
    answer = peer.c_store(command_with_uid(ds.SOPClassUID, uid),
                          with_uid(encode_dataset(ds), ds.SOPInstanceUID, uid))
    assert answer is not None and answer.kind == P_DATA_TF

    # patient and series text: stored, so the node reads the descriptions
    (text,) = ct_series(1, rows=16, cols=16)
    text.PatientName = f"EVIL\r\n{MARK}\x1b[31m"
    text.SeriesDescription = f"Series\r\n{MARK}"
    text.StudyDescription = f"Study\n{MARK}\x00"
    assert send(node, text) == [Status.SUCCESS]
    assert_still_serving(node)

    log = service_log.getvalue()
    assert_no_raw_control_characters(log)
    assert f"A??{MARK}?[1m" in log  # the title came through, made safe
    assert f"1.2.3??{MARK}?[1m" in log  # and the UID
    with node.db.read() as s:
        series = s.execute(select(Series.series_description)).scalars().all()
        studies = s.execute(select(Study.study_description)).scalars().all()
    assert f"Series??{MARK}" in series
    assert f"Study?{MARK}" in studies
    assert_no_raw_control_characters("\n".join(str(v) for v in [*series, *studies]))


def test_the_uid_with_control_characters_is_0xC210(node_service: NodeFactory,
                                                   raw_peer: PeerFactory) -> None:
    node = node_service()
    (ds,) = ct_series(1, rows=16, cols=16)
    uid = f"1.2.3\r\n{MARK}".encode()
    peer = raw_peer(node)
    peer.associate()

    answer = peer.c_store(command_with_uid(ds.SOPClassUID, uid),
                          with_uid(encode_dataset(ds), ds.SOPInstanceUID, uid))

    assert answer is not None and answer.kind == P_DATA_TF
    assert command_status(answer.fragment) == Status.ERROR_CANNOT_UNDERSTAND
    assert node.instance_count() == 0
    assert_still_serving(node)
