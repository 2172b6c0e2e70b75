"""``bastion export`` and ``POST /api/studies/{uid}/export``: files as stored, and de-identified following
PS3.15 Annex E (Basic Application Level Confidentiality Profile, modified dates, consistent UIDs).

pydicom's sample files, given identities and references here, are stored into a real archive with ``bastion
import``; the CLI runs as a subprocess and the API is asked of a real server on the same data directory.
"""

from __future__ import annotations

import asyncio
import datetime as dt
import io
import json
import urllib.error
import urllib.request
import zipfile
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx
import pydicom
import pytest
from conftest import BastionServer, run_bastion, unavailable
from pydicom.data import get_testdata_file
from pydicom.dataset import Dataset
from pydicom.sequence import Sequence
from starlette.applications import Starlette

from bastion.auth import SCOPE_KEY as PRINCIPAL_KEY
from bastion.auth import Principal
from bastion.query.deid_profile import Action, basic_profile
from bastion.query.deidentify import DUMMY_TEXT, Deidentifier
from bastion.query.export import REPORT_NAME, inside, safe_component
from bastion.web.export import export_route

#: A fixed secret, so that the date offsets of the two patients are known to differ (checked below).
SECRET = bytes(range(32))
PRIVATE_TEXT = "PRIVATE-SECRET-NOTE"


@dataclass
class Source:
    """One stored instance: its file and source values."""

    path: Path
    ds: Dataset


@dataclass
class Corpus:
    data: Path
    a1: str = ""
    a2: str = ""
    b1: str = ""
    esc: str = ""
    sources: dict[str, Source] = field(default_factory=dict)  # source SOP UID -> source

    def of_study(self, study: str) -> list[Source]:
        return [s for s in self.sources.values() if str(s.ds.StudyInstanceUID) == study]


def _sample(name: str) -> Dataset:
    path = get_testdata_file(name)
    if path is None:
        unavailable(f"pydicom sample {name} not available")
    return pydicom.dcmread(path)


def _identify(ds: Dataset, *, patient: tuple[str, str], study: str, series: str, sop: str, date: str) -> Dataset:
    ds.PatientID, ds.PatientName = patient
    ds.PatientBirthDate = "19700205"
    ds.StudyInstanceUID, ds.SeriesInstanceUID = study, series
    ds.SOPInstanceUID = ds.file_meta.MediaStorageSOPInstanceUID = sop
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = date
    ds.StudyTime = "101500"
    ds.AccessionNumber = f"ACC{sop[-6:]}"
    ds.StudyID = f"SID{sop[-4:]}"
    ds.InstitutionName = "Saint Elsewhere Hospital"
    ds.ReferringPhysicianName = "Welby^Marcus"
    ds.ImageComments = f"patient {patient[1]} came in with a cough"
    ds.PatientAddress = "12 Elm Street, Springfield"
    other = Dataset()
    other.PatientID = f"MRN-{patient[0]}-OTHER"
    ds.OtherPatientIDsSequence = Sequence([other])
    ds.FrameOfReferenceUID = f"{series}.0"
    ds.add_new(0x00290010, "LO", "ACME PRIVATE")
    ds.add_new(0x00291010, "LT", PRIVATE_TEXT)
    return ds


def _reference(ds: Dataset, target: Dataset) -> None:
    """``ds`` refers to ``target`` (Referenced Image Sequence, and a private tag inside a sequence)."""
    item = Dataset()
    item.ReferencedSOPClassUID = target.SOPClassUID
    item.ReferencedSOPInstanceUID = target.SOPInstanceUID
    item.add_new(0x00090010, "LO", "ACME NESTED")
    item.add_new(0x00091001, "LT", PRIVATE_TEXT)
    ds.ReferencedImageSequence = Sequence([item])


