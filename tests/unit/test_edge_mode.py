"""Edge mode's parts without a network: the settings, the reconciliation against a stand-in upstream, the choice of
priors, the eviction of prefetched studies (:mod:`bastion.forward.edge` and its modules)."""

from __future__ import annotations

import datetime
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from conftest import make_study

from bastion.forward.edge_store import PATIENT, STUDY, EdgeStore, Held, Job
from bastion.forward.priors import evict, priors_to_fetch, run_job, warm
from bastion.forward.queue import Backoff, NewEntry
from bastion.forward.reconcile import dataset_digest, reconcile
from bastion.forward.sqlite import SqliteForwardQueue
from bastion.forward.upstream import InstanceDigest, StudyFound, Upstream, resolve_dates
from bastion.model.records import InstanceRecord
from bastion.settings import UPSTREAM, SettingsError, load_settings


class StandIn(Upstream):
    """An upstream that holds ``held`` (study -> SOP Instance UID -> data-set digest) and records what is asked."""

    def __init__(self, held: dict[str, dict[str, str]], syntax: str, studies: list[StudyFound] = ()) -> None:
        super().__init__("")
        self.held, self.syntax, self.studies = held, syntax, list(studies)
        self.retrieved: list[str] = []

    def find_studies(self, keys: Mapping[str, str]) -> list[StudyFound]:
        self.asked = dict(keys)
        return [s for s in self.studies if s.patient_id == keys.get("PatientID", s.patient_id)
                and s.study_uid == keys.get("StudyInstanceUID", s.study_uid)]

    def instances(self, study_uid: str) -> set[str]:
        return set(self.held.get(study_uid, {}))

    def answers(self) -> bool:
        return True

    def retrieve(self, study_uid: str) -> int:
        self.retrieved.append(study_uid)
        return 1

    def digests(self, study_uid: str) -> dict[str, InstanceDigest] | None:
        return {sop: InstanceDigest(self.syntax, d) for sop, d in self.held.get(study_uid, {}).items()}


def test_upstream_adds_an_always_on_rule_named_upstream() -> None:
    s = load_settings(env={"BASTION_UPSTREAM": "CENTRAL@10.0.0.9:104", "BASTION_COMMIT_AFTER_UPSTREAM": "yes",
                           "BASTION_PREFETCH": "ModalitiesInStudy=CT,StudyDate=-30d"})
    assert s.upstream_rule is not None and (s.upstream_rule.name, s.upstream_rule.to) == (UPSTREAM, s.upstream)
    assert s.upstream_rule.match == () and s.commit_after_upstream
    assert s.prefetch == (("ModalitiesInStudy", "CT"), ("StudyDate", "-30d"))
    assert load_settings(env={}).upstream_rule is None


def test_a_forward_rule_may_not_take_the_upstream_name(tmp_path: Path) -> None:
    config = tmp_path / "bastion.toml"
    config.write_text('upstream = "CENTRAL@10.0.0.9:104"\n[[forward]]\nname = "upstream"\nto = "OTHER@10.0.0.8:104"\n')
    with pytest.raises(SettingsError, match="upstream"):
        load_settings(config, env={})
    config.write_text('[prefetch]\nquery = { Modality = "CT" }\n')
    with pytest.raises(SettingsError, match="cannot query on 'Modality'"):
        load_settings(config, env={})


def test_relative_dates_of_the_prefetch_query_become_ranges() -> None:
    today = datetime.date(2026, 12, 7)
    assert resolve_dates((("StudyDate", "-30d"), ("ModalitiesInStudy", "CT")), today) == {
        "StudyDate": "20261107-20261207", "ModalitiesInStudy": "CT"}
    assert resolve_dates((("StudyDate", "+1d"),), today) == {"StudyDate": "20261207-20261208"}
    assert resolve_dates((("StudyDate", "20260101-"),), today) == {"StudyDate": "20260101-"}


def _store(archive: Any, root: Path, **kwargs: Any) -> list[InstanceRecord]:
    study = make_study(root, series=1, per_series=3, **kwargs)
    return [archive.ingest.store_bytes(f.read_bytes(), "test").record for f in study.files]


def test_reconcile_queues_again_what_upstream_lacks_or_holds_different(archive: Any, tmp_path: Path) -> None:
    records = _store(archive, tmp_path / "a")
    edge = EdgeStore(tmp_path / "edge.sqlite3")
    queue = SqliteForwardQueue(tmp_path / "forward.sqlite3")
    try:
        edge.record_held(Held(r.sop_uid, r.study_uid, r.blob_key) for r in records)
        same, changed, _missing = records
        study = same.study_uid
        upstream = StandIn({study: {same.sop_uid: dataset_digest(archive.retriever.read(same)),
                                    changed.sop_uid: "b3-" + "0" * 64}}, same.transfer_syntax)
        report = reconcile(archive, edge, queue, upstream, days=1)
        assert (report.checked, report.held, report.missing, report.different, report.requeued) == (3, 1, 1, 1, 2)
        taken = {e.sop_uid for e in queue.take(UPSTREAM, 10, 60)}
        assert taken == {changed.sop_uid, _missing.sop_uid}
        assert edge.held_key(same.sop_uid) == same.blob_key and edge.held_key(changed.sop_uid) is None

        # Found the same once, it is not compared again (upstream's digests are not even asked for).
        assert [h.content_checked for h in edge.held_since(0)] == [True]
        upstream.held[study][same.sop_uid] = "b3-" + "1" * 64
        assert reconcile(archive, edge, queue, upstream, days=1).different == 0

        # Another transfer syntax upstream (converted on the way): held, not compared byte for byte.
        edge.record_held([Held(changed.sop_uid, study, changed.blob_key)])
        upstream.syntax = "1.2.840.10008.1.2"
        report = reconcile(archive, edge, queue, upstream, days=1)
        assert (report.checked, report.held, report.different) == (2, 2, 0)
    finally:
        edge.close()
        queue.close()


