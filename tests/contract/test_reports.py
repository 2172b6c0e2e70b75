"""Radiology reports on every backend: the index's ``reports`` table (SQLite file, in Python and with its C recorder,
SQLite ``:memory:`` and PostgreSQL) and the report versions in every blob store (file, memory, S3, several copies),
brought back into an emptied index by :func:`bastion.ingest.report_log.apply_report_log` —
:mod:`bastion.index.reports`, :mod:`bastion.blobs.reportlog`."""
# ruff: noqa: F811 - the tests take the imported ``index`` and ``store`` fixtures as parameters

from __future__ import annotations

import pytest
from s3test import seaweed  # noqa: F401 - the session's SeaweedFS, for the "s3" store
from test_blobs import store  # noqa: F401 - the BlobStore fixture over every backend
from test_index import index, obj  # noqa: F401 - the Index fixture over every backend

from bastion.blobs.base import BlobStore
from bastion.blobs.reportlog import ReportLog, VersionTaken
from bastion.errors import NotFound
from bastion.index import Index
from bastion.index.reports import MAX_STUDIES, ReportQuery, ReportRow
from bastion.ingest.report_log import apply_report_log
from bastion.reporting import report as rpt
from bastion.reporting.store import ReportStore
from bastion.reporting.templates import load_templates

pytestmark = pytest.mark.timeout(60)


def _study(n: int, **extra: str) -> dict[str, str]:
    return {"study": f"1.2.3.{n}", "patient_id": f"P{n}", "patient_name": f"Doe^Jane{n}", "accession": f"ACC{n}",
            "modality": "CT", "study_date": f"202101{n:02d}", **extra}


def test_the_table_keeps_the_newest_version_and_searches(index: Index) -> None:
    head = load_templates()["ct-head"]
    docs = [rpt.new_report(_study(n), head, "dr") for n in range(1, 6)]
    for doc in docs:
        index.put_report(ReportRow.of(doc))
    second = rpt.edited(docs[0], {"findings": "100% normal_ish"}, 1, "dr", "preliminary")
    index.put_report(ReportRow.of(second))
    index.put_report(ReportRow.of(docs[0]))  # an older version never replaces a newer one
    got = index.report(docs[0]["id"])
    assert got is not None and got.version == 2 and got.document() == second
    assert index.report("0" * 32) is None
    assert index.open_report("1.2.3.1") is not None and index.open_report("1.2.3.9") is None
    assert len(index.reports(ReportQuery())) == 5
    assert [r.id for r in index.reports(ReportQuery(state="preliminary"))] == [docs[0]["id"]]
    assert [r.patient_id for r in index.reports(ReportQuery(text="jane3"))] == ["P3"]
    assert [r.patient_id for r in index.reports(ReportQuery(text="acc4"))] == ["P4"]
    assert index.reports(ReportQuery(text="%")) == [] and index.reports(ReportQuery(text="_")) == []
    dated = index.reports(ReportQuery(date_from="20210102", date_to="20210103"))
    assert sorted(r.patient_id for r in dated) == ["P2", "P3"]
    assert len(index.reports(ReportQuery(limit=2))) == 2 and len(index.reports(ReportQuery(limit=10, offset=4))) == 1
    assert index.reports(ReportQuery(modality="MR")) == []
    assert [r.id for r in index.reports(ReportQuery(study="1.2.3.5", patient_id="P5"))] == [docs[4]["id"]]
    named = index.reports(ReportQuery(studies=("1.2.3.2", "1.2.3.4", "1.2.3.9")))  # the reading list's page
    assert sorted(r.study_uid for r in named) == ["1.2.3.2", "1.2.3.4"]
    with pytest.raises(ValueError, match="at most"):
        index.reports(ReportQuery(studies=tuple(f"1.2.{n}" for n in range(MAX_STUDIES + 1))))
    index.clear()
    assert index.reports(ReportQuery()) == []


def test_studies_in_a_report_state_newest_first(index: Index) -> None:
    """The reading list's candidates for a state filter: a join of the studies and the reports."""
    head = load_templates()["ct-head"]
    for n in range(1, 6):
        index.record(obj(f"1.2.3.{n}.1.1", f"1.2.3.{n}.1", f"1.2.3.{n}", date=f"202101{n:02d}"))
    draft = rpt.new_report(_study(2), head, "dr")
    index.put_report(ReportRow.of(draft))
    index.put_report(ReportRow.of(rpt.signed(rpt.new_report(_study(4), head, "dr"), "dr", rpt.now_iso(), "9.9")))
    assert index.studies_in_report_state("unreported", 10) == ["1.2.3.5", "1.2.3.3", "1.2.3.1"]
    assert index.studies_in_report_state("unreported", 2, 1) == ["1.2.3.3", "1.2.3.1"]
    assert index.studies_in_report_state("draft", 10) == ["1.2.3.2"]
    assert index.studies_in_report_state("final", 10) == ["1.2.3.4"]
    assert index.studies_in_report_state("amended", 10) == []


def test_versions_are_write_once_and_come_back_after_a_rebuild(store: BlobStore, index: Index) -> None:
    reports = ReportStore(store, index)
    head = load_templates()["ct-head"]
    doc = reports.create(_study(1), head, "dr")
    with pytest.raises(rpt.ReportConflict):
        reports.create(_study(1), head, "dr")  # one open report per study
    doc2 = reports.change(doc["id"], lambda d: rpt.edited(d, {"impression": "ok"}, 1, "dr"))
    with pytest.raises(rpt.ReportConflict):
        reports.change(doc["id"], lambda d: rpt.edited(d, {"impression": "late"}, 1, "dr"))
    with pytest.raises(VersionTaken):
        ReportLog(store).write({**doc2, "author": "another writer"})  # the same version, other content
    ReportLog(store).write(doc2)  # the same report again (a retried write, the SR's intake): nothing to do
    final = reports.change(doc["id"], lambda d: rpt.signed(d, "dr", rpt.now_iso(), "1.2.3.1.99"))
    other = reports.create(_study(2), head, "dr")
    audio_id = reports.put_audio(other["id"], b"RIFF....WAVE")
    with pytest.raises(NotFound):
        reports.audio(other["id"], audio_id)  # not listed in the report: not served
    assert ReportLog(store).get_audio(other["id"], audio_id) == b"RIFF....WAVE"
    assert ReportLog(store).versions(doc["id"]) == [1, 2, 3]
    assert [reports.version(doc["id"], v)["version"] for v in (1, 2, 3)] == [1, 2, 3]
    before = {r["id"]: r for r in reports.search(ReportQuery())}
    index.clear()
    assert reports.search(ReportQuery()) == []
    assert apply_report_log(store, index) == 2
    assert {r["id"]: r for r in reports.search(ReportQuery())} == before
    assert reports.get(doc["id"]) == final and final["state"] == "final"
    with pytest.raises(NotFound):
        reports.get("not-an-id")