def _store(data: Path, files: list[Path]) -> None:
    """Store ``files`` with ``bastion import`` (the ingest path C-STORE and STOW-RS use too)."""
    proc = run_bastion("import", "--data", data, *files)
    assert proc.returncode == 0 and f"{len(files)} stored" in proc.stdout, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def corpus(tmp_path_factory: pytest.TempPathFactory) -> Corpus:
    root = tmp_path_factory.mktemp("export")
    c = Corpus(root / "data")
    c.data.mkdir()
    (c.data / "deid-secret").write_text(SECRET.hex() + "\n")
    c.a1, c.a2, c.b1, c.esc = (f"1.2.826.0.1.3680043.8.498.7700{i}" for i in range(1, 5))
    pa, pb = ("PAT-A-4711", "Doe^Jane"), ("PAT-B-0815", "Roe^Richard")
    made: list[Dataset] = []
    ct1 = _identify(_sample("CT_small.dcm"), patient=pa, study=c.a1, series=f"{c.a1}.1", sop=f"{c.a1}.1.1",
                    date="20200101")
    ct2 = _identify(_sample("CT_small.dcm"), patient=pa, study=c.a1, series=f"{c.a1}.1", sop=f"{c.a1}.1.2",
                    date="20200101")
    _reference(ct2, ct1)
    sr = _identify(_sample("test-SR.dcm"), patient=pa, study=c.a1, series=f"{c.a1}.2", sop=f"{c.a1}.2.1",
                   date="20200101")
    mr = _identify(_sample("MR_small.dcm"), patient=pa, study=c.a2, series=f"{c.a2}.1", sop=f"{c.a2}.1.1",
                   date="20200301")
    _reference(mr, ct1)  # a reference across two studies of one patient
    ctb = _identify(_sample("CT_small.dcm"), patient=pb, study=c.b1, series=f"{c.b1}.1", sop=f"{c.b1}.1.1",
                    date="20200101")
    us = _identify(_sample("US1_J2KR.dcm"), patient=pb, study=c.b1, series=f"{c.b1}.2", sop=f"{c.b1}.2.1",
                   date="20200101")  # ultrasound without Burned In Annotation: flagged
    sc = _identify(_sample("CT_small.dcm"), patient=pb, study=c.b1, series=f"{c.b1}.3", sop=f"{c.b1}.3.1",
                   date="20200101")
    sc.BurnedInAnnotation = "YES"
    esc = _identify(_sample("MR_small.dcm"), patient=("../../escaped/../x", "Path^Evil"), study=c.esc,
                    series=f"{c.esc}.1", sop=f"{c.esc}.1.1", date="20200101")
    made += [ct1, ct2, sr, mr, ctb, us, sc, esc]
    files = []
    for ds in made:
        path = root / "in" / f"{ds.SOPInstanceUID}.dcm"
        path.parent.mkdir(exist_ok=True)
        ds.save_as(path, enforce_file_format=True)
        files.append(path)
        c.sources[str(ds.SOPInstanceUID)] = Source(path, pydicom.dcmread(path))
    _store(c.data, files)
    return c


def _export(corpus: Corpus, out: Path, *studies: str, extra: tuple[str, ...] = ()) -> Any:
    words = ["export", "--data", corpus.data, "--out", out, *extra]
    for study in studies:
        words += ["--study", study]
    return run_bastion(*words)


def _files(out: Path) -> dict[str, bytes]:
    return {p.relative_to(out).as_posix(): p.read_bytes() for p in sorted(out.rglob("*.dcm"))}


def _walk(ds: Dataset) -> Iterator[pydicom.DataElement]:
    for elem in ds:
        yield elem
        if elem.VR == "SQ":
            for item in elem.value:
                yield from _walk(item)


def _identifying_texts(src: Dataset) -> set[str]:
    """Source values that must not survive de-identification anywhere in the exported bytes."""
    texts = {str(src.PatientID), str(src.PatientName), str(src.AccessionNumber), str(src.StudyID),
             "Saint Elsewhere", "Welby", "came in with a cough", "Elm Street", PRIVATE_TEXT, "ACME",
             f"MRN-{src.PatientID}-OTHER", str(src.StudyInstanceUID), str(src.SeriesInstanceUID),
             str(src.SOPInstanceUID), str(src.FrameOfReferenceUID), str(src.StudyDate), "19700205"}
    for elem in _walk(src):
        if elem.tag.is_private and elem.VR in ("LO", "LT", "SH", "ST", "UT") and elem.value:
            texts.add(str(elem.value))
        if elem.VR in ("DA", "DT") and elem.value:
            texts.add(str(elem.value)[:8])
        if elem.VR in ("PN", "UT", "LT", "ST") and elem.value and elem.tag not in (0x00080070,):
            texts.add(str(elem.value))
    return {t for t in texts if len(t) >= 4}


def _days(value: str) -> int:
    return (dt.date(int(value[:4]), int(value[4:6]), int(value[6:8])) - dt.date(2000, 1, 1)).days


