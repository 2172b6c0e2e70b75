"""Several nodes recording into one PostgreSQL index at once: each writer is a PostgresIndex of its own (its own
pool of connections), as the archive's nodes are, and they store instances of the same studies interleaved."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator

import psycopg
import pytest
from pgtest import admin, pg_url
from test_index import CT, MR, Consumer, _values, cond, obj

from bastion.index import Index, open_index
from bastion.model.levels import QueryLevel
from bastion.model.records import StoredObject, StoreStatus

pytestmark = pytest.mark.timeout(120)

WRITERS, STUDIES, SERIES, PER_SERIES = 4, 10, 2, 6


def _instances() -> list[StoredObject]:
    """The objects of 10 studies of 3 patients, each of a CT and an MR series, in round-robin order of studies."""
    out = []
    for n in range(PER_SERIES):
        for s in range(STUDIES):
            for k in range(SERIES):
                out.append(obj(f"1.{s}.{k}.{n}", series=f"1.{s}.{k}", study=f"1.{s}", patient=f"P{s % 3}",
                               name=f"Doe^{s % 3}", modality=("CT", "MR")[k], sop_class=(CT, MR)[k], number=n))
    return out


@pytest.fixture
def location() -> Iterator[str]:
    with pg_url() as url:
        yield url


def _in_threads(count: int, work: Callable[[int], None]) -> None:
    """Run ``work(0) .. work(count - 1)`` in threads started together; re-raise the first failure."""
    start = threading.Barrier(count)
    errors: list[BaseException] = []

    def run(n: int) -> None:
        try:
            start.wait()
            work(n)
        except BaseException as exc:  # noqa: BLE001 - reported by the test's thread
            errors.append(exc)

    threads = [threading.Thread(target=run, args=(n,)) for n in range(count)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(100)
    assert not errors, errors


def test_nodes_opening_a_new_index_at_once_make_its_schema_once(location: str) -> None:
    """The first node makes the schema and applies the migrations under their lock; the others wait for it and
    find the schema made."""
    from bastion.index.pg_schema import known_migrations

    fresh = location + "_new"  # a schema that no one has made yet
    schema = fresh.rpartition("bastion_schema=")[2]
    opened: list[Index] = []
    try:
        _in_threads(WRITERS, lambda n: opened.append(open_index(fresh)))
        assert len(opened) == WRITERS
        _, seq = opened[0].record(obj("1.2.3.1.1"))
        assert all(idx.log_end().seq == seq and idx.statistics().instances == 1 for idx in opened)
        with admin() as conn:
            applied = conn.execute(f'SELECT migration_id FROM "{schema}"._yoyo_migration').fetchall()
        assert sorted(r[0] for r in applied) == sorted(known_migrations())
    finally:
        for idx in opened:
            idx.close()
        with admin() as conn:
            conn.execute(f'DROP SCHEMA IF EXISTS "{schema}" CASCADE')


def test_writers_on_several_nodes_make_one_row_per_entity_and_exact_counts(location: str) -> None:
    """Every instance is sent by two of the four writers: each is stored once, and found a duplicate once."""
    objs = _instances()
    indexes = [open_index(location) for _ in range(WRITERS)]
    statuses: list[list[StoreStatus]] = [[] for _ in range(WRITERS)]
    follower = Consumer(indexes[0].log_start())
    writing = threading.Event()
    writing.set()

    def write(n: int) -> None:
        mine = [o for i, o in enumerate(objs) if i % WRITERS in (n, (n + 1) % WRITERS)]
        for o in mine:
            statuses[n].append(indexes[n].record(o)[0])

    def follow_while_writing() -> None:  # a consumer reading the log while it grows, on a node of its own
        reader = open_index(location)
        try:
            while writing.is_set():
                follower.follow(reader)
        finally:
            reader.close()

    reader = threading.Thread(target=follow_while_writing)
    reader.start()
    try:
        _in_threads(WRITERS, write)
    finally:
        writing.clear()
        reader.join(100)
    try:
        found = [s for mine in statuses for s in mine]
        assert found.count(StoreStatus.STORED) == len(objs) and found.count(StoreStatus.DUPLICATE) == len(objs)
        index = indexes[0]
        st = index.statistics()
        assert (st.patients, st.studies, st.series, st.instances, st.versions) == (
            3, STUDIES, STUDIES * SERIES, len(objs), 0)

        with psycopg.connect(location.partition("?")[0]) as conn:
            schema = location.rpartition("bastion_schema=")[2]
            conn.execute(f'SET search_path TO "{schema}"')
            series_counts = dict(conn.execute("SELECT series_uid, num_instances FROM series").fetchall())
            study_rows = conn.execute("SELECT study_uid, num_series, modalities, sop_classes FROM studies").fetchall()
            patient_rows = conn.execute("SELECT patient_id, num_studies, num_series FROM patients").fetchall()
        assert series_counts == {f"1.{s}.{k}": PER_SERIES for s in range(STUDIES) for k in range(SERIES)}
        assert sorted(study_rows) == [(f"1.{s}", SERIES, "CT\\MR", f"{CT}\\{MR}") for s in range(STUDIES)]
        studies_of = {p: len([s for s in range(STUDIES) if s % 3 == p]) for p in range(3)}
        assert sorted(patient_rows) == [(f"P{p}", studies_of[p], studies_of[p] * SERIES) for p in range(3)]

        # what a QIDO-RS search answers
        studies = index.find(QueryLevel.STUDY, [])
        assert sorted(_values(studies, "StudyInstanceUID")) == sorted(f"1.{s}" for s in range(STUDIES))
        assert set(_values(studies, "NumberOfStudyRelatedSeries")) == {SERIES}
        assert set(_values(studies, "NumberOfStudyRelatedInstances")) == {SERIES * PER_SERIES}
        assert all(sorted(m) == ["CT", "MR"] for m in _values(studies, "ModalitiesInStudy"))
        patients = index.find(QueryLevel.PATIENT, [])
        assert _values(patients, "NumberOfPatientRelatedInstances") == [
            studies_of[p] * SERIES * PER_SERIES for p in range(3)]
        series = index.find(QueryLevel.SERIES, [cond("Modality", "MR")])
        assert len(series) == STUDIES and set(_values(series, "NumberOfSeriesRelatedInstances")) == {PER_SERIES}
        assert len(index.find(QueryLevel.IMAGE, [cond("PatientName", "doe^1")])) == studies_of[1] * SERIES * PER_SERIES

        # the change log: one entry per stored instance, each seen once, in order, by the consumer that read it
        # while the writers were still committing (out of the order of their seq)
        follower.follow(index)
        log = index.changes(0, 10 * len(objs))
        assert [c.kind for c in log] == ["stored"] * len(objs)
        assert follower.seen == log and follower.resets == 0
    finally:
        for idx in indexes:
            idx.close()


def test_writers_superseding_one_instance_at_once_leave_one_current_version(location: str) -> None:
    """Four nodes store four versions of every instance of a series at once: the newest (by stamp) is current,
    the others are superseded versions, and the counts are those of one version each."""
    versions = [[obj(f"1.2.3.1.{i}", number=i, content=f"v{n}") for i in range(PER_SERIES)] for n in range(WRITERS)]
    indexes: list[Index] = [open_index(location) for _ in range(WRITERS)]
    statuses: list[list[StoreStatus]] = [[] for _ in range(WRITERS)]
    try:
        def write(n: int) -> None:
            statuses[n].extend(indexes[n].record(o)[0] for o in versions[n])

        _in_threads(WRITERS, write)
        found = [s for mine in statuses for s in mine]
        assert found.count(StoreStatus.STORED) == PER_SERIES
        assert found.count(StoreStatus.SUPERSEDED) + found.count(StoreStatus.OUTDATED) == PER_SERIES * (WRITERS - 1)
        index = indexes[0]
        st = index.statistics()
        assert (st.patients, st.studies, st.series, st.instances, st.versions) == (
            1, 1, 1, PER_SERIES, PER_SERIES * (WRITERS - 1))
        (series,) = index.find(QueryLevel.SERIES, [])
        assert _values([series], "NumberOfSeriesRelatedInstances") == [PER_SERIES]
        for i in range(PER_SERIES):
            newest = max((v[i] for v in versions), key=lambda o: o.stamp)
            assert index.current(f"1.2.3.1.{i}") == newest.instance
        assert {v.blob_key for v in index.versions()} == {o.instance.blob_key for v in versions for o in v}
    finally:
        for idx in indexes:
            idx.close()


def test_writers_moving_instances_between_studies_at_once_keep_the_levels_exact(location: str) -> None:
    """Four nodes store versions of the same instances in four studies at once (a corrected Study Instance UID):
    two inserting one new instance conflict, and the one that loses runs again. Each instance ends in the study
    of its newest version, with no empty series or study left behind."""
    versions = [[obj(f"1.2.3.1.{i}", series=f"9.{n}.1", study=f"9.{n}", number=i, content=f"v{n}")
                 for i in range(PER_SERIES)] for n in range(WRITERS)]
    indexes: list[Index] = [open_index(location) for _ in range(WRITERS)]
    try:
        def write(n: int) -> None:
            for o in versions[n]:
                indexes[n].record(o)

        _in_threads(WRITERS, write)
        index = indexes[0]
        newest = [max((v[i] for v in versions), key=lambda o: o.stamp) for i in range(PER_SERIES)]
        assert [index.current(f"1.2.3.1.{i}") for i in range(PER_SERIES)] == [o.instance for o in newest]
        holding = {o.instance.study_uid for o in newest}
        st = index.statistics()
        assert (st.patients, st.studies, st.series, st.instances, st.versions) == (
            1, len(holding), len(holding), PER_SERIES, PER_SERIES * (WRITERS - 1))
        studies = index.find(QueryLevel.STUDY, [])
        assert sorted(_values(studies, "StudyInstanceUID")) == sorted(holding)
        counts = dict(zip(_values(studies, "StudyInstanceUID"), _values(studies, "NumberOfStudyRelatedInstances"),
                          strict=True))
        assert counts == {s: sum(o.instance.study_uid == s for o in newest) for s in holding}
        (patient,) = index.find(QueryLevel.PATIENT, [])
        assert _values([patient], "NumberOfPatientRelatedStudies") == [len(holding)]
        assert _values([patient], "NumberOfPatientRelatedSeries") == [len(holding)]
    finally:
        for idx in indexes:
            idx.close()
