"""Which attributes the index keeps at each level (PS3.4 C.6.1.1, C.6.2.1; PS3.18 Table 10.6.3-3).

The index stores, per level, these attributes of the current instances in the DICOM JSON
model (PS3.18 F.2), so both C-FIND and QIDO-RS answer from one representation. A few of
them are also index columns so that matching runs in SQL (:data:`COLUMNS`).
"""

from __future__ import annotations

from pydicom.datadict import dictionary_VR, tag_for_keyword

from bastion.model.levels import QueryLevel

PATIENT_KEYWORDS = (
    "PatientName", "PatientID", "IssuerOfPatientID", "PatientBirthDate", "PatientBirthTime",
    "PatientSex", "OtherPatientIDsSequence", "OtherPatientNames", "EthnicGroup", "PatientComments",
)
STUDY_KEYWORDS = (
    "StudyInstanceUID", "StudyDate", "StudyTime", "AccessionNumber", "StudyID", "StudyDescription",
    "ReferringPhysicianName", "NameOfPhysiciansReadingStudy", "AdmittingDiagnosesDescription",
    "PatientAge", "PatientSize", "PatientWeight", "Occupation", "AdditionalPatientHistory",
    "IssuerOfAccessionNumberSequence", "InstitutionName",
)
SERIES_KEYWORDS = (
    "SeriesInstanceUID", "Modality", "SeriesNumber", "SeriesDescription", "SeriesDate", "SeriesTime",
    "BodyPartExamined", "Laterality", "ProtocolName", "PerformedProcedureStepStartDate",
    "PerformedProcedureStepStartTime", "RequestAttributesSequence", "Manufacturer",
    "ManufacturerModelName", "StationName", "OperatorsName", "PerformingPhysicianName",
    "FrameOfReferenceUID",
)
INSTANCE_KEYWORDS = (
    "SOPInstanceUID", "SOPClassUID", "InstanceNumber", "ContentDate", "ContentTime",
    "AcquisitionDate", "AcquisitionTime", "AcquisitionNumber", "ImageType", "Rows", "Columns",
    "BitsAllocated", "NumberOfFrames", "PhotometricInterpretation", "ImageComments",
    "ContentLabel", "ContentDescription", "ObservationDateTime", "CompletionFlag", "VerificationFlag",
    "ConceptNameCodeSequence", "DocumentTitle", "SpecificCharacterSet",
)

LEVEL_KEYWORDS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.PATIENT: PATIENT_KEYWORDS,
    QueryLevel.STUDY: STUDY_KEYWORDS,
    QueryLevel.SERIES: SERIES_KEYWORDS,
    QueryLevel.IMAGE: INSTANCE_KEYWORDS,
}

#: Attributes computed by the index, not read from one instance (PS3.4 C.6.1.1.x, C.6.2.1.x).
COMPUTED_KEYWORDS: dict[QueryLevel, tuple[str, ...]] = {
    QueryLevel.PATIENT: ("NumberOfPatientRelatedStudies", "NumberOfPatientRelatedSeries",
                         "NumberOfPatientRelatedInstances"),
    QueryLevel.STUDY: ("ModalitiesInStudy", "SOPClassesInStudy", "NumberOfStudyRelatedSeries",
                       "NumberOfStudyRelatedInstances"),
    QueryLevel.SERIES: ("NumberOfSeriesRelatedInstances",),
    QueryLevel.IMAGE: ("AvailableTransferSyntaxUID",),
}

#: Attributes that are also columns of the index tables, per level: keyword -> column name.
COLUMNS: dict[QueryLevel, dict[str, str]] = {
    QueryLevel.PATIENT: {
        "PatientID": "patient_id", "PatientName": "patient_name",
        "PatientBirthDate": "patient_birth_date", "PatientSex": "patient_sex",
    },
    QueryLevel.STUDY: {
        "StudyInstanceUID": "study_uid", "StudyDate": "study_date", "StudyTime": "study_time",
        "AccessionNumber": "accession_number", "StudyID": "study_id",
        "StudyDescription": "study_description", "ReferringPhysicianName": "referring_physician",
    },
    QueryLevel.SERIES: {
        "SeriesInstanceUID": "series_uid", "Modality": "modality", "SeriesNumber": "series_number",
        "SeriesDescription": "series_description", "SeriesDate": "series_date",
        "BodyPartExamined": "body_part",
    },
    QueryLevel.IMAGE: {
        "SOPInstanceUID": "sop_uid", "SOPClassUID": "sop_class_uid", "InstanceNumber": "instance_number",
    },
}


def tag_of(keyword: str) -> int:
    """The tag of a dictionary ``keyword``; raises KeyError for an unknown one."""
    tag = tag_for_keyword(keyword)
    if tag is None:
        raise KeyError(keyword)
    return int(tag)


def tag_hex(tag: int) -> str:
    """``0x00100010`` -> ``"00100010"`` (the DICOM JSON model key, PS3.18 F.2.1.1)."""
    return f"{tag:08X}"


def vr_of(tag: int) -> str:
    """The dictionary VR of ``tag`` (``UN`` when unknown, ``US`` for ambiguous ``US or SS``)."""
    try:
        vr = dictionary_VR(tag)
    except KeyError:
        return "UN"
    return vr.split(" or ")[0]


LEVEL_TAGS: dict[QueryLevel, frozenset[int]] = {
    level: frozenset(tag_of(k) for k in kws) for level, kws in LEVEL_KEYWORDS.items()
}
