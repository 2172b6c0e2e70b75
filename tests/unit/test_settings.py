"""Settings: defaults < TOML file < BASTION_* environment < flags (bastion.settings)."""

from __future__ import annotations

from pathlib import Path

import pytest

from bastion.model.remotes import RemoteAE, check_aet
from bastion.settings import Settings, SettingsError, load_settings

pytestmark = pytest.mark.timeout(10)


def _toml(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "bastion.toml"
    path.write_text(text)
    return path


def test_defaults_without_file_or_environment() -> None:
    s = load_settings(env={})
    d = Settings()
    assert (s.aet, s.host, s.dicom_port, s.http_port, s.remotes) == (d.aet, d.host, d.dicom_port, d.http_port, ())
    assert s.index_location == str(s.data / "index.sqlite3")
    assert s.blob_locations == (str(s.data / "blobs"),)


def test_precedence_file_then_environment_then_flags(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'aet = "FROMFILE"\ndicom_port = 1001\nhttp_port = 2001\nhost = "10.1.1.1"\n'
                          'data = "/file/data"\n')
    env = {"BASTION_DICOM_PORT": "1002", "BASTION_HTTP_PORT": "2002", "BASTION_DATA": "/env/data"}
    s = load_settings(cfg, env=env, http_port=2003, aet=None)
    assert s.aet == "FROMFILE"  # only in the file; a None flag is ignored
    assert s.host == "10.1.1.1"
    assert s.dicom_port == 1002  # environment beats the file
    assert s.http_port == 2003  # the flag beats both
    assert s.data == Path("/env/data")
    assert s.index_location == "/env/data/index.sqlite3"


def test_config_file_from_environment(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'aet = "VIAENV"\n')
    assert load_settings(env={"BASTION_CONFIG": str(cfg)}).aet == "VIAENV"


def test_environment_values_are_coerced() -> None:
    s = load_settings(env={"BASTION_MAX_PDU": "65536", "BASTION_CORS_ORIGINS": "https://a.org, https://b.org",
                           "BASTION_INDEX": "/x/index.db"})
    assert s.max_pdu == 65536
    assert s.cors_origins == ("https://a.org", "https://b.org")
    assert s.index_location == "/x/index.db"


def test_settings_are_frozen() -> None:
    s = load_settings(env={})
    with pytest.raises(AttributeError):
        s.aet = "OTHER"  # type: ignore[misc]


@pytest.mark.parametrize("aet", ["", "   ", "SEVENTEEN_CHARS_X", "BACK\\SLASH", "TAB\tAE", "NUL\x00"])
def test_bad_ae_title_is_refused(aet: str) -> None:
    with pytest.raises(SettingsError):
        check_aet(aet)
    with pytest.raises(SettingsError):
        load_settings(env={}, aet=aet)


def test_bad_ae_title_from_environment_is_refused() -> None:
    with pytest.raises(SettingsError):
        load_settings(env={"BASTION_AET": "WAY_TOO_LONG_AE_TITLE"})


def test_good_ae_titles() -> None:
    assert check_aet("A") == "A"
    assert check_aet("SIXTEEN_CHARS_AE") == "SIXTEEN_CHARS_AE"
    assert check_aet("PACS ") == "PACS"


def test_unknown_key_in_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="dicom_prot"):
        load_settings(_toml(tmp_path, "dicom_prot = 104\n"), env={})


def test_unreadable_or_invalid_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        load_settings(tmp_path / "missing.toml", env={})
    with pytest.raises(SettingsError):
        load_settings(_toml(tmp_path, "aet = \n"), env={})


def test_bad_integer_is_refused() -> None:
    with pytest.raises(SettingsError):
        load_settings(env={"BASTION_DICOM_PORT": "eleven"})


# -- remotes --------------------------------------------------------------------------------------------
def test_remote_parse() -> None:
    assert RemoteAE.parse("WS1@10.0.0.5:104") == RemoteAE("WS1", "10.0.0.5", 104)
    assert RemoteAE.parse("  WS1@host.example:11112 ") == RemoteAE("WS1", "host.example", 11112)
    tls = RemoteAE.parse("VNA@tls://vna.example.org:2762")
    assert tls == RemoteAE("VNA", "vna.example.org", 2762, tls=True) and not RemoteAE.parse("WS1@h:1").tls
    assert str(tls) == "VNA@tls://vna.example.org:2762" and str(RemoteAE("WS1", "h", 1)) == "WS1@h:1"


def test_tls_remotes_from_the_file_the_environment_and_forward_rules(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, '[remotes]\nVNA = "tls://10.0.0.1:2762"\nWS = "10.0.0.2:104"\n'
                          '[[forward]]\nto = "CENTRAL@tls://10.0.0.9:2762"\n')
    s = load_settings(cfg, env={})
    assert {r.aet: r.tls for r in s.remotes} == {"VNA": True, "WS": False}
    assert s.forward[0].remote == RemoteAE("CENTRAL", "10.0.0.9", 2762, tls=True)
    s = load_settings(cfg, env={"BASTION_REMOTES": "ENVAE@tls://10.0.0.3:105"})
    assert s.remotes == (RemoteAE("ENVAE", "10.0.0.3", 105, tls=True),)


@pytest.mark.parametrize("text", ["WS1", "WS1@host", "WS1@host:port", "@host:104", "WAY_TOO_LONG_AE_TITLE@h:1",
                                  "BAD\\AE@h:1", "WS1@ssl://host:104", "WS1@tls://host", "WS1@tls:/host:104"])
def test_bad_remote_is_refused(text: str) -> None:
    with pytest.raises(SettingsError):
        RemoteAE.parse(text)


