"""The index's common record in C (``_crecord.c``) writes what the Python record writes, and only that."""

from __future__ import annotations

import hashlib
import sqlite3
import tempfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from contract.test_index import CT, EXPLICIT, MR, _el, obj
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from bastion.errors import IndexFailure
from bastion.index import sqlite_record
from bastion.index.rows import IndexRow
from bastion.index.schema import SUMMARY_SEP
from bastion.index.sqlite import SqliteIndex
from bastion.model.levels import QueryLevel
from bastion.model.records import InstanceRecord, StoredObject, StoreStatus

SC = "1.2.840.10008.5.1.4.1.1.7"

pytestmark = [pytest.mark.timeout(30),
              pytest.mark.skipif(sqlite_record.CRECORD is None, reason="_crecord is not built")]


@pytest.fixture
def index(tmp_path: Path) -> Iterator[SqliteIndex]:
    idx = SqliteIndex(str(tmp_path / "c.sqlite3"))
    yield idx
    idx.close()


def _python_index(path: Path) -> SqliteIndex:
    idx = SqliteIndex(str(path))
    idx._recorder.close()
    idx._recorder = None
    return idx


#: What differs between two indexes that recorded the same objects: the time of day of a change, the random id
#: a new change log gets.
_VOLATILE_COLUMNS = {"changes": {"at"}}
_VOLATILE_META = {"log_epoch"}


