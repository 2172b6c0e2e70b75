"""The PostgreSQL index's common record in one statement (migration ``0008_record_new_instance``) writes what the
Python record writes, takes exactly the instances that change no level row, and a call whose connection is lost
is neither recorded twice nor lost."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Any

import pytest
from contract.test_index import obj
from pgtest import admin, pg_url
from test_crecord import _story

from bastion.errors import CommitOutcomeUnknown
from bastion.index import open_index, pg_record, pg_transactions
from bastion.index.postgresql import PostgresIndex
from bastion.index.rows import IndexRow
from bastion.model.records import StoreStatus

pytestmark = pytest.mark.timeout(60)

#: The schema's tables and the columns that differ between two indexes that recorded the same objects (the time
#: of a change; the log's random id).
_VOLATILE = {"changes": {"at"}}


@pytest.fixture
def index() -> Iterator[PostgresIndex]:
    with pg_url() as url:
        idx = open_index(url)
        assert isinstance(idx, PostgresIndex)
        try:
            yield idx
        finally:
            idx.close()


def _python_only(idx: PostgresIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(idx, "_record_new", lambda row: None)


def _tables(idx: PostgresIndex) -> dict[str, list[tuple[Any, ...]]]:
    schema = idx._where.schema
    out = {}
    with admin() as conn:
        for table in ("patients", "studies", "series", "instances", "versions", "changes"):
            columns = [c for (c,) in conn.execute(
                "SELECT column_name FROM information_schema.columns WHERE table_schema = %s AND table_name = %s "
                "ORDER BY ordinal_position", (schema, table)).fetchall() if c not in _VOLATILE.get(table, set())]
            out[table] = conn.execute(f"SELECT {', '.join(columns)} FROM {schema}.{table} "
                                      f"ORDER BY {', '.join(columns)}").fetchall()
    return out


def test_the_one_statement_record_writes_what_the_python_record_writes(index: PostgresIndex,
                                                                       monkeypatch: pytest.MonkeyPatch) -> None:
    story = _story()
    with pg_url() as url:
        python = open_index(url)
        assert isinstance(python, PostgresIndex)
        try:
            _python_only(python, monkeypatch)
            outcomes_py = [python.record(o) for o in story]
            outcomes_new = [index.record(o) for o in story]
            assert outcomes_new == outcomes_py
            assert [status for status, _ in outcomes_new].count(StoreStatus.DUPLICATE) == 1
            assert _tables(index) == _tables(python)
        finally:
            python.close()


def test_it_takes_the_instances_that_change_no_level_row(index: PostgresIndex,
                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    in_python = []
    record = pg_record.record
    monkeypatch.setattr(pg_record, "record", lambda tx, row, same_content=None, keep_outdated=True: (
        in_python.append(row.instance.sop_uid), record(tx, row, same_content, keep_outdated))[1])
    for o in _story():
        index.record(o)
    # new rows, changed attributes, versions and new SOP classes or modalities go through Python (as in C on SQLite)
    assert in_python == ["1.9.1", "1.9.4", "1.9.1", "1.9.2", "1.9.6", "1.9.12", "1.9.9", "1.9.13"]


def test_only_instances_of_a_series_recorded_into_before_try_it(index: PostgresIndex,
                                                                monkeypatch: pytest.MonkeyPatch) -> None:
    """The first instance of a series (and a series of one image) is never the common case: it goes straight to
    the Python record, without a call that could only decline."""
    tried, declined = [], []
    record_new = index._record_new

    def counted(row: IndexRow) -> Any:
        tried.append(row.instance.sop_uid)
        outcome = record_new(row)
        if outcome is None:
            declined.append(row.instance.sop_uid)
        return outcome

    monkeypatch.setattr(index, "_record_new", counted)
    for o in _story():
        index.record(o)
    assert tried == ["1.9.2", "1.9.3", "1.9.4", "1.9.5", "1.9.1", "1.9.2", "1.9.7", "1.9.8", "1.9.12", "1.9.10",
                     "1.9.11", "1.9.14"]
    assert declined == ["1.9.4", "1.9.1", "1.9.2", "1.9.12"]


def _backend_waiting_for(study: str) -> int | None:
    """The pid of a backend waiting for study ``study``'s lock, if one is."""
    lock = "hashtextextended(%s, 0)"
    with admin() as conn:
        row = conn.execute("SELECT pid FROM pg_locks WHERE locktype = 'advisory' AND NOT granted AND objsubid = 1 "
                           f"AND (classid::bigint << 32 | objid::bigint) = {lock}", (study,)).fetchone()
    return None if row is None else int(row[0])


