"""The documentation names every setting and every CLI command (a missing one fails here)."""

from __future__ import annotations

from dataclasses import fields
from pathlib import Path

from bastion.cli.main import build_parser
from bastion.dimse.negotiation import SERVICE_CLASSES
from bastion.settings import Settings

ROOT = Path(__file__).resolve().parents[2]


def test_every_setting_is_documented() -> None:
    doc = (ROOT / "docs" / "configuration.md").read_text()
    missing = [f.name for f in fields(Settings) if f"`{f.name}`" not in doc]
    assert not missing, f"settings missing from docs/configuration.md: {missing}"
    env_missing = [f.name for f in fields(Settings)
                   if f"BASTION_{f.name.upper()}" not in doc]
    assert not env_missing, f"environment variables missing from docs/configuration.md: {env_missing}"


def test_every_command_is_in_the_readme() -> None:
    readme = (ROOT / "README.md").read_text()
    parser = build_parser()
    commands = parser._subparsers._group_actions[0].choices  # type: ignore[union-attr]
    for name in commands:
        assert f"bastion {name}" in readme, f"`bastion {name}` is not in the README"


def test_serve_help_documents_the_environment() -> None:
    parser = build_parser()
    serve = parser._subparsers._group_actions[0].choices["serve"]  # type: ignore[union-attr]
    text = serve.format_help()
    for var in ("BASTION_DATA", "BASTION_AET", "BASTION_DICOM_PORT", "BASTION_HTTP_PORT", "BASTION_REMOTES"):
        assert var in text


def test_conformance_statement_lists_every_service_class() -> None:
    """Every SOP class the negotiation accepts besides storage is in the conformance statement's table."""
    doc = (ROOT / "docs" / "conformance.md").read_text()
    missing = sorted(uid for uid in SERVICE_CLASSES if f"`{uid}`" not in doc)
    assert not missing, f"SOP classes missing from docs/conformance.md: {missing}"
