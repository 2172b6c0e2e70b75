"""UIDs and transfer syntaxes Bastion knows (PS3.5 9.1, PS3.5 Annex A, PS3.6 Annex A)."""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")
_IDENTIFIABLE_RE = re.compile(r"^[0-9]+(\.[0-9]+)*$")

#: The most characters of a UID: PS3.5 9.1 and the UI value representation (PS3.5 Table 6.2-1).
UID_MAX_LENGTH = 64
#: The most characters of a UID Bastion still accepts as identifying an object (see :func:`is_identifiable_uid`).
IDENTIFIABLE_UID_MAX_LENGTH = 128

IMPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2"
EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1"
DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN = "1.2.840.10008.1.2.1.99"
EXPLICIT_VR_BIG_ENDIAN = "1.2.840.10008.1.2.2"

UNCOMPRESSED = (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN)

#: Transfer syntaxes the Storage SCP accepts and stores exactly as received.
STORABLE_TRANSFER_SYNTAXES: tuple[str, ...] = (
    EXPLICIT_VR_LITTLE_ENDIAN,
    IMPLICIT_VR_LITTLE_ENDIAN,
    DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN,
    EXPLICIT_VR_BIG_ENDIAN,
    "1.2.840.10008.1.2.4.50",  # JPEG Baseline (Process 1)
    "1.2.840.10008.1.2.4.51",  # JPEG Extended (Process 2 & 4)
    "1.2.840.10008.1.2.4.57",  # JPEG Lossless, Non-Hierarchical (Process 14)
    "1.2.840.10008.1.2.4.70",  # JPEG Lossless, First-Order Prediction (Process 14, SV1)
    "1.2.840.10008.1.2.4.80",  # JPEG-LS Lossless
    "1.2.840.10008.1.2.4.81",  # JPEG-LS Near-Lossless
    "1.2.840.10008.1.2.4.90",  # JPEG 2000 Lossless Only
    "1.2.840.10008.1.2.4.91",  # JPEG 2000
    "1.2.840.10008.1.2.4.201",  # HTJ2K Lossless
    "1.2.840.10008.1.2.4.202",  # HTJ2K Lossless RPCL
    "1.2.840.10008.1.2.4.203",  # HTJ2K
    "1.2.840.10008.1.2.5",  # RLE Lossless
    "1.2.840.10008.1.2.4.100",  # MPEG2 Main Profile / Main Level
    "1.2.840.10008.1.2.4.102",  # MPEG-4 AVC/H.264 High Profile
    "1.2.840.10008.1.2.4.103",  # MPEG-4 AVC/H.264 BD-compatible
)

VERIFICATION = "1.2.840.10008.1.1"
PATIENT_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.1.1"
PATIENT_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.1.2"
PATIENT_ROOT_GET = "1.2.840.10008.5.1.4.1.2.1.3"
STUDY_ROOT_FIND = "1.2.840.10008.5.1.4.1.2.2.1"
STUDY_ROOT_MOVE = "1.2.840.10008.5.1.4.1.2.2.2"
STUDY_ROOT_GET = "1.2.840.10008.5.1.4.1.2.2.3"
#: Storage Commitment Push Model SOP Class and its well-known SOP Instance (PS3.4 J.3.5).
STORAGE_COMMITMENT_PUSH = "1.2.840.10008.1.20.1"
STORAGE_COMMITMENT_PUSH_INSTANCE = "1.2.840.10008.1.20.1.1"

FIND_MODELS = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)
MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
PATIENT_ROOT_MODELS = (PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET)

#: Abstract syntaxes of the DICOM root (PS3.6 Annex A) that are services, not Storage SOP Classes: everything
#: else an SCU proposes is taken for a storage class (PS3.4 Annex B), whether standard, retired or private.
#: ``tests/unit/test_uids.py`` checks the classification against pydicom's dictionary of PS3.6 Annex A.
NON_STORAGE_SOP_CLASSES = frozenset({
    VERIFICATION,
    "1.2.840.10008.1.9",  # Basic Study Content Notification (retired)
    STORAGE_COMMITMENT_PUSH, "1.2.840.10008.1.20.2",  # Storage Commitment Push / Pull (PS3.4 J)
    "1.2.840.10008.1.40", "1.2.840.10008.1.42",  # Procedural Event / Substance Administration Logging
    "1.2.840.10008.3.1.1.1",  # the DICOM Application Context Name
    IMPLICIT_VR_LITTLE_ENDIAN, "1.2.840.10008.1.20",  # transfer syntaxes (PS3.5 Annex A; Papyrus 3, retired)
    "1.2.840.10008.5.1.4.31",  # Modality Worklist FIND (PS3.4 K)
    "1.2.840.10008.5.1.4.32",  # General Purpose Worklist Management Meta SOP Class (retired)
    "1.2.840.10008.5.1.4.33",  # Instance Availability Notification (PS3.4 R)
    "1.2.840.10008.5.1.4.34.2", "1.2.840.10008.5.1.4.34.3",  # RT Machine Verification (trial, retired)
    "1.2.840.10008.5.1.4.34.8", "1.2.840.10008.5.1.4.34.9",  # RT Conventional / Ion Machine Verification
    "1.2.840.10008.5.1.4.41", "1.2.840.10008.5.1.4.42",  # Product Characteristics / Substance Approval Query
    # Protocol Approval and Inventory Query/Retrieve, Inventory Creation, Repository Query
    "1.2.840.10008.5.1.4.1.1.200.4", "1.2.840.10008.5.1.4.1.1.200.5", "1.2.840.10008.5.1.4.1.1.200.6",
    "1.2.840.10008.5.1.4.1.1.201.2", "1.2.840.10008.5.1.4.1.1.201.3", "1.2.840.10008.5.1.4.1.1.201.4",
    "1.2.840.10008.5.1.4.1.1.201.5", "1.2.840.10008.5.1.4.1.1.201.6",
})