def _tables(path: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of every table of the index, but :data:`_VOLATILE_COLUMNS` and :data:`_VOLATILE_META`."""
    db = sqlite3.connect(path)
    try:
        out = {}
        for (table,) in db.execute("SELECT name FROM sqlite_master WHERE type = 'table' "
                                   "AND name NOT LIKE 'sqlite_%' ORDER BY name").fetchall():
            columns = [row[1] for row in db.execute(f"PRAGMA table_info({table})")
                       if row[1] not in _VOLATILE_COLUMNS.get(table, set())]
            rows = db.execute(f"SELECT {', '.join(columns)} FROM {table} ORDER BY {', '.join(columns)}").fetchall()
            if table == "meta":
                rows = [r for r in rows if r[0] not in _VOLATILE_META]
            out[table] = rows
        return out
    finally:
        db.close()


def _story() -> list[StoredObject]:
    """Instances that take every way through the record: new patient, study and series; the common case; a
    changed study description; a re-sent and a superseding copy; a second SOP class and modality in the study;
    a series of another study of the same patient; a patient whose name is not ASCII."""
    first = obj("1.9.1", number=1)
    return [first, obj("1.9.2", number=2), obj("1.9.3", number=3),
            obj("1.9.4", number=4, content="v2"),  # the study's description changes
            obj("1.9.5", number=5, content="v2"),
            first,  # the same object again
            obj("1.9.2", number=2, content="v3"),  # another version of an instance
            obj("1.9.6", series="1.2.3.2", modality="MR", sop_class=MR, number=1, content="v2"),
            obj("1.9.7", series="1.2.3.2", modality="MR", sop_class=MR, number=2, content="v2"),
            obj("1.9.8", series="1.2.3.2", modality="MR", sop_class=CT, number=3, content="v2"),  # CT is known
            obj("1.9.12", series="1.2.3.2", modality="MR", sop_class=SC, number=4, content="v2"),
            obj("1.9.9", series="1.2.4.1", study="1.2.4", number=1),
            obj("1.9.10", series="1.2.4.1", study="1.2.4", number=None),  # type: ignore[arg-type]
            obj("1.9.11", series="1.2.4.1", study="1.2.4", number=3),
            obj("1.9.13", series="1.2.5.1", study="1.2.5", patient="P2", name="Müller^Jürgen", number=1),
            obj("1.9.14", series="1.2.5.1", study="1.2.5", patient="P2", name="Müller^Jürgen", number=2)]


def test_the_c_record_writes_what_the_python_record_writes(tmp_path: Path, index: SqliteIndex) -> None:
    python = _python_index(tmp_path / "python.sqlite3")
    try:
        story = _story()
        outcomes_c = [index.record(o) for o in story]
        outcomes_py = [python.record(o) for o in story]
    finally:
        python.close()
    assert outcomes_c == outcomes_py
    assert [status for status, _ in outcomes_c].count(StoreStatus.DUPLICATE) == 1
    assert _tables(index.location) == _tables(str(tmp_path / "python.sqlite3"))


def test_the_c_record_takes_the_instances_that_change_no_level_row(index: SqliteIndex,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    in_python = []
    record = sqlite_record.record
    monkeypatch.setattr(sqlite_record, "record", lambda conn, row, same_content=None, keep_outdated=True: (
        in_python.append(row.instance.sop_uid), record(conn, row, same_content, keep_outdated))[1])
    for o in _story():
        index.record(o)
    # new rows, changed attributes, versions and new SOP classes or modalities go through Python
    assert in_python == ["1.9.1", "1.9.4", "1.9.1", "1.9.2", "1.9.6", "1.9.12", "1.9.9", "1.9.13"]


def test_an_object_that_is_not_durable_is_not_recorded(index: SqliteIndex) -> None:
    index.record(obj("1.9.1"))

    def not_durable() -> None:
        raise OSError("the flush failed")

    with pytest.raises(OSError, match="the flush failed"):
        index.record(obj("1.9.2", number=2), durable=not_durable)
    assert index.current("1.9.2") is None
    assert index.record(obj("1.9.3", number=3))[0] is StoreStatus.STORED  # the lock was let go
    assert [c.sop_uid for c in index.changes()] == ["1.9.1", "1.9.3"]


def test_an_sqlite_error_is_an_index_failure_and_lets_the_lock_go(index: SqliteIndex) -> None:
    index.record(obj("1.9.1"))
    with sqlite3.connect(index.location) as db:  # another process breaks what the record writes to
        db.execute("CREATE TRIGGER no_more BEFORE INSERT ON changes BEGIN SELECT RAISE(ABORT, 'no more'); END")
    with pytest.raises(IndexFailure, match="no more"):
        index.record(obj("1.9.2", number=2))
    assert index.current("1.9.2") is None
    with sqlite3.connect(index.location) as db:
        db.execute("DROP TRIGGER no_more")
    assert index.record(obj("1.9.2", number=2))[0] is StoreStatus.STORED


def test_an_index_the_c_record_cannot_open_is_recorded_in_python(tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    """The compiled record only makes recording faster: a Recorder that cannot be made leaves the Python one."""
    idx = SqliteIndex(str(tmp_path / "index.sqlite3"))
    idx.close()
    assert sqlite_record.open_recorder(str(tmp_path / "index.sqlite3"), -1, "PRAGMA no_such_thing = (") is None
    assert "records in Python" in caplog.text


# -- randomized stories: the C record takes exactly the common case, and leaves what Python leaves -------------

class _CountingRecorder:
    """The index's real ``_crecord.Recorder``, counting which instances its ``begin`` took (the rest it declined,
    having written nothing, and Python recorded them)."""

    def __init__(self, recorder: Any) -> None:
        self._recorder = recorder
        self.took: list[str] = []
        self.declined: list[str] = []

    def begin(self, sop: str, *args: Any) -> Any:
        seq = self._recorder.begin(sop, *args)
        (self.declined if seq is None else self.took).append(sop)
        return seq

    def __getattr__(self, name: str) -> Any:
        return getattr(self._recorder, name)


def _c_should_take(db: sqlite3.Connection, row: IndexRow) -> bool:
    """Whether recording ``row`` writes no level row and is neither a duplicate nor a new version: the Python
    record's conditions (``sqlite_record._add_instance``) read from the index as it is before the record."""
    i = row.instance
    series_text, study_text, patient_text, _ = row.texts
    if db.execute("SELECT 1 FROM instances WHERE sop_uid = ?", (i.sop_uid,)).fetchone():
        return False
    series = db.execute("SELECT attrs, study_uid, modality FROM series WHERE series_uid = ?",
                        (i.series_uid,)).fetchone()
    study = db.execute("SELECT attrs, patient_id, modalities, sop_classes FROM studies WHERE study_uid = ?",
                       (i.study_uid,)).fetchone()
    patient = db.execute("SELECT attrs FROM patients WHERE patient_id = ?", (row.patient_id,)).fetchone()
    if series is None or study is None or patient is None:
        return False
    modalities, classes = (set(text.split(SUMMARY_SEP)) if text else set() for text in study[2:4])
    return (series == (series_text, i.study_uid, row.modality) and study[:2] == (study_text, row.patient_id)
            and patient[0] == patient_text and (row.modality == "" or row.modality in modalities)
            and i.sop_class_uid in classes)


