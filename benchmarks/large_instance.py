"""Large-instance benchmark: store a ~1 GB multi-frame instance over DIMSE and fetch it back with C-GET.

Prints the server's peak RSS (all processes) while ingesting, the ingest and retrieval times, and whether
the retrieved dataset is byte-identical. ``write_large_instance`` is also used by the integration test.

Usage: ``python benchmarks/large_instance.py [--mb 1024] [--workdir DIR]``
"""

from __future__ import annotations

import argparse
import os
import struct
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.uid import ExplicitVRLittleEndian, generate_uid

sys.path.insert(0, str(Path(__file__).resolve().parent))

import servers  # noqa: E402

MULTIFRAME_GRAYSCALE_WORD = "1.2.840.10008.5.1.4.1.1.7.3"


def write_large_instance(path: Path, frames: int, rows: int = 512, columns: int = 512) -> str:
    """Write a multi-frame 16-bit instance of ``frames`` frames, streaming the pixel data; return its SOP UID."""
    sop_uid = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    meta = FileMetaDataset()
    meta.MediaStorageSOPClassUID = MULTIFRAME_GRAYSCALE_WORD
    meta.MediaStorageSOPInstanceUID = sop_uid
    meta.TransferSyntaxUID = ExplicitVRLittleEndian
    ds = Dataset()
    ds.file_meta = meta
    ds.SOPClassUID = MULTIFRAME_GRAYSCALE_WORD
    ds.SOPInstanceUID = sop_uid
    ds.StudyInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    ds.SeriesInstanceUID = generate_uid(prefix="1.2.826.0.1.3680043.8.498.")
    ds.PatientName = "Large^Multiframe"
    ds.PatientID = "LARGE0001"
    ds.StudyDate, ds.StudyTime, ds.Modality = "20240101", "120000", "OT"
    ds.SeriesNumber, ds.InstanceNumber = 1, 1
    ds.SamplesPerPixel, ds.PhotometricInterpretation = 1, "MONOCHROME2"
    ds.NumberOfFrames, ds.Rows, ds.Columns = frames, rows, columns
    ds.BitsAllocated, ds.BitsStored, ds.HighBit, ds.PixelRepresentation = 16, 16, 15, 0
    with open(path, "wb") as fh:
        pydicom.dcmwrite(fh, ds, enforce_file_format=True)
        frame_bytes = rows * columns * 2
        fh.write(struct.pack("<HH2s2xI", 0x7FE0, 0x0010, b"OW", frames * frame_bytes))
        base = np.arange(rows * columns, dtype=np.uint16).reshape(rows, columns)
        for i in range(frames):
            fh.write(((base + i * 7) % 4096).astype("<u2").tobytes())
    return sop_uid


def dataset_bytes(path: Path) -> bytes:
    """The dataset part of a Part 10 file (after the File Meta Information)."""
    with open(path, "rb") as fh:
        head = fh.read(144)
        group_length = struct.unpack_from("<I", head, 140)[0]
        fh.seek(144 + group_length)
        return fh.read()


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--mb", type=int, default=1024, help="pixel data size in MiB (default 1024)")
    parser.add_argument("--workdir", type=Path, help="where to put the instance and the server's data")
    args = parser.parse_args()
    env = {**os.environ, "TCP_NODELAY": "1"}
    with tempfile.TemporaryDirectory(dir=args.workdir) as tmp:
        work = Path(tmp)
        frames = max(1, args.mb * 1024 * 1024 // (512 * 512 * 2))
        source = work / "large.dcm"
        sop_uid = write_large_instance(source, frames)
        size_mb = source.stat().st_size / 2**20
        with servers.bastion(base_dir=work) as server:
            baseline = server.peak_rss_bytes
            t0 = time.perf_counter()
            subprocess.run(["/usr/bin/storescu", "-aec", server.aet, "127.0.0.1", str(server.dicom_port),
                            str(source)], check=True, env=env)
            ingest_s = time.perf_counter() - t0
            peak_ingest = server.peak_rss_bytes
            out = work / "got"
            out.mkdir()
            t0 = time.perf_counter()
            subprocess.run(["/usr/bin/getscu", "-aec", server.aet, "-od", str(out), "-k", "QueryRetrieveLevel=IMAGE",
                            "-k", f"SOPInstanceUID={sop_uid}", "-S", "-k",
                            f"StudyInstanceUID={pydicom.dcmread(source, stop_before_pixels=True).StudyInstanceUID}",
                            "-k", "SeriesInstanceUID="
                            f"{pydicom.dcmread(source, stop_before_pixels=True).SeriesInstanceUID}",
                            "127.0.0.1", str(server.dicom_port)], check=True, env=env)
            get_s = time.perf_counter() - t0
            got = next(out.iterdir())
            identical = dataset_bytes(got) == dataset_bytes(source)
            peak_all = server.peak_rss_bytes
        print(f"instance: {size_mb:.0f} MiB, {frames} frames of 512x512x16 bit")
        print(f"server RSS at start {baseline / 2**20:.0f} MiB, peak while ingesting {peak_ingest / 2**20:.0f} MiB, "
              f"peak overall {peak_all / 2**20:.0f} MiB")
        print(f"C-STORE {ingest_s:.1f} s ({size_mb / ingest_s:.0f} MiB/s), C-GET {get_s:.1f} s "
              f"({size_mb / get_s:.0f} MiB/s), retrieved dataset byte-identical: {identical}")
        return 0 if identical else 1


if __name__ == "__main__":
    sys.exit(main())