#: Families of non-storage services (each UID starting so), and the storage classes inside them.
_NON_STORAGE_PREFIXES = (
    "1.2.840.10008.1.2.",  # the other transfer syntaxes
    "1.2.840.10008.3.1.2.",  # Detached Patient/Visit/Study/Results Management (retired), MPPS (PS3.4 F)
    "1.2.840.10008.5.1.1.",  # Print Management (PS3.4 H), Media Creation, Display System
    "1.2.840.10008.5.1.4.1.2.",  # the Query/Retrieve information models (PS3.4 C)
    "1.2.840.10008.5.1.4.20.",  # Defined Procedure Protocol Query/Retrieve
    "1.2.840.10008.5.1.4.32.",  # General Purpose Worklist (retired)
    "1.2.840.10008.5.1.4.34.4.", "1.2.840.10008.5.1.4.34.6.",  # Unified Procedure Step (PS3.4 CC)
    "1.2.840.10008.5.1.4.37.",  # Relevant Patient Information Query
    "1.2.840.10008.10.",  # Real-Time Communication (PS3.22)
)
#: Storage SOP Classes inside those families: Stored Print, Hardcopy Grayscale and Color Image Storage (retired).
_STORAGE_IN_SERVICE_FAMILIES = frozenset({"1.2.840.10008.5.1.1.27", "1.2.840.10008.5.1.1.29",
                                          "1.2.840.10008.5.1.1.30"})
#: Hanging Protocol, Color Palette and the Implant Template families: ``.1`` is the storage class, the rest
#: their Query/Retrieve models.
_STORAGE_ONLY_FIRST = ("1.2.840.10008.5.1.4.38.", "1.2.840.10008.5.1.4.39.", "1.2.840.10008.5.1.4.43.",
                       "1.2.840.10008.5.1.4.44.", "1.2.840.10008.5.1.4.45.")


def is_valid_uid(uid: str) -> bool:
    """True if ``uid`` follows PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters."""
    return 0 < len(uid) <= UID_MAX_LENGTH and bool(_UID_RE.match(uid))


def is_identifiable_uid(uid: str) -> bool:
    """True if ``uid`` can identify a stored object, even though it may break PS3.5 9.1.

    The rule: 1 to 128 characters, digits and dots only, every component non-empty (no leading, trailing or
    doubled dot). A component with a leading zero (``1.2.03.4``) or a length from 65 to 128 characters is
    accepted (with a warning at ingest, see :mod:`bastion.ingest.header`): real devices send such UIDs. Such a
    UID is still a safe file name (the blob key holds it, :func:`bastion.model.records.object_key`).
    """
    return 0 < len(uid) <= IDENTIFIABLE_UID_MAX_LENGTH and bool(_IDENTIFIABLE_RE.match(uid))


def is_storage_sop_class(uid: str) -> bool:
    """True for an abstract syntax the Storage SCP accepts (PS3.4 Annex B): any UID but the known services.

    Standard, retired and private Storage SOP Classes are all storage: an archive keeps whatever a modality
    sends (Philips' private MR series data ``1.3.46.670589.11.0.0.12.1``, Siemens' CSA non-image
    ``1.3.12.2.1107.5.9.1``, Hardcopy Grayscale Image ``1.2.840.10008.5.1.1.29``). Verification, the
    Query/Retrieve models, worklists, MPPS, Storage Commitment, Print Management and the other services of
    :data:`NON_STORAGE_SOP_CLASSES` and their families are not. An empty UID is not.
    """
    if not uid or uid in NON_STORAGE_SOP_CLASSES:
        return False
    if uid in _STORAGE_IN_SERVICE_FAMILIES:
        return True
    if uid.startswith(_NON_STORAGE_PREFIXES):
        return False
    for family in _STORAGE_ONLY_FIRST:
        if uid.startswith(family):
            return uid == family + "1"
    return True


def is_compressed(transfer_syntax: str) -> bool:
    """True if pixel data in ``transfer_syntax`` is encapsulated (PS3.5 A.4)."""
    return transfer_syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
                                   DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
