"""Routing by the ``[[forward]]`` rules (:class:`bastion.forward.rules.Router`) on an archive in this process."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pydicom
import pytest
from conftest import make_study

from bastion.forward.rules import Router
from bastion.index.base import Change
from bastion.model.remotes import ForwardRule

pytestmark = pytest.mark.timeout(30)


def _rule(name: str, **match: str) -> ForwardRule:
    return ForwardRule.parse({"name": name, "to": "DEST@127.0.0.1:104", "match": match})


def test_each_change_goes_where_its_rules_match(archive: Any, tmp_path: Path) -> None:
    study = make_study(tmp_path / "in", series=2, per_series=1, modality=("CT", "MR"), description="HEAD SCAN")
    ct, mr = study.files
    ds = pydicom.dcmread(ct)
    ds.file_meta.SourceApplicationEntityTitle = "CT_EAST"  # kept as stored: it is the file's own File Meta
    ds.save_as(ct, enforce_file_format=True)
    for path in (ct, mr):
        archive.ingest.store_bytes(path.read_bytes(), "test")
    router = Router([_rule("ct", Modality="CT"), _rule("heads", StudyDescription="*HEAD*"),
                     _rule("east", CallingAETitle="CT_E*"), _rule("images", SOPClassUID="1.2.840.10008.5.1.4.1.1.2"),
                     _rule("station", StationName="NOWHERE")], archive.index, archive.blobs)
    changes = archive.index.changes_after(archive.index.log_start(), 10).changes
    routed = {c.series_uid: router.route(c) for c in changes}
    ct_series, mr_series = study.series
    assert routed[ct_series] == ["ct", "heads", "east", "images"]
    assert routed[mr_series] == ["heads", "images"]  # corpus instances are CT Image Storage whatever the modality
    assert router.destinations == ["ct", "heads", "east", "images", "station"]


def test_an_unreadable_object_matches_no_calling_ae_rule(archive: Any) -> None:
    router = Router([_rule("east", CallingAETitle="CT*")], archive.index, archive.blobs)
    gone = Change(1, "stored", "1.2.3", "1.2", "1", "2026/01/01/00/1.2.3_00000000000000000001_b3-00.dcm", "")
    assert router.route(gone) == []
