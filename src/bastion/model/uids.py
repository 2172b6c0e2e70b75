"""UIDs and transfer syntaxes Bastion knows (PS3.5 9.1, PS3.5 Annex A, PS3.6 Annex A)."""

from __future__ import annotations

import re

_UID_RE = re.compile(r"^(0|[1-9][0-9]*)(\.(0|[1-9][0-9]*))*$")

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

FIND_MODELS = (PATIENT_ROOT_FIND, STUDY_ROOT_FIND)
MOVE_MODELS = (PATIENT_ROOT_MOVE, STUDY_ROOT_MOVE)
GET_MODELS = (PATIENT_ROOT_GET, STUDY_ROOT_GET)
PATIENT_ROOT_MODELS = (PATIENT_ROOT_FIND, PATIENT_ROOT_MOVE, PATIENT_ROOT_GET)

_STORAGE_PREFIXES = ("1.2.840.10008.5.1.4.1.1.", "1.2.840.10008.5.1.4.34.", "1.2.840.10008.5.1.4.38.",
                     "1.2.840.10008.5.1.4.43.", "1.2.840.10008.5.1.4.44.", "1.2.840.10008.5.1.4.45.")


def is_valid_uid(uid: str) -> bool:
    """True if ``uid`` follows PS3.5 9.1: digits and dots, no leading zeros, at most 64 characters."""
    return 0 < len(uid) <= 64 and bool(_UID_RE.match(uid))


def is_storage_sop_class(uid: str) -> bool:
    """True for any Storage SOP Class (PS3.4 Annex B.5, including private-free standard ranges)."""
    return uid.startswith(_STORAGE_PREFIXES) or uid in {
        "1.2.840.10008.5.1.4.1.1.1", "1.2.840.10008.5.1.4.1.1.2",
    }


def is_compressed(transfer_syntax: str) -> bool:
    """True if pixel data in ``transfer_syntax`` is encapsulated (PS3.5 A.4)."""
    return transfer_syntax not in (EXPLICIT_VR_LITTLE_ENDIAN, IMPLICIT_VR_LITTLE_ENDIAN,
                                   DEFLATED_EXPLICIT_VR_LITTLE_ENDIAN, EXPLICIT_VR_BIG_ENDIAN)
