"""Bastion's settings: one frozen object built once and passed down.

Precedence, lowest first: built-in defaults, a TOML file (``--config`` or
``BASTION_CONFIG``), environment variables ``BASTION_<NAME>``, command-line flags.

TOML example::

    data = "/var/lib/bastion"
    aet = "BASTION"
    host = "0.0.0.0"
    dicom_port = 11112
    http_port = 8080
    max_pdu = 1048576
    cors_origins = ["https://viewer.example.org"]

    [remotes]
    WORKSTATION = "10.0.0.5:104"     # AE title = "host:port" ("tls://host:port": over DICOM TLS)

    [[forward]]                      # forward newly stored CT to an archive (bastion.forward)
    name = "central"
    to = "CENTRAL@10.0.0.9:104"      # or "https://pacs.example.org/dicom-web" (STOW-RS)
    match = { Modality = "CT", CallingAETitle = "CT*" }

Environment: ``BASTION_DATA``, ``BASTION_AET``, ``BASTION_HOST``, ``BASTION_DICOM_PORT``,
``BASTION_HTTP_PORT``, ``BASTION_MAX_PDU``, ``BASTION_INDEX`` (index location, default
``<data>/index.sqlite3``), ``BASTION_BLOBS`` (blob stores, comma-separated, default ``<data>/blobs``),
``BASTION_COPIES_REQUIRED``, ``BASTION_LANDING_MAX_KB``, ``BASTION_LANDING_TOTAL_MB``, ``BASTION_LANDING_DELAY_S``,
``BASTION_REMOTES`` (``AET@host:port,AET2@host:port``), ``BASTION_CORS_ORIGINS`` (comma list),
``BASTION_WORKERS`` (DICOM worker processes, default 2), ``BASTION_LOG_LEVEL``, and the limits
``BASTION_DICOM_ARTIM_TIMEOUT``, ``BASTION_DICOM_IDLE_TIMEOUT``, ``BASTION_MAX_ASSOCIATIONS``,
``BASTION_MAX_ASSOCIATIONS_PER_PEER``, ``BASTION_HTTP_HEADER_TIMEOUT``, ``BASTION_HTTP_BODY_TIMEOUT``,
``BASTION_STORAGE_DENY`` (comma list of SOP Class UIDs), ``BASTION_NODE_ID``, and the repair of the copies
``BASTION_SCRUB_RATE``, ``BASTION_SCRUB_DAYS``, ``BASTION_REPAIR_INTERVAL``, and forwarding:
``BASTION_FORWARD`` (comma list of destinations ``to``, each a rule that forwards everything),
``BASTION_FORWARD_MAX_ATTEMPTS``, ``BASTION_FORWARD_BACKOFF``, ``BASTION_FORWARD_BACKOFF_MAX``, and edge mode
(:mod:`bastion.forward.edge`): ``BASTION_UPSTREAM``, ``BASTION_UPSTREAM_API``, ``BASTION_COMMIT_AFTER_UPSTREAM``,
``BASTION_RECONCILE_DAYS``, ``BASTION_RECONCILE_INTERVAL``, ``BASTION_PREFETCH_PRIORS``,
``BASTION_PREFETCH_KEEP_DAYS``, ``BASTION_PREFETCH_INTERVAL``, ``BASTION_PREFETCH`` (``Keyword=value`` pairs,
comma-separated: the ``[prefetch] query``), and reporting's HL7: ``BASTION_HL7_RECEIVERS`` (comma list of
``HOST:PORT``).
"""

from __future__ import annotations

import os
import re
import tomllib
from collections.abc import Mapping
from dataclasses import dataclass, fields, replace
from pathlib import Path
from typing import Any

from bastion.errors import SettingsError
from bastion.model.peers import DicomPeer, parse_peers
from bastion.model.remotes import ForwardRule, RemoteAE, check_aet

#: The logging levels ``log_level`` takes (any case).
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")


