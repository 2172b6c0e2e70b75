"""Fill a Bastion data directory with a large, realistic index fast (benchmark only).

The distribution is deterministic for a given ``--count`` (default 1,000,000): about one patient per 50
instances and one study per 20, 2-4 series per study, modalities weighted like a general hospital (a PET
study also has a CT series, some studies an SR), study dates over ten years (2015-2024) and names from a
small vocabulary (200 family x 60 given names), so wildcard and date-range queries select realistic
fractions.

Two ways to materialise the same plan:

* ``--data DIR``: index rows are written straight into ``DIR/index.sqlite`` with ``executemany`` in big
  transactions, through the schema of :mod:`bastion.index.schema` and the same column derivation and study
  summaries (:func:`bastion.index.columns.columns_for`, :func:`bastion.index.schema.refresh_study_summaries`) as the
  live record path. This is **benchmark-only**: the rows point at blob keys that do not exist (``bastion
  verify`` would report them missing), because QIDO only needs the index. A sample of the rows is checked
  against what the real ingest path (:func:`bastion.ingest.header.read_header`) derives from the equivalent
  Part 10 file. Then one real study — one series of ``--showcase`` 512x512 CT instances — is stored through
  ``Archive.ingest.store_bytes`` for the WADO-RS and metadata measurements.
* ``--files DIR``: writes the plan as small Part 10 files (64x64 CT-like pixels) plus the showcase series
  (512x512) under ``DIR/showcase``, for uploading to Orthanc and Bastion alike with ``storescu``.

Usage::

    python benchmarks/bulkload.py --data /tmp/bastion-1m --count 1000000
    python benchmarks/bulkload.py --files /tmp/corpus-22k --count 22000
"""

from __future__ import annotations

import argparse
import hashlib
import io
import json
import random
import sqlite3
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, ExplicitVRLittleEndian

sys.path.insert(0, str(Path(__file__).resolve().parent))

from bastion.index.columns import columns_for  # noqa: E402
from bastion.index.schema import refresh_study_summaries  # noqa: E402
from bastion.index.sqlite import SqliteIndex  # noqa: E402
from bastion.ingest.header import read_header  # noqa: E402
from bastion.model.levels import QueryLevel  # noqa: E402
from bastion.model.records import object_key  # noqa: E402

UID_ROOT = "1.2.826.0.1.3680043.8.498.4243."  # pydicom's root + a branch of our own
SEED = 20250101
SHOWCASE_PATIENT = "SHOWCASE0001"
FAMILY = [f"{a}{b}" for a in ("SMITH", "JONES", "MULLER", "GARCIA", "ROSSI", "DUBOIS", "NOVAK", "KOWALSKI",
                                "SILVA", "HANSEN", "KIM", "NGUYEN", "OKAFOR", "YILMAZ", "IVANOV", "TANAKA",
                                "BROWN", "WILSON", "MARTIN", "BERNARD")
          for b in ("", "SON", "ER", "A", "OV", "MANN", "ELLI", "INEN", "SKI", "EZ")]
GIVEN = ["ANNA", "BEN", "CARLA", "DAVID", "EVA", "FRANK", "GRETA", "HUGO", "INES", "JAN", "KARIN", "LEO",
         "MARIA", "NILS", "OLGA", "PAUL", "QUINN", "ROSA", "SVEN", "TINA", "UWE", "VERA", "WALT", "XENIA",
         "YUSUF", "ZOE", "ADAM", "BEA", "CHEN", "DORA", "EMIL", "FLORA", "GUS", "HANNA", "IGOR", "JULIA",
         "KAI", "LENA", "MILO", "NORA", "OTTO", "PIA", "RAUL", "SARA", "TOM", "ULLA", "VIK", "WANDA",
         "XAVI", "YARA", "ZENO", "ALMA", "BORIS", "CLEO", "DIRK", "ELSA", "FINN", "GINA", "HARRY", "IDA"]
