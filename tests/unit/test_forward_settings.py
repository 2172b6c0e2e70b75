"""``[[forward]]`` rules in the settings (:class:`bastion.model.remotes.ForwardRule`) and their matching."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.forward.rules import source_aet
from bastion.model.matching import matches
from bastion.model.part10 import file_meta_bytes
from bastion.model.remotes import ForwardRule
from bastion.settings import SettingsError, load_settings

pytestmark = pytest.mark.timeout(10)


def _load(tmp_path: Path, text: str) -> tuple[ForwardRule, ...]:
    path = tmp_path / "bastion.toml"
    path.write_text(text)
    return load_settings(path, env={}).forward


def test_rules_from_toml(tmp_path: Path) -> None:
    ct, web = _load(tmp_path, '[[forward]]\nname = "ct"\nto = "DEST@10.0.0.1:104"\n'
                              'match = { Modality = "CT", CallingAETitle = "CT*", StudyDescription = ["A", "B"] }\n'
                              '[[forward]]\nto = "https://pacs.example.org/dicom-web/"\n')
    assert (ct.name, ct.remote and ct.remote.port, ct.stow_url) == ("ct", 104, "")
    assert ct.match == (("Modality", "CT"), ("CallingAETitle", "CT*"), ("StudyDescription", "A\\B"))
    assert (web.name, web.remote, web.stow_url) == ("https://pacs.example.org/dicom-web/", None,
                                                    "https://pacs.example.org/dicom-web")


def test_rules_from_the_environment() -> None:
    rules = load_settings(env={"BASTION_FORWARD": "A@h:1, http://x:8080/dicom-web"}).forward
    assert [r.to for r in rules] == ["A@h:1", "http://x:8080/dicom-web"]


@pytest.mark.parametrize(("rule", "says"), [
    ('to = "nowhere"', "neither AET@HOST:PORT nor"),
    ('to = "ftp://x/dicom-web"', "neither AET@HOST:PORT nor"),
    ('to = "WAYTOOLONGAETITLE1@h:1"', "neither AET@HOST:PORT nor"),
    ('to = "A@h:1"\nmatch = { PatientName = "X*" }', "cannot match on 'PatientName'"),
    ('to = "A@h:1"\nmatch = { SOPClassUID = "1.2.x" }', "not a valid UID"),
    ('to = "A@h:1"\nmatch = { Modality = "" }', "non-empty"),
    ('to = "A@h:1"\nwhere = "x"', "unknown key(s) where"),
])
def test_a_bad_rule_is_refused_at_load(tmp_path: Path, rule: str, says: str) -> None:
    with pytest.raises(SettingsError, match=says.replace("(", r"\(").replace(")", r"\)")):
        _load(tmp_path, f"[[forward]]\n{rule}\n")


def test_two_rules_of_one_name_must_go_to_one_place(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="named 'x'"):
        _load(tmp_path, '[[forward]]\nname = "x"\nto = "A@h:1"\n[[forward]]\nname = "x"\nto = "B@h:1"\n')


def test_match_values_use_dicom_wildcards(tmp_path: Path) -> None:
    [rule] = _load(tmp_path, '[[forward]]\nto = "A@h:1"\nmatch = { StationName = "CT?-*", Modality = "CT\\\\MR" }')
    station, modality = rule.conditions()
    assert matches(station, {"vr": "SH", "Value": ["CT1-EAST"]})
    assert not matches(station, {"vr": "SH", "Value": ["CT12-EAST"]})
    assert matches(modality, {"vr": "CS", "Value": ["MR"]}) and not matches(modality, None)


def test_the_calling_ae_is_read_from_the_stored_file_meta() -> None:
    head = file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1", "CT_EAST")
    assert source_aet(head + b"\x08\x00") == "CT_EAST"
    assert source_aet(file_meta_bytes("1.2.840.10008.5.1.4.1.1.2", "1.2.3", "1.2.840.10008.1.2.1")) == ""
    assert source_aet(b"not dicom") == ""