#: The largest ``[landing] max_kb``: objects up to this size are held in memory while they arrive
#: (:data:`bastion.blobs.spooling.MEMORY_LIMIT`).
LANDING_MAX_KB = 8192
#: The name of the forwarding rule (and queue) that edge mode adds for ``upstream``.
UPSTREAM = "upstream"
#: The keys a ``[prefetch] query`` may hold (PS3.4 C.6.2.1.2 Study Root, STUDY level); a date takes ``-Nd`` /
#: ``+Nd`` (days from today) besides a DICOM date or range.
PREFETCH_QUERY_KEYWORDS = ("ModalitiesInStudy", "StudyDate", "StudyDescription", "AccessionNumber",
                           "ReferringPhysicianName", "PatientID", "StudyID")


@dataclass(frozen=True)
class Settings:
    """Everything Bastion needs to run; immutable once built."""

    data: Path = Path("bastion-data")
    aet: str = "BASTION"
    host: str = "127.0.0.1"
    dicom_port: int = 11112
    http_port: int = 8080
    index: str = ""  # default: <data>/index.sqlite3
    #: The blob stores, each holding a copy of every object (default: one, ``<data>/blobs``).
    blobs: tuple[str, ...] = ()
    #: Durable copies an object must have before its store is answered as successful (0: one in every blob store).
    copies_required: int = 0
    #: ``[landing] max_kb``: objects of up to this many KiB (at most :data:`LANDING_MAX_KB`) are made durable in the
    #: PostgreSQL index's database and moved into the S3 bucket afterwards (:mod:`bastion.blobs.landing`); 0: none
    #: (what has landed is still served and moved). Needs a PostgreSQL index and one S3 blob store.
    landing_max_kb: int = 0
    #: ``[landing] total_mb``: while the landing holds more, objects go straight to the bucket.
    landing_total_mb: int = 4096
    #: ``[landing] delay_s``: objects are moved once they have been landed this many seconds.
    landing_delay_s: float = 10.0
    max_pdu: int = 1048576
    remotes: tuple[RemoteAE, ...] = ()
    cors_origins: tuple[str, ...] = ()
    log_level: str = "INFO"
    workers: int = 2
    ohif_dir: str = ""  # default: <repo>/var/ohif when present
    #: A-ASSOCIATE-RQ must arrive whole within this many seconds of the connection (ARTIM, PS3.8 9.1.5).
    dicom_artim_timeout: float = 30.0
    #: An established association that receives nothing for this many seconds is aborted.
    dicom_idle_timeout: float = 30.0
    #: Associations served at once, over all worker processes; more are rejected (PS3.8 9.3.4, transient).
    max_associations: int = 64
    #: Associations served at once from one peer IP address.
    max_associations_per_peer: int = 16
    #: An HTTP request's line and headers must arrive within this many seconds.
    http_header_timeout: float = 30.0
    #: An HTTP request body that receives less than 1 KiB in any window of this many seconds is abandoned.
    http_body_timeout: float = 60.0
    #: Storage SOP Class UIDs refused at association negotiation (every other storage class is accepted).
    storage_deny: tuple[str, ...] = ()
    #: This node's identity among the nodes sharing an archive (default: generated once, kept in <data>/node-id).
    node_id: str = ""
    #: MB/s at which the scrub re-hashes every copy in every blob store (None: as fast as re-hashing them all within
    #: ``scrub_days`` needs, at least 1 MB/s; 0: no scrub). See :mod:`bastion.blobs.repair`.
    scrub_rate: float | None = None
    #: Days within which the scrub re-hashes every copy, when ``scrub_rate`` is not set.
    scrub_days: float = 7.0
    #: Seconds between two full reconciliations of the blob stores' listings (every object in every store); 0: no
    #: background repair (``bastion verify --repair`` only).
    repair_interval: float = 600.0
    #: Forwarding rules (``[[forward]]`` tables, :class:`~bastion.model.remotes.ForwardRule`; see :mod:`bastion.forward`).
    forward: tuple[ForwardRule, ...] = ()
    #: Attempts to deliver an instance before it becomes a dead letter (kept with its last error).
    forward_max_attempts: int = 10
    #: Seconds before the first retry of a failed delivery; each further retry waits twice as long ...
    forward_backoff: float = 5.0
    #: ... up to this many seconds.
    forward_backoff_max: float = 600.0
    #: Edge mode: the central archive (``AET@HOST:PORT`` or a DICOMweb base URL) that everything stored here is
    #: forwarded to (a rule named :data:`UPSTREAM`), reconciled with, and that priors are fetched from.
    upstream: str = ""
    #: The upstream Bastion's HTTP base URL (``http://HOST:PORT``), whose ``/api/studies/{uid}/digests`` lets the
    #: reconciliation compare content; default: a DICOMweb ``upstream`` without its ``/dicom-web``.
    upstream_api: str = ""
    #: The credential (an API key, or a token) sent as ``Authorization: Bearer`` to an upstream that requires
    #: authentication: on STOW-RS, QIDO-RS, WADO-RS and the digests API (needs ``uploader`` and ``viewer`` roles, or
    #: ``admin``, at a Bastion upstream). Never shown.
    upstream_api_key: str = ""
    #: Storage Commitment: an instance is committed only once upstream holds it (edge mode).
    commit_after_upstream: bool = False
    #: The reconciliation checks the instances delivered upstream in the last this many days ...
    reconcile_days: float = 7.0
    #: ... every this many seconds (0: only after a reconnection and on ``bastion queue reconcile``).
    reconcile_interval: float = 600.0
    #: The newest prior studies of a patient fetched from upstream when a new study of theirs arrives (0: none).
    prefetch_priors: int = 3
    #: Days a prefetched study is kept on the edge before the daily sweep evicts it.
    prefetch_keep_days: float = 30.0
    #: Seconds between two runs of the ``[prefetch] query``.
    prefetch_interval: float = 3600.0
    #: ``[prefetch] query``: a Study Root STUDY-level query whose studies are fetched from upstream every
    #: ``prefetch_interval`` (keyword, value) pairs; empty: none.
    prefetch: tuple[tuple[str, str], ...] = ()
    #: Days a deleted study's bytes are kept (hidden, undeletable) before ``bastion purge`` may remove them
    #: (:mod:`bastion.ingest.deletion`, docs/deletion.md); ``[deletion] delay_days`` in a TOML file.
    deletion_delay_days: float = 30.0
    #: ``[auth]``: HTTP authentication and roles (:mod:`bastion.auth`, docs/authentication.md). Off: every request
    #: is anonymous and may do anything (a closed network only).
    auth_enabled: bool = False
    #: The OpenID Connect issuer whose tokens are accepted (a token's ``iss`` must equal it).
    auth_issuer: str = ""
    #: The audience a token must name in ``aud`` (the API's client id or resource URI at the issuer).
    auth_audience: str = ""
    #: The issuer's JWKS URL (fetched, cached on disk as ``<data>/auth/jwks.json``, refreshed).
    auth_jwks_url: str = ""
    #: A JWKS file used instead of (or besides) ``auth_jwks_url``.
    auth_jwks_file: str = ""
    #: Where a token carries its roles: a claim name or a dotted path (``realm_access.roles``).
    auth_role_claim: str = "roles"
    #: The claim naming the user (falls back to ``sub``).
    auth_user_claim: str = "preferred_username"
    #: The OIDC client id of the viewer and admin page (public client, authorization code + PKCE).
    auth_client_id: str = ""
    #: The signature algorithms a token may use (never ``none`` or HS*).
    auth_algorithms: tuple[str, ...] = ("RS256", "RS384", "RS512", "PS256", "ES256", "ES384", "EdDSA",
                                     "Ed25519")
    #: Seconds of clock skew allowed on ``exp`` / ``nbf`` / ``iat``.
    auth_leeway: float = 30.0
    #: Seconds between two periodic refreshes of the JWKS (an unknown ``kid`` refreshes sooner, rate-limited).
    auth_jwks_refresh: float = 3600.0
    #: Failed authentications a client address may make in a minute before it is answered 429.
    auth_failure_limit: int = 10
    #: The longest lifetime of a break-glass token, in hours.
    auth_emergency_max_hours: float = 24.0
    #: ``[dictation] engine``: the local speech-to-text engine of report dictation (:mod:`bastion.reporting.dictation`,
    #: docs/dictation.md): ``pocketsphinx`` (with Bastion's radiology vocabulary), ``pocketsphinx-default`` (its
    #: general English model), or a site's own ``package.module:Factory`` (called with the settings).
    dictation_engine: str = "pocketsphinx"
    #: ``[dictation] max_seconds``: the longest recording transcribed at once; longer ones are refused (HTTP 413).
    dictation_max_seconds: float = 600.0
    #: ``[report] claim_minutes``: how long a radiologist's claim on a study of the reading list lasts unless
    #: renewed (:mod:`bastion.jobs.claims`, docs/reporting.md).
    report_claim_minutes: float = 30.0
    #: ``[report] key_file``: the report key (64 hexadecimal digits) that seals the report a signed SR carries
    #: (:mod:`bastion.reporting.seal`): give an edge node and its centre the same file; empty: the archive's own key,
    #: kept in its blob store.
    report_key_file: str = ""
    #: ``[report] encapsulated_pdf``: store each signed version's printable PDF in its study too, as a DICOM
    #: Encapsulated PDF instance beside its SR (:mod:`bastion.reporting.encapsulated`).
    report_encapsulated_pdf: bool = False
    #: ``[hl7] receivers``: where each signed report version goes as an HL7 v2.5.1 ORU^R01 over MLLP, ``HOST:PORT``
    #: each (:mod:`bastion.reporting.hl7`, docs/reporting.md); empty: none.
    hl7_receivers: tuple[str, ...] = ()
    #: MSH-3 to MSH-6 of the messages: the sending and receiving application and facility.
    hl7_sending_application: str = "BASTION"
    hl7_sending_facility: str = "BASTION"
    hl7_receiving_application: str = ""
    hl7_receiving_facility: str = ""
    #: Attempts to deliver a message before it becomes a dead letter (kept with its last error until retried).
    hl7_max_attempts: int = 10
    #: Seconds before the first retry of a message not delivered; each further retry waits twice as long ...
    hl7_backoff: float = 5.0
    #: ... up to this many seconds.
    hl7_backoff_max: float = 300.0
    #: Seconds a receiver has to connect and acknowledge a message.
    hl7_timeout: float = 30.0
    #: The hospital or site named at the head of the printable report (``GET /api/reports/{id}/pdf``).
    site_name: str = "Bastion"
    #: The TrueType font of the printable report (Debian's fonts-dejavu-core by default).
    report_font: str = "/usr/share/fonts/truetype/dejavu/DejaVuSans.ttf"
    #: ``[dimse.peers]``: the known calling AEs, each with its hosts and DIMSE services (:mod:`bastion.model.peers`).
    dimse_peers: tuple[DicomPeer, ...] = ()
    #: ``[dimse] allow_unknown``: whether AEs not in ``dimse_peers`` may associate (with every service). None
    #: ("auto"): true while no peer is listed, false once any is. See :attr:`allows_unknown_peers`.
    dimse_allow_unknown: bool | None = None
    #: DICOM TLS port (PS3.15 B.9, BCP 195); 0: no TLS listener.
    tls_port: int = 0
    #: The TLS listener's certificate (PEM, with its chain) and private key (PEM, unencrypted).
    tls_cert: str = ""
    tls_key: str = ""
    #: CA certificates (PEM) that client certificates must chain to; set: a client certificate is required.
    tls_ca: str = ""
    #: ``[audit] forward``: an Audit Record Repository, ``tls://HOST:PORT``, that the audit log is sent to as it grows
    #: (RFC 5424 syslog over TLS, RFC 5425; :mod:`bastion.audit.forward`); empty: none.
    audit_forward: str = ""
    #: CA certificates (PEM) the repository's certificate must chain to (default: the system's).
    audit_forward_ca: str = ""
    #: Seconds between two rounds of forwarding.
    audit_forward_interval: float = 5.0

    def __post_init__(self) -> None:
        """Edge mode's always-on rule: ``upstream`` adds a forward rule named :data:`UPSTREAM` matching everything."""
        if not self.upstream:
            return
        rule = ForwardRule.parse({"name": UPSTREAM, "to": self.upstream, "api_key": self.upstream_api_key})
        mine = [r for r in self.forward if r.name == UPSTREAM]
        if any(r.to != rule.to or r.match for r in mine):
            raise SettingsError(f"a [[forward]] rule is named {UPSTREAM!r}: that name is edge mode's (upstream)")
        if not mine:
            object.__setattr__(self, "forward", (*self.forward, rule))

    @property
    def allows_unknown_peers(self) -> bool:
        """Whether a calling AE not in ``dimse_peers`` may associate: ``dimse_allow_unknown``, or when that is
        "auto" (None), whether no peer is listed."""
        return not self.dimse_peers if self.dimse_allow_unknown is None else self.dimse_allow_unknown

    @property
    def upstream_rule(self) -> ForwardRule | None:
        """Edge mode's forward rule, or None when this node is not an edge."""
        return next((r for r in self.forward if r.name == UPSTREAM), None) if self.upstream else None

    @property
    def index_location(self) -> str:
        """The index location: a SQLite file path (the default ``<data>/index.sqlite3``) or a PostgreSQL URL."""
        return self.index or str(self.data / "index.sqlite3")

    @property
    def blob_locations(self) -> tuple[str, ...]:
        """The blob stores' locations: directories (the default ``<data>/blobs``), ``file://`` or ``s3://`` URLs."""
        return self.blobs or (str(self.data / "blobs"),)

    @property
    def has_landing(self) -> bool:
        """Whether the blob store has the landing in front (:mod:`bastion.blobs.landing`): a PostgreSQL index and one
        S3 store. Always then, whatever ``landing_max_kb`` (0: nothing new lands, but what another node or an earlier
        run landed is served, deleted and moved)."""
        return (self.index_location.startswith(("postgresql://", "postgres://")) and len(self.blob_locations) == 1
                and self.blob_locations[0].startswith("s3://"))

    @property
    def copies(self) -> int:
        """How many durable copies a store needs (``copies_required``, or every blob store)."""
        return self.copies_required or len(self.blob_locations)

    def remote(self, aet: str) -> RemoteAE | None:
        """The configured remote AE called ``aet`` (exact, trailing spaces ignored)."""
        for r in self.remotes:
            if r.aet == aet.strip():
                return r
        return None