# (primary modality, weight, series modalities, description, SOP class)
STUDY_KINDS = [
    ("CT", 30, ("CT",), "CT CHEST ABDOMEN", "1.2.840.10008.5.1.4.1.1.2"),
    ("MR", 20, ("MR",), "MR BRAIN", "1.2.840.10008.5.1.4.1.1.4"),
    ("CR", 15, ("CR",), "XR CHEST 2 VIEWS", "1.2.840.10008.5.1.4.1.1.1"),
    ("DX", 10, ("DX",), "XR KNEE", "1.2.840.10008.5.1.4.1.1.1.1"),
    ("US", 10, ("US",), "US ABDOMEN", "1.2.840.10008.5.1.4.1.1.6.1"),
    ("PT", 5, ("PT", "CT"), "PET CT WHOLE BODY", "1.2.840.10008.5.1.4.1.1.128"),
    ("MG", 5, ("MG",), "MAMMO SCREENING", "1.2.840.10008.5.1.4.1.1.1.2"),
    ("NM", 5, ("NM",), "NM BONE SCAN", "1.2.840.10008.5.1.4.1.1.20"),
]
SOP_CLASS = {kind[0]: kind[4] for kind in STUDY_KINDS}
SR_CLASS = "1.2.840.10008.5.1.4.1.1.88.22"
BODY = {"CT": "CHEST", "MR": "BRAIN", "CR": "CHEST", "DX": "KNEE", "US": "ABDOMEN", "PT": "WHOLEBODY",
        "MG": "BREAST", "NM": "WHOLEBODY", "SR": ""}


@dataclass(frozen=True)
class Patient:
    """One patient of the plan."""

    id: str
    name: str
    birth_date: str
    sex: str


@dataclass(frozen=True)
class Series:
    """One series: modality, SOP class and how many instances."""

    uid: str
    number: int
    modality: str
    sop_class: str
    description: str
    count: int


@dataclass(frozen=True)
class Study:
    """One study of the plan with its series."""

    uid: str
    patient: Patient
    date: str
    time: str
    accession: str
    study_id: str
    description: str
    series: tuple[Series, ...]


