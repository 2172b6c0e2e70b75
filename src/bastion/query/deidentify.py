"""De-identification: PS3.15 Annex E's Basic Application Level Confidentiality Profile, with the Retain
Longitudinal Temporal Information with Modified Dates option (E.3.6) and consistent UIDs.

Every attribute listed in Table E.1-1 (:mod:`bastion.query.deid_profile`) gets its action, at every depth of
nesting: ``X`` removes it, ``Z`` empties it, ``D`` puts a dummy in its place, ``U`` replaces each UID with
another (below), ``K`` keeps it; an attribute the table does not list is kept. Besides the table:

* every private attribute is removed (no safe-private list), and so are the repeating groups of curves
  (``50xx``) and overlays (``60xx``, the whole plane, since its data and comments go);
* a sequence whose action is ``D`` (Content Sequence, Graphic Annotation Sequence, ...) keeps its items, each
  de-identified and with every free-text value (PN, ST, LT, UT, UC) replaced by a dummy;
* Patient ID and Patient's Name become one pseudonym of the source Patient ID (``ANON`` and 16 hex digits);
  nested in a sequence, they are emptied;
* every date (DA) and the date part of every date-time (DT), listed in the table or not, moves back by a
  number of days that is the same for every object of one source Patient ID and differs between patients
  (1 to 3,650 days): intervals within a patient are kept (E.3.6). Times of day (TM) are kept as they are;
* Patient Identity Removed (0012,0062) is ``YES``, Longitudinal Temporal Information Modified (0028,0303)
  ``MODIFIED``, and De-identification Method (0012,0063) with its Code Sequence (0012,0064) names CID 7050's
  113100 (Basic Application Confidentiality Profile) and 113107 (Retain Longitudinal Temporal Information
  Modified Dates Option).

The UIDs, pseudonyms and date offsets come from an HMAC-SHA256 of the source value under a secret kept with
the archive (:func:`load_secret`): the same source UID always gives the same ``2.25.<128-bit integer>`` UID
(PS3.5 B.2), so two exports of a study, or two studies of one patient, keep their references to each other,
Referenced SOP Instance UIDs in sequences included; without the secret the mapping cannot be reversed or
recomputed. Pixel data are not touched: text burned into the pixels stays (see :mod:`bastion.query.export`).
"""

from __future__ import annotations

import copy
import datetime as dt
import hashlib
import hmac
import secrets
from pathlib import Path
from typing import Any, Final

import pydicom
from pydicom.dataset import Dataset, FileMetaDataset
from pydicom.sequence import Sequence
from pydicom.uid import PYDICOM_IMPLEMENTATION_UID

from bastion.blobs.fileio import keep_first
from bastion.query.deid_profile import Action, action_for

#: Where the secret is kept, under the data directory.
SECRET_FILE: Final = "deid-secret"
#: PS3.16 CID 7050 codes written in De-identification Method Code Sequence (0012,0064).
METHOD_CODES: Final = (("113100", "Basic Application Confidentiality Profile"),
                       ("113107", "Retain Longitudinal Temporal Information Modified Dates Option"))
#: De-identification Method (0012,0063): LO, so one value per option (64 characters at most each).
METHOD: Final = ("Basic Application Confidentiality Profile", "Retain Longitudinal Temporal Information Modified Dates")
#: The dummy value of ``D`` for the text VRs.
DUMMY_TEXT: Final = "ANONYMIZED"
#: The largest date shift, in days.
MAX_SHIFT_DAYS: Final = 3650

_TEXT_VRS: Final = frozenset({"AE", "AS", "CS", "LO", "LT", "PN", "SH", "ST", "UC", "UT", "UR"})
_FREE_TEXT_VRS: Final = frozenset({"PN", "ST", "LT", "UT", "UC"})
_NUMBER_VRS: Final = frozenset({"US", "SS", "UL", "SL", "FL", "FD", "UV", "SV", "AT"})
_BYTES_VRS: Final = frozenset({"OB", "OW", "OF", "OD", "OL", "OV", "UN"})
_PATIENT_ID: Final = 0x00100020
_PATIENT_NAME: Final = 0x00100010
_DUMMY_BY_VR: Final[dict[str, Any]] = {"AS": "000D", "DS": "0", "IS": "0", "TM": "000000", "UR": "urn:anonymized"}


def load_secret(data: Path) -> bytes:
    """The archive's de-identification secret (32 bytes), kept in ``<data>/deid-secret`` (64 hex digits, mode
    0600); made on first use. Written under a temporary name and linked in place, so two processes starting at
    once agree on the one that was linked first.

    Raises
    ------
    ValueError
        When the file holds something other than 64 hex digits (restore it from a backup rather than make a new
        one: a new secret gives new UIDs, pseudonyms and date offsets).
    """
    path = data / SECRET_FILE
    text = keep_first(path, (secrets.token_hex(32) + "\n").encode(), 0o600).decode("ascii", "replace").strip()
    try:
        key = bytes.fromhex(text)
    except ValueError:
        key = b""
    if len(key) != 32:
        raise ValueError(f"{path} does not hold a de-identification secret (64 hex digits)")
    return key


