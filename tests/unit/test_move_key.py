"""A C-MOVE's job key (:func:`bastion.dimse.moves.move_key`) and the counts a job stores (:class:`Tally`)."""

from __future__ import annotations

from bastion.dimse.moves import move_key
from bastion.dimse.suboperations import Tally
from bastion.model.levels import QueryLevel
from bastion.model.matching import Condition
from bastion.query.find import QueryKey, conditions_for

STUDY_UID, SERIES_UID = "1.2.840.99.1", "1.2.840.99.1.1"


def keys(**values: str) -> list[Condition]:
    tags = {"StudyInstanceUID": (0x0020000D, "UI"), "SeriesInstanceUID": (0x0020000E, "UI"),
            "PatientName": (0x00100010, "PN"), "Modality": (0x00080060, "CS")}
    return conditions_for([QueryKey(tags[k][0], k, tags[k][1], v) for k, v in values.items()])


def test_the_same_request_has_the_same_key_whatever_its_padding_order_and_return_keys() -> None:
    key = move_key("WS1", "DEST", QueryLevel.SERIES, keys(StudyInstanceUID=STUDY_UID, SeriesInstanceUID=SERIES_UID))
    assert key.startswith("c-move:")
    assert move_key("WS1 ", "DEST ", QueryLevel.SERIES,
                    keys(SeriesInstanceUID=SERIES_UID, StudyInstanceUID=STUDY_UID, PatientName="", Modality="*")) == key


def test_another_requester_destination_level_or_key_is_another_job() -> None:
    conditions = keys(StudyInstanceUID=STUDY_UID, SeriesInstanceUID=SERIES_UID)
    key = move_key("WS1", "DEST", QueryLevel.SERIES, conditions)
    assert move_key("WS2", "DEST", QueryLevel.SERIES, conditions) != key
    assert move_key("WS1", "OTHER", QueryLevel.SERIES, conditions) != key
    assert move_key("WS1", "DEST", QueryLevel.STUDY, conditions) != key
    assert move_key("WS1", "DEST", QueryLevel.SERIES,
                    keys(StudyInstanceUID=STUDY_UID, SeriesInstanceUID=SERIES_UID + "2")) != key


def test_a_tally_is_stored_and_read_back_whole() -> None:
    tally = Tally(4)
    for sop, status in (("1", 0x0000), ("2", 0xB000), ("3", 0xA700)):
        tally.count(sop, status)
    tally.cancelled = True
    again = Tally.of_outcome(tally.outcome())
    assert again == tally and again.status == 0xFE00
    assert again.counts(final=True) == {"NumberOfCompletedSuboperations": 1, "NumberOfFailedSuboperations": 1,
                                        "NumberOfWarningSuboperations": 1, "NumberOfRemainingSuboperations": 1}
    assert Tally.of_progress(["1", "2", "3", "4"], {"1": 0x0000, "4": 0xC000}) == \
        Tally(2, completed=1, failed=1, failed_uids=["4"])