def _coerce(name: str, value: Any) -> Any:
    kinds = {f.name: f.type for f in fields(Settings)}
    kind = kinds[name]
    try:
        if name == "data":
            return Path(value)
        if name in ("forward_max_attempts", "hl7_max_attempts"):
            attempts = int(value)
            if attempts < 1:
                raise ValueError(f"{value!r} is not at least 1")
            return attempts
        if kind == "int":
            count = int(value)
            if name == "prefetch_priors" and count < 0:
                raise ValueError(f"{value!r} is not a number >= 0 (0: none)")
            return count
        if name == "dimse_allow_unknown":
            if value is None or str(value).strip().lower() in ("", "auto"):
                return None
            return _coerce("auth_enabled", value)
        if name == "dimse_peers":
            return parse_peers(value)
        if kind == "bool":
            if isinstance(value, bool):
                return value
            text = str(value).strip().lower()
            if text not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(f"{value!r} is not true or false")
            return text in ("true", "1", "yes")
        if name == "prefetch":
            return _prefetch_query(value)
        if name == "upstream" and str(value).strip():
            return ForwardRule.parse({"name": UPSTREAM, "to": str(value).strip()}).to
        if name in ("scrub_rate", "repair_interval", "reconcile_interval", "landing_delay_s"):
            number = float(value)
            if not number >= 0:
                raise ValueError(f"{value!r} is not a number >= 0 (0: off)")
            return number
        if name == "deletion_delay_days":
            number = float(value)
            if not 0 <= number < float("inf"):
                raise ValueError(f"{value!r} is not a number of days >= 0")
            return number
        if kind == "float":
            number = float(value)
            if not number > 0:
                raise ValueError(f"{value!r} is not a positive number of seconds")
            return number
        if name == "remotes":
            if isinstance(value, Mapping):
                out = []
                for aet, addr in value.items():
                    out.append(RemoteAE.parse(f"{aet}@{addr}"))
                return tuple(out)
            if isinstance(value, str):
                value = [v for v in value.split(",") if v.strip()]
            return tuple(v if isinstance(v, RemoteAE) else RemoteAE.parse(v) for v in value)
        if name == "forward":
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            if isinstance(value, Mapping):
                value = [value]
            rules = tuple(v if isinstance(v, ForwardRule) else ForwardRule.parse(v) for v in value)
            names: dict[str, str] = {}
            for rule in rules:
                if names.setdefault(rule.name, rule.to) != rule.to:
                    raise ValueError(f"two [[forward]] rules are named {rule.name!r} but go to different places")
            return rules
        if name == "blobs":
            locations = (value,) if isinstance(value, str) else tuple(str(v) for v in value)
            return tuple(_without_file_scheme(v.strip()) for v in locations if v.strip())
        if name == "hl7_receivers":
            receivers = [v.strip() for v in value.split(",")] if isinstance(value, str) else [str(v) for v in value]
            bad = [v for v in receivers if v and not re.fullmatch(r"(\[[0-9A-Fa-f:.]+\]|[^\s:/\[\]]+):\d{1,5}", v)]
            if bad:
                raise ValueError(f"{', '.join(bad)}: expected HOST:PORT")
            return tuple(v for v in receivers if v)
        if name in ("cors_origins", "storage_deny", "auth_algorithms"):
            if isinstance(value, str):
                value = [v.strip() for v in value.split(",") if v.strip()]
            return tuple(value)
        if name == "audit_forward":
            text = str(value).strip()
            if text and re.fullmatch(r"tls://[^/:\s]+:\d{1,5}", text) is None:
                raise ValueError(f"{text!r}: expected tls://HOST:PORT (syslog over TLS, RFC 5425)")
            return text
        if name == "aet":
            return check_aet(str(value))
        if name == "log_level":
            level = str(value).strip().upper()
            if level not in LOG_LEVELS:
                raise ValueError(f"{value!r} is not one of {', '.join(LOG_LEVELS)}")
            return level
        return str(value)
    except (TypeError, ValueError) as exc:
        raise SettingsError(f"setting {name}: {exc}") from exc