def test_deidentified_export_removes_what_table_e1_1_says(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _export(corpus, out, corpus.a1, corpus.a2, extra=("--deidentify",))
    assert proc.returncode == 0, proc.stderr
    files = _files(out)
    assert len(files) == 4  # CT x2 and SR of A1, MR of A2: none is flagged as burned in
    profile = basic_profile()
    for name, data in files.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert ds.file_meta.MediaStorageSOPInstanceUID == ds.SOPInstanceUID
        assert name == f"{ds.PatientID}/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm"
        src = next(s.ds for s in corpus.sources.values()
                   if Deidentifier(SECRET).uid(str(s.ds.SOPInstanceUID)) == ds.SOPInstanceUID)
        for text in _identifying_texts(src):
            assert text.encode() not in data, f"{text!r} survived in {name}"
        assert ds.PatientIdentityRemoved == "YES"
        assert ds.LongitudinalTemporalInformationModified == "MODIFIED"
        assert [c.CodeValue for c in ds.DeidentificationMethodCodeSequence] == ["113100", "113107"]
        assert ds.PatientID == ds.PatientName == Deidentifier(SECRET).pseudonym(str(src.PatientID))
        assert not any(e.tag.is_private for e in _walk(ds))
        for elem in _walk(ds):
            action = profile.get(int(elem.tag))
            if action is None or elem.tag in (0x00100010, 0x00100020) or elem.VR in ("DA", "DT", "TM"):
                continue
            assert action is not Action.X, f"{elem.tag} ({elem.keyword}) should be removed from {name}"
            if action is Action.Z and elem.VR != "SQ":
                assert elem.value in (None, "", b"", []), f"{elem.keyword} should be empty: {elem.value!r}"
            if action is Action.U and elem.VR == "UI" and elem.value:
                values = elem.value if elem.VM > 1 else [elem.value]
                assert all(str(v).startswith("2.25.") for v in values), elem
            if action is Action.D and elem.VR in ("PN", "LO", "SH", "LT", "ST", "UT"):
                assert elem.value == DUMMY_TEXT, elem
        if ds.Modality == "SR":  # Content Sequence (D): its free text replaced, its structure kept
            texts = [e.value for e in _walk(ds) if e.keyword == "TextValue"]
            assert texts and set(texts) == {DUMMY_TEXT}


def test_uids_are_consistent_and_references_resolve(corpus: Corpus, tmp_path: Path) -> None:
    first, second = tmp_path / "first", tmp_path / "second"
    assert _export(corpus, first, corpus.a1, extra=("--deidentify",)).returncode == 0
    assert _export(corpus, second, corpus.a1, corpus.a2, extra=("--deidentify",)).returncode == 0
    one, two = _files(first), _files(second)
    assert set(one) < set(two)
    assert all(one[name] == two[name] for name in one), "the same study exported twice differs"
    by_sop = {str(pydicom.dcmread(io.BytesIO(d)).SOPInstanceUID): name for name, d in two.items()}
    referring = [pydicom.dcmread(io.BytesIO(d)) for d in two.values()]
    refs = [(ds, ds.ReferencedImageSequence[0].ReferencedSOPInstanceUID) for ds in referring
            if "ReferencedImageSequence" in ds]
    assert len(refs) == 2  # the second CT refers to the first; the MR of the other study too
    for ds, ref in refs:
        assert ref in by_sop, f"{ds.SOPInstanceUID} refers to {ref}, which is not in the export"
        target = pydicom.dcmread(io.BytesIO(two[by_sop[ref]]))
        assert target.SOPClassUID == ds.ReferencedImageSequence[0].ReferencedSOPClassUID
    studies = {str(ds.StudyInstanceUID) for ds in referring}
    assert len(studies) == 2 and len({str(ds.PatientID) for ds in referring}) == 1
    report = json.loads((second / REPORT_NAME).read_text())
    assert set(report["studies"]) == studies and report["exported"] == 4


def test_dates_move_by_one_offset_per_patient(corpus: Corpus, tmp_path: Path) -> None:
    d = Deidentifier(SECRET)
    assert d.shift_days("PAT-A-4711") != d.shift_days("PAT-B-0815")  # the fixed secret makes this certain
    out = tmp_path / "out"
    proc = _export(corpus, out, corpus.a1, corpus.a2, corpus.b1, extra=("--deidentify",))
    assert proc.returncode == 0, proc.stderr
    shifts: dict[str, set[int]] = {}
    for data in _files(out).values():
        ds = pydicom.dcmread(io.BytesIO(data))
        src = next(s.ds for s in corpus.sources.values() if d.uid(str(s.ds.SOPInstanceUID)) == ds.SOPInstanceUID)
        for keyword in ("StudyDate", "SeriesDate", "ContentDate", "PatientBirthDate"):
            shift = _days(str(getattr(src, keyword))) - _days(str(getattr(ds, keyword)))
            shifts.setdefault(str(ds.PatientID), set()).add(shift)
        assert ds.StudyTime == src.StudyTime  # whole days move: the time of day stays
    assert len(shifts) == 2
    assert all(len(s) == 1 for s in shifts.values()), shifts  # one offset per patient, for every date
    (a,), (b,) = shifts.values()
    assert a != b and 1 <= a <= 3650 and 1 <= b <= 3650


def test_burned_in_instances_are_left_out_and_reported(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _export(corpus, out, corpus.b1, extra=("--deidentify",))
    assert proc.returncode == 0, proc.stderr
    assert "WARNING: 2 instance(s) may carry burned-in annotation" in proc.stderr
    files = _files(out)
    assert len(files) == 1 and pydicom.dcmread(io.BytesIO(next(iter(files.values())))).Modality == "CT"
    report = json.loads((out / REPORT_NAME).read_text())
    assert report["burned_in_left_out"] == 2 and report["exported"] == 1
    reasons = sorted(b["reason"] for b in report["burned_in"])
    assert reasons == ["Burned In Annotation is YES", "modality US without Burned In Annotation NO"]
    assert not any(uid in json.dumps(report) for uid in corpus.sources)  # no source UID in the report
    again = tmp_path / "again"
    proc = _export(corpus, again, corpus.b1, extra=("--deidentify", "--include-burned-in"))
    assert proc.returncode == 0 and len(_files(again)) == 3
    assert json.loads((again / REPORT_NAME).read_text())["burned_in_left_out"] == 0


def test_identified_export_is_as_stored_inside_the_folder(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _export(corpus, out, corpus.a1, corpus.esc)
    assert proc.returncode == 0, proc.stderr
    files = _files(out)
    assert len(files) == 4
    for name, data in files.items():
        ds = pydicom.dcmread(io.BytesIO(data))
        assert data == corpus.sources[str(ds.SOPInstanceUID)].path.read_bytes()
        assert name.endswith(f"/{ds.StudyInstanceUID}/{ds.SeriesInstanceUID}/{ds.SOPInstanceUID}.dcm")
    evil = [n for n in files if corpus.esc in n]
    assert len(evil) == 1 and evil[0].startswith("_.._escaped_.._x-")  # "../../escaped/../x", made safe
    assert not (tmp_path / "escaped").exists() and not (out.parent / "x").exists()
    assert all((out / n).resolve().is_relative_to(out.resolve()) for n in files)


def test_path_components_cannot_escape() -> None:
    for text in ("..", ".", "../../etc/passwd", "/abs", "a/b", "a\\b", "", "\x00", "ü"):
        part = safe_component(text)
        assert "/" not in part and "\\" not in part and not part.startswith(".") and part
    assert safe_component("PAT-1_2.3") == "PAT-1_2.3"
    assert safe_component("a/b") != safe_component("a_b")
    with pytest.raises(ValueError):
        inside(Path("/tmp/x"), "../y")
    with pytest.raises(ValueError):
        inside(Path("/tmp/x"), "/etc/passwd")


def test_bad_study_is_a_clear_error_and_writes_nothing(corpus: Corpus, tmp_path: Path) -> None:
    out = tmp_path / "out"
    proc = _export(corpus, out, corpus.a1, "1.2.3.4.5.6.404")
    assert proc.returncode == 2 and "no study 1.2.3.4.5.6.404" in proc.stderr
    proc = _export(corpus, out, "../../etc")
    assert proc.returncode == 2 and "not a Study Instance UID" in proc.stderr
    assert not out.exists()


def test_zip_matches_the_folder(corpus: Corpus, tmp_path: Path) -> None:
    folder, zipped = tmp_path / "folder", tmp_path / "zipped"
    assert _export(corpus, folder, corpus.a1, extra=("--deidentify",)).returncode == 0
    assert _export(corpus, zipped, corpus.a1, extra=("--deidentify", "--zip")).returncode == 0
    assert not _files(zipped)
    with zipfile.ZipFile(zipped / "bastion-export.zip") as zf:
        members = {n: zf.read(n) for n in zf.namelist()}
    report = json.loads(members.pop(REPORT_NAME))
    assert members == _files(folder) and report["exported"] == 3
    assert json.loads((zipped / REPORT_NAME).read_text()) == report


def _post(server: BastionServer, path: str) -> tuple[int, str, bytes]:
    request = urllib.request.Request(server.url(path), method="POST", data=b"")
    try:
        with urllib.request.urlopen(request, timeout=60) as rsp:
            return rsp.status, rsp.headers.get("Content-Type", ""), rsp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.headers.get("Content-Type", ""), exc.read()


def _audit_entries(data: Path) -> list[dict[str, Any]]:
    lines = [line for p in sorted([*data.glob("audit/*.jsonl"), *data.glob("audit.jsonl")])
             for line in p.read_text().splitlines() if line.strip()]
    return [e for e in map(json.loads, lines) if e.get("kind") == "export"]


def test_api_streams_the_same_zip_and_everything_is_audited(corpus: Corpus, tmp_path: Path) -> None:
    cli = tmp_path / "cli"
    assert _export(corpus, cli, corpus.a1, extra=("--deidentify", "--zip")).returncode == 0
    with zipfile.ZipFile(cli / "bastion-export.zip") as zf:
        expected = {n: zf.read(n) for n in zf.namelist()}
    server = BastionServer(corpus.data).start()
    try:
        status, ctype, body = _post(server, f"/api/studies/{corpus.a1}/export?deidentify=true")
        assert status == 200 and ctype == "application/zip"
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            assert {n: zf.read(n) for n in zf.namelist()} == expected
        status, _, body = _post(server, f"/api/studies/{corpus.a1}/export")
        with zipfile.ZipFile(io.BytesIO(body)) as zf:
            names = [n for n in zf.namelist() if n.endswith(".dcm")]
            assert status == 200 and len(names) == 3 and all(n.startswith("PAT-A-4711/") for n in names)
        status, ctype, body = _post(server, "/api/studies/1.2.3.4.5.6.404/export?deidentify=true")
        assert status == 404 and ctype == "application/json" and b"no study" in body
        assert _post(server, "/api/studies/not..a-uid/export")[0] == 400
        assert _post(server, f"/api/studies/{corpus.a1}/export?deidentify=maybe")[0] == 400
        document = json.loads(urllib.request.urlopen(server.url("/api/openapi.json"), timeout=10).read())
        assert "post" in document["paths"]["/api/studies/{study}/export"]
        beside = tmp_path / "beside"  # the command works beside a running server too
        assert _export(corpus, beside, corpus.a1, extra=("--deidentify", "--zip")).returncode == 0
        with zipfile.ZipFile(beside / "bastion-export.zip") as zf:
            assert {n: zf.read(n) for n in zf.namelist()} == expected
    finally:
        server.stop()
    entries = _audit_entries(corpus.data)
    api = [e for e in entries if e.get("via") == "api"]
    assert {(e["detail"], e.get("count"), e["destination"]) for e in api} == {("deidentified", 3, "http"),
                                                                              ("identified", 3, "http")}
    assert all(e["patient_id"] == "PAT-A-4711" and e["studies"] == [corpus.a1] for e in api)
    cli_entries = [e for e in entries if e.get("via") == "cli" and e["destination"] == str(cli.resolve())]
    assert len(cli_entries) == 1 and cli_entries[0]["action"] == "R" and cli_entries[0].get("count") == 3


def test_api_export_is_for_the_admin_role(archive: Any) -> None:
    """A principal of another role (as the authentication middleware sets it) is refused before anything is read."""

    def as_role(role: str) -> Any:
        async def app(scope: Any, receive: Any, send: Any) -> None:
            scope[PRINCIPAL_KEY] = Principal(user="someone", role=role, via="apikey")
            await Starlette(routes=[export_route(archive)])(scope, receive, send)
        return app

    async def post(role: str) -> httpx.Response:
        async with httpx.AsyncClient(transport=httpx.ASGITransport(app=as_role(role)), base_url="http://b") as c:
            return await c.post("/api/studies/1.2.3/export?deidentify=true")

    for role in ("viewer", "uploader"):
        rsp = asyncio.run(post(role))
        assert rsp.status_code == 403 and "admin" in rsp.json()["error"]
    assert asyncio.run(post("admin")).status_code == 404  # let through: no such study