def test_remotes_from_file_environment_and_flags(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, '[remotes]\nFILEAE = "10.0.0.1:104"\nSHARED = "10.0.0.2:104"\n')
    s = load_settings(cfg, env={})
    assert {r.aet: (r.host, r.port) for r in s.remotes} == {"FILEAE": ("10.0.0.1", 104),
                                                             "SHARED": ("10.0.0.2", 104)}
    # The environment replaces the file's remotes ...
    s = load_settings(cfg, env={"BASTION_REMOTES": "ENVAE@10.0.0.3:105, SHARED@10.0.0.4:106"})
    assert {r.aet: (r.host, r.port) for r in s.remotes} == {"ENVAE": ("10.0.0.3", 105),
                                                             "SHARED": ("10.0.0.4", 106)}
    # ... and --remote flags add to them; a repeated AE title takes the later address.
    s = load_settings(cfg, env={}, remotes=["FLAGAE@127.0.0.1:107", "SHARED@127.0.0.1:108"])
    assert {r.aet: (r.host, r.port) for r in s.remotes} == {"FILEAE": ("10.0.0.1", 104),
                                                             "SHARED": ("127.0.0.1", 108),
                                                             "FLAGAE": ("127.0.0.1", 107)}


def test_remote_lookup_ignores_trailing_spaces() -> None:
    s = load_settings(env={}, remotes=["DEST@127.0.0.1:104"])
    assert s.remote("DEST  ") == RemoteAE("DEST", "127.0.0.1", 104)
    assert s.remote("dest") is None
    assert s.remote("OTHER") is None


def test_bad_remote_in_file_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError):
        load_settings(_toml(tmp_path, '[remotes]\nWS = "nohostport"\n'), env={})


def test_log_level_takes_any_case_and_refuses_others() -> None:
    """``--log-level debug`` crashed the CLI (``logging`` knows only upper-case names)."""
    assert load_settings(env={"BASTION_LOG_LEVEL": "debug"}).log_level == "DEBUG"
    assert load_settings(env={}, log_level="Warning").log_level == "WARNING"
    with pytest.raises(SettingsError, match="log_level"):
        load_settings(env={"BASTION_LOG_LEVEL": "verbose"})


def test_the_log_level_flag_takes_any_case() -> None:
    from bastion.cli.main import build_parser

    assert build_parser().parse_args(["serve", "--log-level", "debug"]).log_level == "DEBUG"
    with pytest.raises(SystemExit):
        build_parser().parse_args(["serve", "--log-level", "verbose"])


def test_several_blob_stores_from_file_environment_and_flags(tmp_path: Path) -> None:
    cfg = _toml(tmp_path, 'blobs = ["/disk1/bastion", "file:///disk2/bastion"]\ncopies_required = 1\n')
    s = load_settings(cfg, env={})
    assert s.blob_locations == ("/disk1/bastion", "/disk2/bastion") and s.copies == 1
    s = load_settings(cfg, env={"BASTION_BLOBS": "/a,s3://bucket/p?endpoint=http://127.0.0.1:1&region=r"})
    assert s.blob_locations == ("/a", "s3://bucket/p?endpoint=http://127.0.0.1:1&region=r")
    s = load_settings(env={}, blobs=["/x", "/y", "/z"])  # --blobs repeated
    assert s.blob_locations == ("/x", "/y", "/z") and s.copies == 3  # default: a copy in every store
    assert load_settings(_toml(tmp_path, 'blobs = "/only"\n'), env={}).blob_locations == ("/only",)


def test_copies_required_beyond_the_stores_is_refused(tmp_path: Path) -> None:
    with pytest.raises(SettingsError, match="copies_required = 3, but 2 blob store"):
        load_settings(env={"BASTION_BLOBS": "/a,/b", "BASTION_COPIES_REQUIRED": "3"})


def test_the_landing_needs_a_postgresql_index_and_one_s3_store(tmp_path: Path) -> None:
    """``[landing]`` (bastion.blobs.landing) lives in the index's database in front of one bucket: anything else is
    refused at start, in one line; a TOML table sets it."""
    pg, s3 = "postgresql://bastion@db1/bastion", "s3://archive/prod?endpoint=http://127.0.0.1:8333"
    cfg = tmp_path / "landing.toml"
    cfg.write_text(f'index = "{pg}"\nblobs = ["{s3}"]\n[landing]\nmax_kb = 512\ntotal_mb = 100\ndelay_s = 0\n')
    s = load_settings(cfg, env={})
    assert (s.landing_max_kb, s.landing_total_mb, s.landing_delay_s) == (512, 100, 0.0)
    assert load_settings(env={}).landing_max_kb == 0  # off by default
    for env in ({"BASTION_LANDING_MAX_KB": "64"},  # SQLite and files
                {"BASTION_LANDING_MAX_KB": "64", "BASTION_INDEX": pg},  # files
                {"BASTION_LANDING_MAX_KB": "64", "BASTION_INDEX": pg, "BASTION_BLOBS": f"{s3},{tmp_path}"}):
        with pytest.raises(SettingsError, match=r"\[landing\] max_kb needs a PostgreSQL index and one S3"):
            load_settings(env=env)
    for bad in ("-1", "8193"):  # larger objects are spooled to disk, not held in memory
        with pytest.raises(SettingsError, match=r"max_kb must be 0 to 8192"):
            load_settings(env={"BASTION_LANDING_MAX_KB": bad, "BASTION_INDEX": pg, "BASTION_BLOBS": s3})
    with pytest.raises(SettingsError, match="landing_delay_s"):
        load_settings(env={"BASTION_LANDING_DELAY_S": "-5"})