def _prefetch_query(value: Any) -> tuple[tuple[str, str], ...]:
    """``[prefetch] query = { ModalitiesInStudy = "CT", StudyDate = "-30d" }`` (or ``"K=V,K=V"``) as pairs."""
    if isinstance(value, str):
        value = dict(part.split("=", 1) for part in value.split(",") if "=" in part)
    if isinstance(value, Mapping) and set(value) <= {"query"} and isinstance(value.get("query", {}), Mapping):
        value = value.get("query", {})
    if not isinstance(value, Mapping):
        raise ValueError("[prefetch] must be a table with a query, e.g. query = { ModalitiesInStudy = \"CT\" }")
    pairs = []
    for keyword, v in value.items():
        keyword = str(keyword).strip()
        if keyword not in PREFETCH_QUERY_KEYWORDS:
            raise ValueError(f"cannot query on {keyword!r}; one of {', '.join(PREFETCH_QUERY_KEYWORDS)}")
        pairs.append((keyword, "\\".join(map(str, v)) if isinstance(v, list) else str(v).strip()))
    return tuple(pairs)


def _flatten_tables(doc: Mapping[str, Any], names: set[str]) -> dict[str, Any]:
    """A TOML table that is not itself a setting (``[auth] enabled = true``) as prefixed settings (``auth_enabled``)."""
    out: dict[str, Any] = {}
    for key, value in doc.items():
        if isinstance(value, Mapping) and key not in names and any(n.startswith(f"{key}_") for n in names):
            out.update({f"{key}_{sub}": v for sub, v in value.items()})
        else:
            out[key] = value
    return out