def _waiting(study: str) -> int:
    """The pid of the backend that waits for study ``study``'s lock, once one does."""
    for _ in range(5000):
        pid = _backend_waiting_for(study)
        if pid is not None:
            return pid
        threading.Event().wait(0.002)
    raise AssertionError("the record never waited for the study's lock")


def test_a_call_whose_connection_is_lost_before_it_commits_is_recorded_once(index: PostgresIndex) -> None:
    """The server ends the connection while the call waits for the study's lock (another node writing it): the
    call did not commit, and the record, finding that out under the lock once the other writer is done, records
    the instance on another connection."""
    index.record(obj("1.9.1", number=1))
    study = "1.2.3"
    with admin() as node:
        node.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (study,))
        outcome: list[Any] = []
        recording = threading.Thread(target=lambda: outcome.append(index.record(obj("1.9.2", number=2))))
        recording.start()
        pid = _waiting(study)
        node.execute("SELECT pg_terminate_backend(%s)", (pid,))
        for _ in range(5000):  # the record asks again, on another connection, and waits for the lock
            if _backend_waiting_for(study) not in (None, pid):
                break
            threading.Event().wait(0.002)
        node.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (study,))
        recording.join(30)
    assert outcome and outcome[0][0] is StoreStatus.STORED
    assert [c.sop_uid for c in index.changes()] == ["1.9.1", "1.9.2"]
    assert index.statistics().instances == 2


def test_a_committed_call_is_found_by_its_entry(index: PostgresIndex, monkeypatch: pytest.MonkeyPatch) -> None:
    """What the record reads after a lost connection: the entry of a call that committed, none for one that
    did not."""
    at = "2026-12-07T17:00:00.123456Z"
    monkeypatch.setattr(pg_transactions, "now_iso", lambda: at)
    index.record(obj("1.9.1", number=1))
    stored = obj("1.9.2", number=2)
    status, seq = index.record(stored)
    assert status is StoreStatus.STORED and seq is not None
    found, _ = index._write(lambda tx: pg_record.recorded_new(tx, IndexRow.of(stored), at))
    assert found == (True, seq)
    missing, _ = index._write(lambda tx: pg_record.recorded_new(tx, IndexRow.of(obj("1.9.3", number=3)), at))
    assert missing == (False, None)
    with admin() as conn:  # a new change log since (an online rebuild): the instance's row still says it committed
        conn.execute(f"DELETE FROM {index._where.schema}.changes")
    found, _ = index._write(lambda tx: pg_record.recorded_new(tx, IndexRow.of(stored), at))
    assert found == (True, None)


def test_a_lost_call_whose_outcome_the_index_cannot_tell_is_commit_outcome_unknown(index: PostgresIndex) -> None:
    """The connection is lost during the call and the read that would settle it fails too: the record raises
    CommitOutcomeUnknown, for which the ingest keeps the object (the index may name it), not an IndexFailure, for
    which it would remove it."""
    index.record(obj("1.9.1", number=1))
    study, schema = "1.2.3", index._where.schema
    with admin() as node:
        node.execute("SELECT pg_advisory_lock(hashtextextended(%s, 0))", (study,))
        outcome: list[Any] = []

        def record() -> None:
            try:
                outcome.append(index.record(obj("1.9.2", number=2)))
            except Exception as exc:  # noqa: BLE001 - what it raised is the test's subject
                outcome.append(exc)

        recording = threading.Thread(target=record)
        recording.start()
        pid = _waiting(study)
        node.execute(f"ALTER TABLE {schema}.changes RENAME TO changes_away")  # the settling read will fail
        try:
            node.execute("SELECT pg_terminate_backend(%s)", (pid,))
            node.execute("SELECT pg_advisory_unlock(hashtextextended(%s, 0))", (study,))
            recording.join(30)
        finally:
            node.execute(f"ALTER TABLE {schema}.changes_away RENAME TO changes")
    assert len(outcome) == 1 and isinstance(outcome[0], CommitOutcomeUnknown), outcome
    assert "may have happened" in outcome[0].message