class Deidentifier:
    """Applies the profile (see the module docstring) under one archive's ``secret``.

    Examples
    --------
    >>> d = Deidentifier(bytes(32))
    >>> d.uid("1.2.3") == d.uid("1.2.3") != d.uid("1.2.4")
    True
    """

    def __init__(self, secret: bytes) -> None:
        if len(secret) < 16:
            raise ValueError("a de-identification secret has at least 16 bytes")
        self._secret = secret

    def _mac(self, purpose: str, value: str) -> bytes:
        return hmac.new(self._secret, f"{purpose}\0{value}".encode(), hashlib.sha256).digest()

    def uid(self, source: str) -> str:
        """The UID that replaces ``source``: ``2.25.`` and a 128-bit integer (PS3.5 B.2), at most 44 characters."""
        return "2.25." + str(int.from_bytes(self._mac("uid", source.strip("\0 "))[:16], "big"))

    def pseudonym(self, patient_id: str) -> str:
        """The Patient ID (and Patient's Name) that replaces source Patient ID ``patient_id``."""
        return "ANON" + self._mac("patient", patient_id.strip()).hex()[:16].upper()

    def shift_days(self, patient_id: str) -> int:
        """How many days the dates of the patient with source Patient ID ``patient_id`` move back (1-3,650)."""
        return 1 + int.from_bytes(self._mac("dates", patient_id.strip())[:8], "big") % MAX_SHIFT_DAYS

    def apply(self, ds: Dataset) -> Dataset:
        """A de-identified copy of ``ds`` (a Part 10 dataset with its File Meta); ``ds`` is left unchanged.

        The copy's File Meta names the new SOP Instance UID and keeps the transfer syntax: the pixel data are
        written as they were stored.
        """
        out = copy.deepcopy(ds)
        source_patient = str(ds.get("PatientID", "") or "")
        delta = dt.timedelta(days=-self.shift_days(source_patient))
        out.remove_private_tags()
        self._clean(out, delta, scrub=False, top=True)
        pseudonym = self.pseudonym(source_patient)
        out.PatientID = pseudonym
        out.PatientName = pseudonym
        out.PatientIdentityRemoved = "YES"
        out.LongitudinalTemporalInformationModified = "MODIFIED"
        out.DeidentificationMethod = list(METHOD)
        codes = []
        for value, meaning in METHOD_CODES:
            item = Dataset()
            item.CodeValue, item.CodingSchemeDesignator, item.CodeMeaning = value, "DCM", meaning
            codes.append(item)
        out.DeidentificationMethodCodeSequence = Sequence(codes)
        meta = FileMetaDataset()
        meta.MediaStorageSOPClassUID = out.SOPClassUID
        meta.MediaStorageSOPInstanceUID = out.SOPInstanceUID
        meta.TransferSyntaxUID = ds.file_meta.TransferSyntaxUID
        meta.ImplementationClassUID = PYDICOM_IMPLEMENTATION_UID
        out.file_meta = meta
        return out

    def _clean(self, ds: Dataset, delta: dt.timedelta, *, scrub: bool, top: bool = False) -> None:
        """Apply the table to every element of ``ds`` and of its sequences' items, in place. The top level's
        Patient ID and Patient's Name are left for :meth:`apply` (the pseudonym); nested ones are emptied."""
        for tag in list(ds.keys()):
            group = tag >> 16
            if 0x5000 <= group <= 0x50FF or (0x6000 <= group <= 0x60FF and group % 2 == 0):
                del ds[tag]
                continue
            elem = ds[tag]
            action = action_for(int(tag))
            vr = elem.VR
            if top and tag in (_PATIENT_ID, _PATIENT_NAME):
                continue  # the pseudonym is set by apply
            if vr == "SQ":
                if action is Action.X:
                    del ds[tag]
                elif action is Action.Z:
                    elem.value = Sequence()
                else:
                    for item in elem.value:
                        self._clean(item, delta, scrub=scrub or action is Action.D)
                continue
            if vr in ("DA", "DT"):
                elem.value = _shift(elem.value, delta, vr)
                continue
            if vr == "TM":
                continue  # whole days move: the time of day stays (see the module docstring)
            if action is None or action is Action.K:
                if scrub and vr in _FREE_TEXT_VRS and not _empty(elem.value):
                    elem.value = DUMMY_TEXT
                continue
            if action is Action.X:
                del ds[tag]
            elif action is Action.U and vr == "UI":
                elem.value = _map_values(elem.value, self.uid)
            elif action is Action.Z or _empty(elem.value):
                elem.value = None
            else:  # D, C, and U on an attribute whose VR is not UI
                elem.value = _dummy(vr)


def _empty(value: Any) -> bool:
    return value is None or value == "" or value == b"" or (isinstance(value, list | pydicom.multival.MultiValue)
                                                            and len(value) == 0)


def _map_values(value: Any, fn: Any) -> Any:
    if isinstance(value, list | pydicom.multival.MultiValue):
        return [fn(str(v)) if str(v) else "" for v in value]
    return fn(str(value)) if str(value) else value


def _dummy(vr: str) -> Any:
    if vr in _DUMMY_BY_VR:
        return _DUMMY_BY_VR[vr]
    if vr in _TEXT_VRS:
        return DUMMY_TEXT
    if vr in _NUMBER_VRS:
        return 0
    if vr in _BYTES_VRS:
        return b"\x00\x00"
    return None


def _shift(value: Any, delta: dt.timedelta, vr: str) -> Any:
    """Each date (DA) or date-time (DT) of ``value`` moved by ``delta``; a value that is not a full date goes."""
    if isinstance(value, list | pydicom.multival.MultiValue):
        return [_shift_one(str(v), delta, vr) for v in value]
    return None if _empty(value) else _shift_one(str(value), delta, vr)


def _shift_one(text: str, delta: dt.timedelta, vr: str) -> str:
    text = text.strip()
    try:
        day = dt.date(int(text[0:4]), int(text[4:6]), int(text[6:8]))
    except ValueError:
        return ""  # a partial or broken date cannot be moved consistently: it is emptied
    if len(text) < 8 or (vr == "DA" and len(text) != 8):
        return ""
    return (day + delta).strftime("%Y%m%d") + (text[8:] if vr == "DT" else "")
