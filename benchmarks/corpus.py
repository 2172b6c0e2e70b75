"""Deterministic synthetic DICOM corpora for the benchmarks.

Two kinds, both CT Image Storage, explicit VR little endian, valid Part 10 files with file meta:

* ``small``: 64x64 MONOCHROME2, 16 bits allocated (about 8 KB per file);
* ``ct``: 512x512 MONOCHROME2, 16 bits allocated (about 0.5 MB per file).

Instances are spread over ``STUDIES`` studies x ``SERIES_PER_STUDY`` series (two studies per patient). Every
UID is derived from a counter, pixel data from a fixed seed, and no attribute depends on the clock, so the same
``(kind, count)`` always produces byte-identical files. The output directory holds only ``*.dcm`` files, so it
can be given to ``storescu +sd +r`` as is.

Usage: ``python benchmarks/corpus.py --kind small --count 1000 --out DIR``
"""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID, CTImageStorage, ExplicitVRLittleEndian

UID_ROOT = "1.2.826.0.1.3680043.8.498.4242."  # pydicom's root + a benchmark branch
STUDIES = 10
SERIES_PER_STUDY = 2
SEED = 20240501


@dataclass(frozen=True)
class Kind:
    """Image geometry of one corpus kind."""

    code: int
    size: int


KINDS: dict[str, Kind] = {"small": Kind(code=1, size=64), "ct": Kind(code=2, size=512)}


def uid(kind: Kind, *parts: int) -> str:
    """Return a deterministic UID under ``UID_ROOT`` for the given counters."""
    return UID_ROOT + ".".join(str(p) for p in (kind.code, *parts))


def pixels(kind: Kind, index: int) -> np.ndarray:
    """Return a CT-like 12-bit phantom (a water disc in air, plus noise) as ``uint16``."""
    n = kind.size
    yy, xx = np.mgrid[0:n, 0:n]
    r2 = (xx - n / 2) ** 2 + (yy - n / 2) ** 2
    image = np.where(r2 < (0.42 * n) ** 2, 1024.0, 24.0)  # stored values; intercept -1024 -> 0 HU / -1000 HU
    image[r2 < (0.08 * n) ** 2] = 1024.0 + 700.0  # a "bone" core
    noise = np.random.default_rng(SEED + index).normal(0.0, 12.0, size=(n, n))
    return np.clip(image + noise, 0, 4095).astype(np.uint16)