def plan(count: int, seed: int = SEED) -> list[Study]:
    """The deterministic hierarchy holding exactly ``count`` instances."""
    rng = random.Random(seed)
    n_patients = max(1, count // 50)
    n_studies = max(1, count // 20)
    patients = [Patient(f"PAT{p:07d}", f"{rng.choice(FAMILY)}^{rng.choice(GIVEN)}",
                        f"{1930 + rng.randrange(85)}{1 + rng.randrange(12):02d}{1 + rng.randrange(28):02d}",
                        rng.choice("FM")) for p in range(n_patients)]
    weights = [k[1] for k in STUDY_KINDS]
    shapes = []
    for _ in range(n_studies):
        kind = rng.choices(STUDY_KINDS, weights)[0]
        n_series = 2 + rng.randrange(3)
        mods = [kind[2][j % len(kind[2])] for j in range(n_series)]
        if rng.random() < 0.05:
            mods[-1] = "SR"
        shapes.append((kind, mods))
    total_series = sum(len(m) for _, m in shapes)
    base, extra = divmod(count, total_series)
    studies: list[Study] = []
    day0 = int(time.mktime((2015, 1, 1, 12, 0, 0, 0, 0, 0)))
    s_index = 0
    for k, (kind, mods) in enumerate(shapes):
        when = time.gmtime(day0 + rng.randrange(3652) * 86400)
        series = []
        for j, mod in enumerate(mods):
            n = base + (1 if s_index < extra else 0)
            s_index += 1
            cls = SR_CLASS if mod == "SR" else SOP_CLASS[mod]
            series.append(Series(f"{UID_ROOT}2.{k}.{j + 1}", j + 1, mod, cls, f"{mod} SERIES {j + 1}", n))
        studies.append(Study(
            f"{UID_ROOT}1.{k}", patients[rng.randrange(n_patients)], time.strftime("%Y%m%d", when),
            f"{7 + rng.randrange(12):02d}{rng.randrange(60):02d}{rng.randrange(60):02d}", f"ACC{k:08d}",
            str(k % 100000), kind[3], tuple(s for s in series if s.count > 0)))
    return studies


def sop_uid(series: Series, number: int) -> str:
    """The SOP Instance UID of instance ``number`` (1-based) of ``series``."""
    return f"{UID_ROOT}3.{series.uid[len(UID_ROOT) + 2:]}.{number}"


def _el(vr: str, *values: Any) -> dict[str, Any]:
    vals = [v for v in values if v not in (None, "")]
    if not vals:
        return {"vr": vr}
    if vr == "PN":
        return {"vr": vr, "Value": [{"Alphabetic": v} for v in vals]}
    return {"vr": vr, "Value": vals}


def level_attrs(study: Study, series: Series, number: int) -> dict[QueryLevel, dict[str, Any]]:
    """The DICOM JSON per level that ingest derives from :func:`dataset` (checked by :func:`self_check`)."""
    p = study.patient
    image = series.modality not in ("SR",)
    return {
        QueryLevel.PATIENT: {"00100010": _el("PN", p.name), "00100020": _el("LO", p.id),
                             "00100030": _el("DA", p.birth_date), "00100040": _el("CS", p.sex)},
        QueryLevel.STUDY: {"0020000D": _el("UI", study.uid), "00080020": _el("DA", study.date),
                           "00080030": _el("TM", study.time), "00080050": _el("SH", study.accession),
                           "00200010": _el("SH", study.study_id), "00081030": _el("LO", study.description),
                           "00080090": _el("PN", "REFERRER^RITA"),
                           "00080080": _el("LO", "SYNTHETIC GENERAL HOSPITAL")},
        QueryLevel.SERIES: {"0020000E": _el("UI", series.uid), "00080060": _el("CS", series.modality),
                            "00200011": _el("IS", series.number), "0008103E": _el("LO", series.description),
                            "00080021": _el("DA", study.date), "00080031": _el("TM", study.time),
                            **({"00180015": _el("CS", BODY[series.modality])} if BODY[series.modality] else {}),
                            "00080070": _el("LO", "BASTION BENCHMARKS")},  # the files leave BodyPartExamined out of SR
        QueryLevel.IMAGE: {"00080018": _el("UI", sop_uid(series, number)), "00080016": _el("UI", series.sop_class),
                           "00200013": _el("IS", number),
                           **({"00080008": _el("CS", "ORIGINAL", "PRIMARY", "AXIAL"),
                               "00280010": _el("US", 64), "00280011": _el("US", 64),
                               "00280100": _el("US", 16), "00280004": _el("CS", "MONOCHROME2")} if image else {}),
                           "00080005": _el("CS", "ISO_IR 100")},
    }


def dataset(study: Study, series: Series, number: int, size: int = 64) -> Dataset:
    """A Part 10 dataset for one planned instance (``size`` x ``size`` 16-bit pixels unless SR)."""
    p = study.patient
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = series.sop_class
    meta.MediaStorageSOPInstanceUID = sop_uid(series, number)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.SOPClassUID = series.sop_class
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = study.date
    ds.StudyTime = ds.SeriesTime = study.time
    ds.AccessionNumber = study.accession
    ds.Modality = series.modality
    ds.Manufacturer = "BASTION BENCHMARKS"
    ds.InstitutionName = "SYNTHETIC GENERAL HOSPITAL"
    ds.ReferringPhysicianName = "REFERRER^RITA"
    ds.StudyDescription = study.description
    ds.SeriesDescription = series.description
    ds.PatientName = p.name
    ds.PatientID = p.id
    ds.PatientBirthDate = p.birth_date
    ds.PatientSex = p.sex
    if BODY[series.modality]:
        ds.BodyPartExamined = BODY[series.modality]
    ds.StudyInstanceUID = study.uid
    ds.SeriesInstanceUID = series.uid
    ds.StudyID = study.study_id
    ds.SeriesNumber = series.number
    ds.InstanceNumber = number
    if series.modality != "SR":
        ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
        ds.SamplesPerPixel = 1
        ds.PhotometricInterpretation = "MONOCHROME2"
        ds.Rows = ds.Columns = size
        ds.BitsAllocated = 16
        ds.BitsStored = 12
        ds.HighBit = 11
        ds.PixelRepresentation = 0
        ds.RescaleIntercept = "-1024"
        ds.RescaleSlope = "1"
        ds.ImagePositionPatient = [-0.5 * size, -0.5 * size, -2.5 * number]
        ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
        ds.PixelSpacing = [round(350 / size, 4)] * 2
        noise = np.random.default_rng(SEED + number).integers(0, 64, size=(size, size), dtype=np.uint16)
        ds.PixelData = (noise + 1000).astype(np.uint16).tobytes()
    return ds


def part10(ds: Dataset) -> bytes:
    """``ds`` as Part 10 bytes."""
    buf = io.BytesIO()
    ds.save_as(buf, enforce_file_format=True)
    return buf.getvalue()


def showcase(instances: int) -> Study:
    """The study stored for real: one CT series of ``instances`` 512x512 instances."""
    patient = Patient(SHOWCASE_PATIENT, "SHOWCASE^CT", "19700101", "F")
    series = Series(f"{UID_ROOT}2.999999999.1", 1, "CT", SOP_CLASS["CT"], "CT SHOWCASE 1000", instances)
    return Study(f"{UID_ROOT}1.999999999", patient, "20241231", "120000", "ACCSHOWCASE", "1",
                 "CT SHOWCASE", (series,))


def self_check(studies: list[Study], samples: int = 40) -> None:
    """Check that the hand-built rows equal what ingest derives from the equivalent files."""
    rng = random.Random(1)
    for _ in range(samples):
        study = rng.choice(studies)
        series = rng.choice(study.series)
        number = 1 + rng.randrange(series.count)
        header = read_header(io.BytesIO(part10(dataset(study, series, number))))
        want = level_attrs(study, series, number)
        for level in QueryLevel:
            if header.attrs[level] != want[level]:
                raise SystemExit(f"bulk rows differ from ingest at {level}: {header.attrs[level]} != {want[level]}")


def _rows(studies: list[Study], stamp0: int) -> Iterator[tuple[str, tuple[Any, ...]]]:
    """(table, row) for every entity in insertion order; instance rows carry their change row."""
    dumps = json.dumps
    seen_patients: set[str] = set()
    stamp = stamp0
    for study in studies:
        first = study.series[0]
        attrs = level_attrs(study, first, 1)
        pid = study.patient.id
        if pid not in seen_patients:
            seen_patients.add(pid)
            pc = columns_for(QueryLevel.PATIENT, attrs[QueryLevel.PATIENT])
            yield "patients", (pid, pc["patient_name"], pc["patient_birth_date"], pc["patient_sex"],
                               dumps(attrs[QueryLevel.PATIENT]))
        sc = columns_for(QueryLevel.STUDY, attrs[QueryLevel.STUDY])
        yield "studies", (study.uid, pid, sc["study_date"], sc["study_time"], sc["accession_number"],
                          sc["study_id"], sc["study_description"], sc["referring_physician"],
                          dumps(attrs[QueryLevel.STUDY]), len(study.series))
        for series in study.series:
            a = level_attrs(study, series, 1)[QueryLevel.SERIES]
            c = columns_for(QueryLevel.SERIES, a)
            yield "series", (series.uid, study.uid, c["modality"], c["series_number"], c["series_description"],
                             c["series_date"], c["body_part"], dumps(a), series.count)
            for number in range(1, series.count + 1):
                sop = sop_uid(series, number)
                ia = level_attrs(study, series, number)[QueryLevel.IMAGE]
                stamp += 1
                sha = hashlib.sha256(sop.encode()).hexdigest()
                key = object_key(sop, f"{stamp:020d}", sha)
                yield "instances", (sop, series.uid, study.uid, series.sop_class, number, ExplicitVRLittleEndian,
                                    key, sha, 8_800, f"{stamp:020d}", dumps(ia))
                yield "changes", ("stored", sop, series.uid, study.uid, key, "2025-01-01T00:00:00.000+00:00")


INSERTS = {
    "patients": "INSERT INTO patients (patient_id, patient_name, patient_birth_date, patient_sex, attrs) "
                "VALUES (?,?,?,?,?)",
    "studies": "INSERT INTO studies (study_uid, patient_id, study_date, study_time, accession_number, study_id, "
               "study_description, referring_physician, attrs, num_series) "
               "VALUES (?,?,?,?,?,?,?,?,?,?)",
    "series": "INSERT INTO series (series_uid, study_uid, modality, series_number, series_description, "
              "series_date, body_part, attrs, num_instances) VALUES (?,?,?,?,?,?,?,?,?)",
    "instances": "INSERT INTO instances VALUES (?,?,?,?,?,?,?,?,?,?,?)",
    "changes": "INSERT INTO changes (kind, sop_uid, series_uid, study_uid, blob_key, at) VALUES (?,?,?,?,?,?)",
}


#: The patients' numbers of studies and series, counted from the studies (standard SQL: SQLite and PostgreSQL).
PATIENT_COUNTS = ("UPDATE patients SET num_studies = (SELECT count(*) FROM studies s WHERE s.patient_id = "
                  "patients.patient_id), num_series = (SELECT coalesce(sum(num_series), 0) FROM studies s WHERE "
                  "s.patient_id = patients.patient_id)")


def batches(studies: list[Study], batch: int) -> Iterator[tuple[dict[str, list[tuple[Any, ...]]], int]]:
    """The plan's rows (:func:`_rows`) by table, in the order of :data:`INSERTS` (parents first), ``batch``
    instances at a time, each with the number of instances given so far (the dict is emptied and reused)."""
    pending: dict[str, list[tuple[Any, ...]]] = {t: [] for t in INSERTS}
    done = 0
    for table, row in _rows(studies, time.time_ns() - 10**15):
        pending[table].append(row)
        if table == "changes":  # an instance's last row
            done += 1
            if done % batch == 0:
                yield pending, done
                for rows in pending.values():
                    rows.clear()
    if any(pending.values()):
        yield pending, done


def fill_index(index_path: Path, studies: list[Study], batch: int = 50_000) -> None:
    """Write the plan's rows into the index file directly (benchmark-only fast path)."""
    SqliteIndex(str(index_path)).close()  # creates or migrates the schema, exactly as the server would
    conn = sqlite3.connect(index_path, isolation_level=None)
    conn.execute("PRAGMA journal_mode=WAL")
    conn.execute("PRAGMA synchronous=OFF")
    conn.execute("PRAGMA cache_size=-262144")
    if conn.execute("SELECT count(*) FROM instances").fetchone()[0]:
        raise SystemExit(f"{index_path} already holds instances: use an empty data directory")
    done, t0 = 0, time.monotonic()
    for pending, done in batches(studies, batch):
        conn.execute("BEGIN")
        for table, rows in pending.items():
            if rows:
                conn.executemany(INSERTS[table], rows)
        conn.execute("COMMIT")
        print(f"  {done:,} instances indexed ({time.monotonic() - t0:.0f} s)", flush=True)
    conn.execute("BEGIN")
    conn.execute(PATIENT_COUNTS)
    refresh_study_summaries(conn)  # ModalitiesInStudy / SOPClassesInStudy, as record() keeps them
    conn.execute("COMMIT")
    conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
    conn.close()
    print(f"  index filled: {done:,} instances in {time.monotonic() - t0:.0f} s", flush=True)


def store_showcase(data: Path, instances: int) -> None:
    """Store the showcase series through the real ingest path (``Archive.ingest.store_bytes``)."""
    from bastion.archive import Archive
    from bastion.settings import load_settings

    archive = Archive.open(load_settings(None, data=str(data)))
    try:
        study = showcase(instances)
        t0 = time.monotonic()
        for number in range(1, instances + 1):
            archive.ingest.store_bytes(part10(dataset(study, study.series[0], number, size=512)), "bench:bulkload")
        print(f"  showcase: {instances} CT instances stored in {time.monotonic() - t0:.0f} s", flush=True)
    finally:
        archive.close()


def write_files(out: Path, studies: list[Study], showcase_instances: int) -> int:
    """Write the plan as Part 10 files (``out/plan``) and the showcase series (``out/showcase``)."""
    (out / "plan").mkdir(parents=True, exist_ok=True)
    (out / "showcase").mkdir(parents=True, exist_ok=True)
    n = 0
    for study in studies:
        for series in study.series:
            for number in range(1, series.count + 1):
                path = out / "plan" / f"{n:07d}.dcm"
                if not path.exists():
                    path.write_bytes(part10(dataset(study, series, number)))
                n += 1
    study = showcase(showcase_instances)
    for number in range(1, showcase_instances + 1):
        path = out / "showcase" / f"{number:05d}.dcm"
        if not path.exists():
            path.write_bytes(part10(dataset(study, study.series[0], number, size=512)))
    (out / "COMPLETE").write_text(f"{len(studies)} studies, {n} + {showcase_instances} instances\n")
    return n


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    where = parser.add_mutually_exclusive_group(required=True)
    where.add_argument("--data", type=Path, help="Bastion data directory to fill (index rows + showcase)")
    where.add_argument("--files", type=Path, help="write Part 10 files instead (for storescu uploads)")
    parser.add_argument("--count", type=int, default=1_000_000, help="planned instances (default 1,000,000)")
    parser.add_argument("--showcase", type=int, default=1000, help="instances in the real CT series")
    args = parser.parse_args()
    t0 = time.monotonic()
    studies = plan(args.count)
    print(f"plan: {len(studies):,} studies, {len({s.patient.id for s in studies}):,} patients, "
          f"{sum(len(s.series) for s in studies):,} series, {args.count:,} instances", flush=True)
    self_check(studies)
    if args.files:
        n = write_files(args.files, studies, args.showcase)
        print(f"wrote {n:,} + {args.showcase} files under {args.files} in {time.monotonic() - t0:.0f} s")
        return
    from bastion.settings import load_settings

    args.data.mkdir(parents=True, exist_ok=True)
    fill_index(Path(load_settings(None, data=str(args.data)).index_location), studies)
    if args.showcase:
        store_showcase(args.data, args.showcase)
    print(f"done in {time.monotonic() - t0:.0f} s: {args.data}")


if __name__ == "__main__":
    main()
