"""``Archive.capabilities()``: which implementation runs each part with a compiled twin, as the web and CLI
layers report it (``/api/statistics``, the admin page, ``bastion serve``'s start), without importing the
extensions' modules."""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bastion.archive import Archive, Capabilities
from bastion.settings import load_settings

_REPORT = """
import dataclasses, json, sys
from bastion.archive import Archive
from bastion.settings import load_settings
archive = Archive.open(load_settings(None, data=sys.argv[1]))
try:
    print(json.dumps(dataclasses.asdict(archive.capabilities())))
finally:
    archive.close()
"""


def _report(data: Path, pure_python: bool) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k != "BASTION_PURE_PYTHON"}
    if pure_python:
        env["BASTION_PURE_PYTHON"] = "1"
    out = subprocess.run([sys.executable, "-c", _REPORT, str(data)], env=env, capture_output=True, text=True,
                         timeout=60, check=True).stdout
    return json.loads(out.splitlines()[-1])  # type: ignore[no-any-return]


@pytest.mark.skipif(bool(os.environ.get("BASTION_PURE_PYTHON")), reason="the extensions are not loaded on purpose")
def test_a_built_archive_runs_every_compiled_part(tmp_path: Path) -> None:
    assert _report(tmp_path / "data", pure_python=False) == {
        "header_scan": "compiled", "blob_write": "compiled", "index_record": "compiled"}


def test_with_pure_python_every_part_says_python(tmp_path: Path) -> None:
    assert _report(tmp_path / "data", pure_python=True) == {
        "header_scan": "python", "blob_write": "python", "index_record": "python"}


def test_capabilities_cannot_be_changed_by_their_reader(tmp_path: Path) -> None:
    archive = Archive.open(load_settings(None, data=str(tmp_path / "data")))
    try:
        parts = archive.capabilities()
    finally:
        archive.close()
    assert isinstance(parts, Capabilities)
    with pytest.raises(dataclasses.FrozenInstanceError):
        parts.header_scan = "python"  # type: ignore[misc]
