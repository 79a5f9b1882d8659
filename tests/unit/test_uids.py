"""Deterministic result UIDs (inference/uids.py)."""

from __future__ import annotations

import re
import uuid

import pytest
from pydicom.uid import UID

from inference.uids import ResultUIDs, derived_uid, result_uids

STUDY = "1.2.826.0.1.3680043.10.1234.1"
INPUTS = ["1.2.826.0.1.3680043.10.1234.1.1.1", "1.2.826.0.1.3680043.10.1234.1.1.2"]
UID_2_25 = re.compile(r"^2\.25\.(0|[1-9][0-9]*)$")


def _all(uids: ResultUIDs) -> list[str]:
    return [uids.sr_series, uids.sr_instance, uids.sc_series, uids.sc_instance("nodule")]


def test_derived_uid_is_a_valid_uuid_derived_uid() -> None:
    uid = derived_uid("a", "b")
    assert UID_2_25.match(uid)
    assert len(uid) <= 64
    assert UID(uid).is_valid
    as_uuid = uuid.UUID(int=int(uid.removeprefix("2.25.")))
    assert as_uuid.version == 8
    assert as_uuid.variant == uuid.RFC_4122


def test_derived_uid_is_deterministic_and_part_boundaries_matter() -> None:
    assert derived_uid("a", "b") == derived_uid("a", "b")
    assert derived_uid("ab", "c") != derived_uid("a", "bc")
    assert derived_uid("a") != derived_uid("a", "")


def test_derived_uid_rejects_bad_parts() -> None:
    with pytest.raises(ValueError, match='"parts"'):
        derived_uid()
    with pytest.raises(TypeError, match='Item #2 of argument "parts"'):
        derived_uid("a", 1)  # type: ignore[arg-type]


def test_same_inputs_give_same_uids() -> None:
    first = result_uids(STUDY, INPUTS, "demo", "1.0")
    second = result_uids(STUDY, list(INPUTS), "demo", "1.0")
    assert first == second
    assert _all(first) == _all(second)


def test_input_order_and_repetition_do_not_matter() -> None:
    first = result_uids(STUDY, INPUTS, "demo", "1.0")
    reordered = result_uids(STUDY, reversed(INPUTS), "demo", "1.0")
    repeated = result_uids(STUDY, (*INPUTS, INPUTS[0]), "demo", "1.0")
    assert _all(first) == _all(reordered) == _all(repeated)


@pytest.mark.parametrize(
    ("study", "inputs", "name", "version"),
    [
        (STUDY, INPUTS, "demo", "1.1"),  # new model version
        (STUDY, INPUTS, "other", "1.0"),  # other model
        (STUDY, INPUTS[:1], "demo", "1.0"),  # the input set changed
        (STUDY + ".9", INPUTS, "demo", "1.0"),  # other study
    ],
)
def test_any_change_of_analysis_gives_new_uids(
    study: str, inputs: list[str], name: str, version: str
) -> None:
    base = _all(result_uids(STUDY, INPUTS, "demo", "1.0"))
    changed = _all(result_uids(study, inputs, name, version))
    assert not set(base) & set(changed)


def test_result_uids_are_distinct_and_valid() -> None:
    uids = result_uids(STUDY, INPUTS, "demo", "1.0")
    values = [*_all(uids), uids.sc_instance("effusion"), uids.basis]
    assert len(set(values)) == len(values)
    assert all(UID(v).is_valid and len(v) <= 64 for v in values)


def test_result_uids_reject_bad_arguments() -> None:
    with pytest.raises(ValueError, match='"input_sop_uids"'):
        result_uids(STUDY, [], "demo", "1.0")
    with pytest.raises(TypeError, match='"input_sop_uids"'):
        result_uids(STUDY, INPUTS[0], "demo", "1.0")
    with pytest.raises(TypeError, match='Items of argument "input_sop_uids"'):
        result_uids(STUDY, [1], "demo", "1.0")  # type: ignore[list-item]
    with pytest.raises(ValueError, match='"study_uid"'):
        result_uids("not a uid", INPUTS, "demo", "1.0")
    with pytest.raises(ValueError, match='"model_version"'):
        result_uids(STUDY, INPUTS, "demo", "")
    with pytest.raises(ValueError, match='"label_key"'):
        result_uids(STUDY, INPUTS, "demo", "1.0").sc_instance("")