_SC = "1.2.840.10008.5.1.4.1.1.7"
_numbers = st.one_of(st.none(), st.integers(-3, 40), st.just(2**63), st.just(-(2**63) - 1))
#: What an object may change from the one before it: every other attribute repeats (the common case), and each
#: value comes from a small pool, so that later objects go back to what a level row holds.
_CHANGES = {
    "series": st.integers(1, 3), "study": st.integers(1, 2), "patient": st.sampled_from(["P1", "P2", "Pé"]),
    "content": st.sampled_from(["v1", "v2"]),
    "name": st.sampled_from(["Doe^John", "Müller^Jürgen", "山田^太郎", "O'Neil^Ann", ""]),
    "description": st.sampled_from(["", "head", "HEAD", "a\\b", "ümlaut", "x" * 70]),
    "modality": st.sampled_from(["CT", "MR", "", "OT"]), "sop_class": st.sampled_from([CT, MR, _SC]),
    "number": _numbers, "series_number": _numbers,
    "omit": st.frozensets(st.sampled_from(["PatientName", "StudyDescription", "Modality", "InstanceNumber"]),
                          max_size=2),
}
_FIRST = {"series": 1, "study": 1, "patient": "P1", "content": "v1", "name": "Doe^John", "description": "",
          "modality": "CT", "sop_class": CT, "number": 1, "series_number": 1, "omit": frozenset()}
#: One step of a story: the SOP instance (None: a new one; a number: the one of that earlier step, sent again,
#: so that duplicates and new versions come) and what changes from the step before (at most two attributes).
_steps = st.tuples(st.one_of(st.none(), st.none(), st.integers(0, 12)),
                   st.lists(st.one_of(*(st.tuples(st.just(key), values) for key, values in _CHANGES.items())),
                            max_size=2).map(dict))


def _specs(steps: list[tuple[int | None, dict[str, Any]]]) -> list[dict[str, Any]]:
    """Each step's whole spec: the one before with the step's changes, and its SOP instance's number."""
    specs: list[dict[str, Any]] = []
    spec = _FIRST
    for n, (again, changes) in enumerate(steps):
        spec = {**spec, **changes, "sop": specs[again]["sop"] if again is not None and again < n else n}
        specs.append(spec)
    return specs


def _story_object(n: int, spec: dict[str, Any]) -> StoredObject:
    """The ``n``-th object of a story from its drawn ``spec`` (a stamp that grows with ``n``)."""
    # a series' UID does not name its study, nor a study's its patient: either may move to another
    sop, series, study = f"1.9.{spec['sop']}", f"1.3.{spec['series']}", f"1.2.{spec['study']}"
    digest = hashlib.sha256(f"{sop}:{spec['content']}".encode()).hexdigest()
    stamp = f"{1_700_000_000_000_000_000 + n:020d}"

    def level(*elements: tuple[str, Any]) -> dict[str, Any]:
        return dict(_el(keyword, value) for keyword, value in elements
                    if keyword not in spec["omit"] and value is not None)

    attrs = {
        QueryLevel.PATIENT: level(("PatientID", spec["patient"]), ("PatientName", spec["name"])),
        QueryLevel.STUDY: level(("StudyInstanceUID", study), ("StudyDescription", spec["description"])),
        QueryLevel.SERIES: level(("SeriesInstanceUID", series), ("Modality", spec["modality"]),
                                 ("SeriesNumber", spec["series_number"])),
        QueryLevel.IMAGE: level(("SOPInstanceUID", sop), ("SOPClassUID", spec["sop_class"]),
                                ("InstanceNumber", spec["number"])),
    }
    record = InstanceRecord(sop, spec["sop_class"], series, study, EXPLICIT,
                            f"2024/01/01/00/{sop}_{stamp}_{digest}.dcm", digest, 1000 + n)
    return StoredObject(record, spec["patient"], stamp, attrs)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(_steps, min_size=1, max_size=16))