def _check_auth(settings: Settings) -> None:
    """``[auth] enabled`` needs an issuer, an audience and the issuer's keys; the algorithms must be asymmetric."""
    if not settings.auth_enabled:
        return
    missing = [name for name in ("auth_issuer", "auth_audience") if not getattr(settings, name)]
    if not (settings.auth_jwks_url or settings.auth_jwks_file):
        missing.append("auth_jwks_url or auth_jwks_file")
    if missing:
        raise SettingsError(f"[auth] enabled = true needs {', '.join(missing)} (see docs/authentication.md)")
    weak = [a for a in settings.auth_algorithms if a.lower() == "none" or a.upper().startswith("HS")]
    if weak or not settings.auth_algorithms:
        raise SettingsError(f"auth_algorithms: {', '.join(weak) or 'empty'} not allowed (asymmetric ones only, "
                            "e.g. RS256, ES256, EdDSA)")


def _check_dimse(settings: Settings) -> None:
    """A peer's move destinations must be configured remotes; a TLS port needs a certificate and its key."""
    for peer in settings.dimse_peers:
        unknown = sorted(d for d in peer.move_destinations or () if settings.remote(d) is None)
        if unknown:
            raise SettingsError(f"[dimse.peers] {peer.aet}: move destination(s) {', '.join(unknown)} not in [remotes]")
    if settings.tls_port and not (settings.tls_cert and settings.tls_key):
        raise SettingsError("tls_port needs tls_cert and tls_key (PEM files)")
    if settings.tls_port and settings.tls_port == settings.dicom_port:
        raise SettingsError(f"tls_port and dicom_port are both {settings.tls_port}")