def test_eviction_removes_only_what_upstream_holds(archive: Any, tmp_path: Path) -> None:
    records = _store(archive, tmp_path / "prior")
    edge = EdgeStore(tmp_path / "edge.sqlite3")
    try:
        edge.mark_prefetched(records[0].study_uid, "P")
        came, also_came, acquired_here = records
        edge.record_held([Held(r.sop_uid, r.study_uid, r.blob_key) for r in (came, also_came)])
        assert evict(archive, edge, keep_days=30).instances == 0  # not old enough
        out = evict(archive, edge, keep_days=0, now=edge._clock() + 1)
        assert (out.instances, out.kept, out.studies) == (2, 1, 0)
        assert archive.index.current(came.sop_uid) is None and archive.blobs.problem_with(came.blob_key)
        assert archive.index.current(acquired_here.sop_uid) is not None
        assert archive.retriever.read(acquired_here)  # its object is untouched
        assert edge.prefetched_before(edge._clock() + 10) == [came.study_uid]  # looked at again tomorrow
    finally:
        edge.close()


def test_priors_are_the_newest_not_held_here(archive: Any, tmp_path: Path) -> None:
    [here] = {r.study_uid for r in _store(archive, tmp_path / "local", patient_id="P")}
    found = [StudyFound(f"1.2.3.{year}", "P", f"{year}0101") for year in (2019, 2020, 2021, 2022)]
    found.append(StudyFound(here, "P", "20250101"))
    assert [s.study_uid for s in priors_to_fetch(found, archive.index, 3)] == ["1.2.3.2022", "1.2.3.2021",
                                                                              "1.2.3.2020"]
    edge = EdgeStore(tmp_path / "edge.sqlite3")
    try:
        upstream = StandIn({}, "", found)
        settings = archive.settings
        assert run_job(Job(1, PATIENT, "P", 0), archive.index, edge, upstream, settings) == 3
        assert upstream.retrieved == ["1.2.3.2022", "1.2.3.2021", "1.2.3.2020"]
        assert len(edge.prefetched_before(edge._clock() + 1)) == 3
    finally:
        edge.close()


def test_first_seen_and_jobs_are_kept_once(tmp_path: Path) -> None:
    edge = EdgeStore(tmp_path / "edge.sqlite3")
    try:
        assert edge.first_seen(["1.2", "1.3", "1.2"]) == ["1.2", "1.3"]
        assert edge.first_seen(["1.2", "1.4"]) == ["1.4"]
        assert edge.add_job(PATIENT, "P") and not edge.add_job(PATIENT, "P")
        job = edge.next_job()
        assert job is not None and job.key == "P"
        edge.job_failed(job.id, "down", 600)
        assert edge.next_job() is None and edge.jobs_due_now() == 1 and edge.next_job() is not None
    finally:
        edge.close()


def test_requeue_leaves_the_cursor_and_due_now_ends_the_backoff(tmp_path: Path) -> None:
    queue = SqliteForwardQueue(tmp_path / "forward.sqlite3")
    try:
        before = queue.cursor()
        assert queue.requeue([NewEntry(UPSTREAM, "1.2.3", "1.2", 0)]) == 1
        assert queue.requeue([NewEntry(UPSTREAM, "1.2.3", "1.2", 0)]) == 0  # pending already
        assert queue.cursor() == before
        [entry] = queue.take(UPSTREAM, 10, 60)
        queue.failed([entry.id], "down", Backoff(10, 600.0, 600.0))
        assert (queue.next_due(UPSTREAM) or 0) > 500
        assert queue.due_now(UPSTREAM) == 1 and queue.next_due(UPSTREAM) == 0  # upstream answers again
    finally:
        queue.close()


def test_the_prefetch_query_queues_the_studies_not_held_here(archive: Any, tmp_path: Path) -> None:
    [here] = {r.study_uid for r in _store(archive, tmp_path / "local", patient_id="Q")}
    booked = [StudyFound("1.2.3.7", "R", "20261208"), StudyFound(here, "Q", "20261208")]
    upstream = StandIn({}, "", booked)
    settings = load_settings(env={"BASTION_PREFETCH": "ModalitiesInStudy=CT,StudyDate=+1d"}, data=tmp_path / "s")
    edge = EdgeStore(tmp_path / "edge.sqlite3")
    try:
        assert warm(archive.index, edge, upstream, settings, today=datetime.date(2026, 12, 7)) == 1
        assert upstream.asked == {"ModalitiesInStudy": "CT", "StudyDate": "20261207-20261208"}
        job = edge.next_job()
        assert job is not None and (job.kind, job.key) == (STUDY, "1.2.3.7")
        assert run_job(job, archive.index, edge, upstream, settings) == 1 and upstream.retrieved == ["1.2.3.7"]
    finally:
        edge.close()