def make_instance(kind: Kind, index: int, count: int) -> Dataset:
    """Build instance ``index`` of a corpus of ``count`` instances."""
    n_series = STUDIES * SERIES_PER_STUDY
    series_global = index * n_series // count
    study, series = divmod(series_global, SERIES_PER_STUDY)
    first_in_series = -(-series_global * count // n_series)  # ceil: first index mapped to this series
    number = index - first_in_series + 1
    patient = study // 2
    study_date = f"2023{1 + study % 12:02d}{10 + study:02d}"

    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = CTImageStorage
    meta.MediaStorageSOPInstanceUID = uid(kind, study, series, number)
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID

    ds = Dataset()
    ds.file_meta = meta
    ds.SpecificCharacterSet = "ISO_IR 100"
    ds.ImageType = ["ORIGINAL", "PRIMARY", "AXIAL"]
    ds.SOPClassUID = CTImageStorage
    ds.SOPInstanceUID = meta.MediaStorageSOPInstanceUID
    ds.StudyDate = ds.SeriesDate = ds.ContentDate = study_date
    ds.StudyTime = f"{8 + study % 10:02d}0000"  # one per study, as a modality sends it (see GENERATION)
    ds.SeriesTime = f"{8 + study % 10:02d}{series * 10:02d}00"
    ds.ContentTime = f"{8 + study % 10:02d}{series * 10:02d}{number % 60:02d}"
    ds.AccessionNumber = f"ACC{study:06d}"
    ds.Modality = "CT"
    ds.Manufacturer = "Bastion Benchmarks"
    ds.InstitutionName = "Synthetic General Hospital"
    ds.ReferringPhysicianName = "Referrer^Rita"
    ds.StudyDescription = f"CT CHEST ABDOMEN {study}"
    ds.SeriesDescription = ("Axial 5mm", "Axial 1mm")[series % 2]
    ds.PatientName = f"Bench^Patient{patient:03d}"
    ds.PatientID = f"BENCH{patient:05d}"
    ds.PatientBirthDate = f"19{50 + patient:02d}0{1 + patient % 9}15"
    ds.PatientSex = "FM"[patient % 2]
    ds.BodyPartExamined = "CHEST"
    ds.SliceThickness = "5" if series % 2 == 0 else "1"
    ds.KVP = "120"
    ds.PatientPosition = "HFS"
    ds.StudyInstanceUID = uid(kind, study)
    ds.SeriesInstanceUID = uid(kind, study, series)
    ds.StudyID = str(study + 1)
    ds.SeriesNumber = series + 1
    ds.InstanceNumber = number
    ds.ImagePositionPatient = [-0.5 * kind.size, -0.5 * kind.size, -2.5 * number]
    ds.ImageOrientationPatient = [1, 0, 0, 0, 1, 0]
    ds.FrameOfReferenceUID = uid(kind, study, series, 0)
    ds.SliceLocation = -2.5 * number
    ds.SamplesPerPixel = 1
    ds.PhotometricInterpretation = "MONOCHROME2"
    ds.Rows = ds.Columns = kind.size
    ds.PixelSpacing = [round(350 / kind.size, 4)] * 2
    ds.BitsAllocated = 16
    ds.BitsStored = 12
    ds.HighBit = 11
    ds.PixelRepresentation = 0
    ds.WindowCenter = "40"
    ds.WindowWidth = "400"
    ds.RescaleIntercept = "-1024"
    ds.RescaleSlope = "1"
    ds.RescaleType = "HU"
    ds.PixelData = pixels(kind, index).tobytes()
    return ds


def corpus_files(out: Path) -> list[Path]:
    """Return the sorted ``*.dcm`` files of a corpus directory."""
    return sorted(out.glob("*.dcm"))


#: Bumped whenever what make_instance writes changes, so that cached corpora are made again. 2: StudyTime is the
#: same in both series of a study (it was each series' time: every instance of a study's second series then
#: changed the study's attributes, which no modality does, and made Bastion rewrite the study's row each time).
GENERATION = 2


def _generation_file(out: Path) -> Path:
    """Where the generation of the corpus in ``out`` is written: beside it, not in it (``storescu +sd`` sends the
    whole directory)."""
    return out.parent / f"{out.name}.generation"


def is_complete(kind: Kind, count: int, out: Path) -> bool:
    """Tell whether ``out`` already holds a corpus of this kind, count and :data:`GENERATION`."""
    files = corpus_files(out)
    if len(files) != count or count == 0:
        return False
    marker = _generation_file(out)
    if not marker.exists() or marker.read_text().strip() != str(GENERATION):
        return False
    first = pydicom.dcmread(files[0], stop_before_pixels=True)
    return int(first.Rows) == kind.size and str(first.SOPInstanceUID).startswith(uid(kind) + ".")


def ensure_corpus(kind_name: str, count: int, out: Path) -> list[Path]:
    """Generate the corpus into ``out`` unless it is already there; return its files in order."""
    kind = KINDS[kind_name]
    out.mkdir(parents=True, exist_ok=True)
    if not is_complete(kind, count, out):
        for stale in corpus_files(out):
            stale.unlink()
        for index in range(count):
            final = out / f"{index:06d}.dcm"
            partial = out / f"{index:06d}.partial"  # renamed below, so a finished corpus has only .dcm files
            make_instance(kind, index, count).save_as(partial, enforce_file_format=True)
            os.replace(partial, final)
        _generation_file(out).write_text(f"{GENERATION}\n")
    return corpus_files(out)


def main() -> None:
    """Command-line entry point."""
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--kind", choices=sorted(KINDS), required=True)
    parser.add_argument("--count", type=int, default=1000)
    parser.add_argument("--out", type=Path, required=True)
    args = parser.parse_args()
    files = ensure_corpus(args.kind, args.count, args.out)
    size = sum(f.stat().st_size for f in files)
    print(f"{len(files)} {args.kind} instances, {size / 1e6:.1f} MB in {args.out}")


if __name__ == "__main__":
    main()