def _check_landing(settings: Settings) -> None:
    """The landing (``landing_max_kb``) needs a PostgreSQL index and one S3 blob store; sizes of 0 or more."""
    if min(settings.landing_max_kb, settings.landing_total_mb) < 0 or settings.landing_max_kb > LANDING_MAX_KB:
        raise SettingsError(f"[landing] max_kb must be 0 to {LANDING_MAX_KB} (objects held in memory), and total_mb "
                            "0 or more")
    if settings.landing_max_kb and not settings.has_landing:
        raise SettingsError("[landing] max_kb needs a PostgreSQL index and one S3 blob store (the landing is in the "
                            "index's database, in front of the bucket)")


def _without_file_scheme(location: str) -> str:
    """A ``file://`` URL's path; any other location as it is."""
    return location[len("file://"):] if location.startswith("file://") else location


def load_settings(config: str | Path | None = None, env: Mapping[str, str] | None = None,
                  **overrides: Any) -> Settings:
    """Build :class:`Settings` from defaults, a TOML file, ``BASTION_*`` variables and overrides.

    ``overrides`` whose value is ``None`` are ignored, so CLI flags can be passed straight in.
    """
    env = os.environ if env is None else env
    values: dict[str, Any] = {}
    names = {f.name for f in fields(Settings)}
    path = config or env.get("BASTION_CONFIG")
    if path:
        try:
            with open(path, "rb") as fh:
                doc = tomllib.load(fh)
        except (OSError, tomllib.TOMLDecodeError) as exc:
            raise SettingsError(f"cannot read config file {path}: {exc}") from exc
        doc = _flatten_tables(doc, names)
        unknown = set(doc) - names
        if unknown:
            raise SettingsError(f"unknown setting(s) in {path}: {', '.join(sorted(unknown))}")
        values.update(doc)
    for name in names:
        key = f"BASTION_{name.upper()}"
        if key in env:
            values[name] = env[key].split(",") if name == "blobs" else env[key]
    for name, value in overrides.items():
        if value is None:
            continue
        if name == "remotes" and values.get("remotes"):
            # --remote flags add to the remotes of the file / environment.
            base = _coerce("remotes", values["remotes"])
            values[name] = base + _coerce("remotes", value)
            continue
        values[name] = value
    settings = Settings(**{k: _coerce(k, v) for k, v in values.items()})
    _check_auth(settings)
    _check_dimse(settings)
    _check_landing(settings)
    if not 0 <= settings.copies_required <= len(settings.blob_locations):
        raise SettingsError(f"copies_required = {settings.copies_required}, but {len(settings.blob_locations)} "
                            "blob store(s) are configured")
    return replace(settings, remotes=tuple({r.aet: r for r in settings.remotes}.values()))
