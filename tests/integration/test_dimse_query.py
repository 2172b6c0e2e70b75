"""C-FIND (PS3.4 C.4.1) through DCMTK's findscu: every level, every matching type, return keys.

Expected answers are computed from the generated studies, never written down by hand.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Callable, Iterable
from pathlib import Path

import pydicom
import pytest
from conftest import BastionServer, Study, make_study, requires_dcmtk

pytestmark = [requires_dcmtk, pytest.mark.timeout(120)]

PATIENTS = {  # patient ID -> name
    "QPAT1": "Doe^John",
    "QPAT2": "Dole^Jane",
    "QPAT3": "Smith^Anna",
}


@pytest.fixture(scope="module")
def studies(bastion: BastionServer, tmp_path_factory: pytest.TempPathFactory) -> list[Study]:
    root = tmp_path_factory.mktemp("query-corpus")
    spec = [  # (patient, date, modalities per series, instances per series)
        ("QPAT1", "20191231", ("CT", "CT"), 2),
        ("QPAT1", "20200101", ("MR",), 3),
        ("QPAT2", "20200615", ("CT",), 1),
        ("QPAT3", "20210301", ("CT", "PT"), 2),
        ("QPAT3", "20220707", ("SR",), 1),
    ]
    out = []
    for i, (pid, date, mods, per) in enumerate(spec):
        out.append(make_study(root / f"s{i}", series=len(mods), per_series=per, patient_id=pid,
                              patient_name=PATIENTS[pid], study_date=date, modality=mods,
                              description=f"QUERY {i}", accession=f"QACC{i}"))
    files = [f for s in out for f in s.files]
    proc = bastion.storescu(*files)
    assert proc.stdout.count("Received Store Response (Success)") == len(files), proc.stdout
    return out


@pytest.fixture
def find(bastion: BastionServer, tmp_path: Path) -> Callable[..., list[pydicom.Dataset]]:
    counter = iter(range(1000))

    def run(keys: dict[str, str | None], model: str = "-S") -> list[pydicom.Dataset]:
        proc, responses = bastion.find(keys, model=model, out=tmp_path / f"q{next(counter)}")
        assert proc.returncode == 0, proc.stdout
        assert "Received Final Find Response (Success)" in proc.stdout, proc.stdout
        return responses

    return run


def _values(responses: Iterable[pydicom.Dataset], keyword: str) -> list[str]:
    return sorted(str(r.get(keyword, "")) for r in responses)


def _study_uids(studies: Iterable[Study], pred: Callable[[Study], bool] = lambda s: True) -> list[str]:
    return sorted(s.study_uid for s in studies if pred(s))


# -- PATIENT level (Patient Root) ----------------------------------------------------------------------
def test_patient_single_value(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    rsp = find({"QueryRetrieveLevel": "PATIENT", "PatientID": "QPAT1", "PatientName": None,
                "NumberOfPatientRelatedStudies": None, "NumberOfPatientRelatedInstances": None}, model="-P")
    assert len(rsp) == 1
    mine = [s for s in studies if s.patient_id == "QPAT1"]
    assert str(rsp[0].PatientName) == PATIENTS["QPAT1"]
    assert int(rsp[0].NumberOfPatientRelatedStudies) == len(mine)
    assert int(rsp[0].NumberOfPatientRelatedInstances) == sum(len(s.files) for s in mine)


def test_patient_wildcards(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    for pattern in ("Do*", "D?e^*", "*^Ja?e", "smith*"):
        rsp = find({"QueryRetrieveLevel": "PATIENT", "PatientName": pattern, "PatientID": None}, model="-P")
        # Person names match case-insensitively (documented in bastion.model.matching).
        expected = sorted(pid for pid, name in PATIENTS.items() if fnmatch.fnmatchcase(name.lower(), pattern.lower()))
        assert expected, pattern
        assert _values(rsp, "PatientID") == expected, pattern


def test_patient_universal(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    rsp = find({"QueryRetrieveLevel": "PATIENT", "PatientID": None}, model="-P")
    assert _values(rsp, "PatientID") == sorted({s.patient_id for s in studies})
    rsp = find({"QueryRetrieveLevel": "PATIENT", "PatientID": "*"}, model="-P")
    assert _values(rsp, "PatientID") == sorted({s.patient_id for s in studies})


def test_patient_root_study_level(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    rsp = find({"QueryRetrieveLevel": "STUDY", "PatientID": "QPAT3", "StudyInstanceUID": None}, model="-P")
    assert _values(rsp, "StudyInstanceUID") == _study_uids(studies, lambda s: s.patient_id == "QPAT3")


def test_study_root_patient_level_is_refused(studies: list[Study], bastion: BastionServer, tmp_path: Path) -> None:
    proc, rsp = bastion.find({"QueryRetrieveLevel": "PATIENT", "PatientID": None}, model="-S", out=tmp_path / "q")
    assert rsp == []
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in proc.stdout, proc.stdout


# -- STUDY level -------------------------------------------------------------------------------------
@pytest.mark.parametrize("value, pred", [
    ("20200101", lambda d: d == "20200101"),
    ("20200101-20201231", lambda d: "20200101" <= d <= "20201231"),
    ("20200101-", lambda d: d >= "20200101"),
    ("-20200101", lambda d: d <= "20200101"),
    ("20191231\\20210301", lambda d: d in ("20191231", "20210301")),
])
def test_study_date(studies: list[Study], find: Callable[..., list[pydicom.Dataset]], value: str,
                    pred: Callable[[str], bool]) -> None:
    rsp = find({"QueryRetrieveLevel": "STUDY", "StudyDate": value, "StudyInstanceUID": None})
    expected = _study_uids(studies, lambda s: pred(s.study_date))
    assert expected
    assert _values(rsp, "StudyInstanceUID") == expected
    assert all(pred(str(r.StudyDate)) for r in rsp)


def test_study_uid_list(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    wanted = [studies[0].study_uid, studies[3].study_uid]
    rsp = find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": "\\".join(wanted)})
    assert _values(rsp, "StudyInstanceUID") == sorted(wanted)


def test_study_universal_and_return_keys(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    rsp = find({"QueryRetrieveLevel": "STUDY", "StudyInstanceUID": None, "PatientID": None, "PatientName": None,
                "StudyDate": None, "AccessionNumber": None, "StudyDescription": None,
                "NumberOfStudyRelatedInstances": None, "NumberOfStudyRelatedSeries": None,
                "ModalitiesInStudy": None})
    assert _values(rsp, "StudyInstanceUID") == _study_uids(studies)
    by_uid = {s.study_uid: s for s in studies}
    for r in rsp:
        s = by_uid[str(r.StudyInstanceUID)]
        assert r.QueryRetrieveLevel == "STUDY"
        assert r.PatientID == s.patient_id and str(r.PatientName) == s.patient_name
        assert r.StudyDate == s.study_date
        assert int(r.NumberOfStudyRelatedInstances) == len(s.files)
        assert int(r.NumberOfStudyRelatedSeries) == len(s.series)
        mods = r.ModalitiesInStudy
        mods = [mods] if isinstance(mods, str) else list(mods)
        assert sorted(mods) == sorted(set(s.modalities))
        assert r.StudyDescription.startswith("QUERY ")
        assert r.AccessionNumber.startswith("QACC")


def test_study_by_modalities_in_study(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    rsp = find({"QueryRetrieveLevel": "STUDY", "ModalitiesInStudy": "PT", "StudyInstanceUID": None})
    assert _values(rsp, "StudyInstanceUID") == _study_uids(studies, lambda s: "PT" in s.modalities)


def test_study_wildcard_on_accession(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    rsp = find({"QueryRetrieveLevel": "STUDY", "AccessionNumber": "QACC?", "StudyInstanceUID": None})
    assert _values(rsp, "StudyInstanceUID") == _study_uids(studies)
    rsp = find({"QueryRetrieveLevel": "STUDY", "AccessionNumber": "*C3", "StudyInstanceUID": None})
    assert _values(rsp, "StudyInstanceUID") == [studies[3].study_uid]


def test_no_match_gives_no_pending_response(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    assert find({"QueryRetrieveLevel": "STUDY", "PatientID": "NOBODY", "StudyInstanceUID": None}) == []


def test_malformed_date_range_is_refused(studies: list[Study], bastion: BastionServer, tmp_path: Path) -> None:
    proc, rsp = bastion.find({"QueryRetrieveLevel": "STUDY", "StudyDate": "2020-01-01-2021", "StudyInstanceUID": None},
                             out=tmp_path / "q")
    assert rsp == []
    assert "Received Final Find Response (Error: DataSetDoesNotMatchSOPClass)" in proc.stdout, proc.stdout


# -- SERIES level ------------------------------------------------------------------------------------
def test_series_level(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    study = studies[3]
    rsp = find({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study.study_uid, "SeriesInstanceUID": None,
                "Modality": None, "NumberOfSeriesRelatedInstances": None})
    assert _values(rsp, "SeriesInstanceUID") == sorted(study.series)
    for r in rsp:
        assert int(r.NumberOfSeriesRelatedInstances) == len(study.series[str(r.SeriesInstanceUID)])
    rsp = find({"QueryRetrieveLevel": "SERIES", "StudyInstanceUID": study.study_uid, "Modality": "PT",
                "SeriesInstanceUID": None})
    pt = [uid for uid, mod in zip(study.series, study.modalities, strict=True) if mod == "PT"]
    assert _values(rsp, "SeriesInstanceUID") == sorted(pt)


def test_series_across_studies_by_modality(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    rsp = find({"QueryRetrieveLevel": "SERIES", "Modality": "CT", "SeriesInstanceUID": None})
    expected = sorted(uid for s in studies for uid, mod in zip(s.series, s.modalities, strict=True) if mod == "CT")
    assert _values(rsp, "SeriesInstanceUID") == expected


# -- IMAGE level -------------------------------------------------------------------------------------
def test_image_level(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    study = studies[0]
    series_uid = next(iter(study.series))
    rsp = find({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study.study_uid,
                "SeriesInstanceUID": series_uid, "SOPInstanceUID": None, "InstanceNumber": None,
                "SOPClassUID": None})
    expected = sorted(str(pydicom.dcmread(f, stop_before_pixels=True).SOPInstanceUID)
                      for f in study.series[series_uid])
    assert _values(rsp, "SOPInstanceUID") == expected
    assert all(r.SOPClassUID == "1.2.840.10008.5.1.4.1.1.2" for r in rsp)
    rsp = find({"QueryRetrieveLevel": "IMAGE", "StudyInstanceUID": study.study_uid,
                "SeriesInstanceUID": series_uid, "InstanceNumber": "2", "SOPInstanceUID": None})
    assert len(rsp) == 1 and int(rsp[0].InstanceNumber) == 2


def test_image_sop_uid_list(studies: list[Study], find: Callable[..., list[pydicom.Dataset]]) -> None:
    uids = [studies[1].sop_uids[0], studies[3].sop_uids[-1], "1.2.3.4.5.6.7.8.9"]
    rsp = find({"QueryRetrieveLevel": "IMAGE", "SOPInstanceUID": "\\".join(uids)})
    assert _values(rsp, "SOPInstanceUID") == sorted(uids[:2])
