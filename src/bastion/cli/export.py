"""``bastion export``: studies written out as DICOM Part 10 files, as stored or de-identified (PS3.15 Annex E)."""

from __future__ import annotations

import argparse
import getpass
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

from tqdm import tqdm

from bastion.archive import Archive
from bastion.audit import AuditEvent, AuditKind, Outcome
from bastion.cli.serve import settings_from
from bastion.errors import BastionError
from bastion.model.records import InstanceRecord
from bastion.query.deidentify import Deidentifier, load_secret
from bastion.query.export import ExportEntry, Exporter, ExportReport, write_folder, write_report, write_zip

#: The ZIP written into the output folder with ``--zip``.
ZIP_NAME = "bastion-export.zip"


def add_parser(sub: Any, common: Callable[[argparse.ArgumentParser], None]) -> None:
    """Register ``bastion export``."""
    p = sub.add_parser("export", help="write studies out as DICOM files, as stored or de-identified",
                       description="Write the current instances of each study as DICOM Part 10 files under "
                       "OUT/<patient>/<study>/<series>/<instance>.dcm (no DICOMDIR), with export-report.json. "
                       "--deidentify applies PS3.15 Annex E's Basic Application Level Confidentiality Profile "
                       "with modified dates and consistent UIDs (docs/export.md); instances likely to carry "
                       "burned-in text are then left out unless --include-burned-in. Exit status 2 for an "
                       "unknown study or a bad UID (nothing is written then).")
    common(p)
    p.add_argument("--study", action="append", required=True, metavar="UID",
                   help="a Study Instance UID (repeatable)")
    p.add_argument("--out", required=True, metavar="DIR", help="output folder (made if missing)")
    p.add_argument("--deidentify", action="store_true", help="de-identify (PS3.15 Annex E, see docs/export.md)")
    p.add_argument("--include-burned-in", action="store_true",
                   help="with --deidentify: export instances that may carry burned-in text too (their pixels "
                   "are not scrubbed)")
    p.add_argument("--zip", action="store_true", help=f"write OUT/{ZIP_NAME} instead of the folder of files")


def _progress(entries: Iterator[ExportEntry], total: int) -> Iterator[ExportEntry]:
    with tqdm(total=total, desc="exporting", unit=" instances", file=sys.stderr, disable=None) as bar:
        for entry in entries:
            yield entry
            bar.update(1)


def _audit(archive: Archive, report: ExportReport, studies: list[str], out: Path, outcome: Outcome) -> None:
    """One audit event per study (PS3.15 A.5.3.4 Export)."""
    user = getpass.getuser()
    for study in studies:
        patient, count = report.per_study.get(study, ("", 0))
        archive.audit.record(AuditEvent(kind=AuditKind.EXPORT, outcome=outcome, action="R", user=user,
                                        address="localhost", destination=str(out.resolve()), via="cli", patient_id=patient,
                                        studies=(study,), count=count,
                                        detail="deidentified" if report.deidentified else "identified"))


def run_export(args: argparse.Namespace) -> int:
    """Entry point of ``bastion export``: 0 when every study was exported (burned-in instances left out by
    design included); 1 when an instance could not be decoded or de-identified (left out, listed in the report);
    2 (through :class:`BastionError`) for a study that is not there or not a UID, or a failed read or write."""
    settings = settings_from(args)
    out = Path(args.out)
    archive = Archive.open(settings)
    try:
        try:
            deidentifier = Deidentifier(load_secret(settings.data)) if args.deidentify else None
        except ValueError as exc:
            raise BastionError(str(exc)) from None
        exporter = Exporter(archive.retriever, deidentifier, include_burned_in=args.include_burned_in)
        records: list[InstanceRecord] = []
        for study in dict.fromkeys(args.study):
            records += exporter.study_records(study)  # every study checked before anything is written
        out.mkdir(parents=True, exist_ok=True)
        entries = _progress(exporter.entries(records), len(records))
        report = exporter.report
        try:
            if args.zip:
                write_zip(entries, report, out / ZIP_NAME)
            else:
                write_folder(entries, out)
            write_report(report, out)
        except (BastionError, OSError, ValueError) as exc:
            _audit(archive, report, list(dict.fromkeys(args.study)), out, Outcome.SERIOUS_FAILURE)
            if isinstance(exc, BastionError):
                raise
            raise BastionError(f"export to {out} failed: {exc}") from exc
        _audit(archive, report, list(dict.fromkeys(args.study)), out, Outcome.SUCCESS)
    finally:
        archive.close()
    where = out / ZIP_NAME if args.zip else out
    print(f"exported {report.exported} instance(s) of {len(report.per_study)} study(ies) to {where}"
          f"{' (de-identified)' if report.deidentified else ''}; report: {out / 'export-report.json'}")
    if report.burned_in:
        left = report.left_out
        print(f"WARNING: {len(report.burned_in)} instance(s) may carry burned-in annotation (text in the pixels, "
              f"which export does not remove): " + (f"{left} left out (--include-burned-in to export them)"
                                                    if left else "exported as asked"), file=sys.stderr)
        for item in report.burned_in[:20]:
            print(f"  {item['sop_instance_uid']}: {item['reason']}", file=sys.stderr)
    if report.failed:
        print(f"ERROR: {len(report.failed)} instance(s) could not be decoded or de-identified and were left out "
              f"(listed in the report):", file=sys.stderr)
        for failed in report.failed[:20]:
            print(f"  {failed['sop_instance_uid']}: {failed['reason']}", file=sys.stderr)
        return 1
    return 0