def test_for_any_story_the_c_record_takes_the_common_case_and_leaves_what_python_leaves(
        steps: list[tuple[int | None, dict[str, Any]]]) -> None:
    """Objects recorded through the C record where it takes them (and Python where it declines) and through
    Python alone leave the same rows in every table and answer the same status and change-log seq; the C record
    takes an object exactly when the Python record would write no level row and it is neither a duplicate nor
    a new version."""
    story = [_story_object(n, spec) for n, spec in enumerate(_specs(steps))]
    with tempfile.TemporaryDirectory() as tmp:
        c_index = SqliteIndex(str(Path(tmp) / "c.sqlite3"))
        python = _python_index(Path(tmp) / "python.sqlite3")
        try:
            assert c_index._recorder is not None
            counting = c_index._recorder = _CountingRecorder(c_index._recorder)
            expected_in_c = []
            with sqlite3.connect(python.location) as before:  # the Python index as it is before each record
                for o in story:
                    if _c_should_take(before, IndexRow.of(o)):
                        expected_in_c.append(o.instance.sop_uid)
                    assert c_index.record(o) == python.record(o)
        finally:
            c_index.close()
            python.close()
        assert counting.took == expected_in_c
        assert len(counting.took) + len(counting.declined) == len(story)
        assert _tables(str(Path(tmp) / "c.sqlite3")) == _tables(str(Path(tmp) / "python.sqlite3"))


def test_a_story_takes_both_paths() -> None:
    """A story's steps reach both: instances the C record takes, and ones it declines (a new series, a new
    version, a new SOP class in the study)."""
    specs = _specs([(None, {}), (None, {"number": 2}), (None, {"number": 3}), (0, {"content": "v2"}),
                    (None, {"sop_class": MR})])
    with tempfile.TemporaryDirectory() as tmp:
        index = SqliteIndex(str(Path(tmp) / "c.sqlite3"))
        try:
            assert index._recorder is not None
            counting = index._recorder = _CountingRecorder(index._recorder)
            for n, spec in enumerate(specs):
                index.record(_story_object(n, spec))
        finally:
            index.close()
    assert counting.took == ["1.9.1", "1.9.2"] and counting.declined == ["1.9.0", "1.9.0", "1.9.4"]


@pytest.mark.parametrize("tamper", [
    "UPDATE studies SET modalities = ''",  # the study's summary lacks its series' modality
    "UPDATE series SET modality = 'XX'",  # the series' column disagrees with its attributes
])
def test_level_rows_that_disagree_with_their_attributes_are_left_to_python(tamper: str) -> None:
    """States no record leaves, made by hand: the C record checks the columns as well as the texts, declines,
    and Python's record leaves the same rows through both indexes."""
    story = _specs([(None, {}), (None, {"number": 2})])
    with tempfile.TemporaryDirectory() as tmp:
        c_index = SqliteIndex(str(Path(tmp) / "c.sqlite3"))
        python = _python_index(Path(tmp) / "python.sqlite3")
        try:
            assert c_index._recorder is not None
            counting = c_index._recorder = _CountingRecorder(c_index._recorder)
            first = _story_object(0, story[0])
            assert c_index.record(first) == python.record(first)
            for idx in (c_index, python):
                with sqlite3.connect(idx.location) as db:
                    db.execute(tamper)
            second = _story_object(1, story[1])
            assert c_index.record(second) == python.record(second)
        finally:
            c_index.close()
            python.close()
        assert counting.took == [] and counting.declined == ["1.9.0", "1.9.1"]
        assert _tables(str(Path(tmp) / "c.sqlite3")) == _tables(str(Path(tmp) / "python.sqlite3"))
