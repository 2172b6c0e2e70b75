"""The index's common record in C (``_crecord.c``) writes what the Python record writes, and only that."""

from __future__ import annotations

import sqlite3
from collections.abc import Iterator
from pathlib import Path

import pytest
from contract.test_index import CT, MR, obj

from bastion.errors import IndexFailure
from bastion.index import sqlite_record
from bastion.index.sqlite import SqliteIndex
from bastion.model.records import StoredObject, StoreStatus

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


def _tables(path: str) -> dict[str, list[tuple[object, ...]]]:
    """Every row of the index (the change log without its time of day)."""
    with sqlite3.connect(path) as db:
        out = {t: db.execute(f"SELECT * FROM {t} ORDER BY 1").fetchall()
               for t in ("patients", "studies", "series", "instances", "versions")}
        out["changes"] = db.execute("SELECT seq, kind, sop_uid, series_uid, study_uid, blob_key FROM changes "
                                    "ORDER BY seq").fetchall()
    return out


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
    monkeypatch.setattr(sqlite_record, "record", lambda conn, row, same_content=None: (
        in_python.append(row.instance.sop_uid), record(conn, row, same_content))[1])
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
