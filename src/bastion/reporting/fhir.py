"""Reports as FHIR R4 DiagnosticReport resources (https://hl7.org/fhir/R4/diagnosticreport.html), in a searchset
Bundle (https://hl7.org/fhir/R4/bundle.html) for ``GET /fhir/DiagnosticReport``.

A report maps to: ``status`` (draft → registered, preliminary → preliminary, final → final, amended → amended),
``category`` RAD (v2-0074), ``code`` LOINC 18748-4 "Diagnostic imaging study", ``subject`` by the patient's
identifier (the DICOM Patient ID), ``identifier`` the report id, ``imagingStudy`` by the Study Instance UID as
``urn:oid:`` (a logical reference, DICOM's identifier system), ``issued`` and ``resultsInterpreter`` when signed,
``conclusion`` the impression section, and ``presentedForm`` the whole report as UTF-8 text (base64).
"""

from __future__ import annotations

import base64
from typing import Any

from bastion.reporting.report import AMENDED, DRAFT, FINAL, PRELIMINARY

STATUS = {DRAFT: "registered", PRELIMINARY: "preliminary", FINAL: "final", AMENDED: "amended"}
LOINC = "http://loinc.org"
DICOM_UID_SYSTEM = "urn:dicom:uid"
REPORT_ID_SYSTEM = "urn:bastion:report"
#: The section used as the conclusion.
CONCLUSION = "impression"


def report_text(doc: dict[str, Any]) -> str:
    """The report as plain text: each non-empty section under its title."""
    titles = doc.get("section_titles", {})
    parts = [str(doc.get("template_title", "") or "Report")]
    for name, text in doc.get("sections", {}).items():
        if str(text).strip():
            parts.append(f"{titles.get(name, name)}:\n{text}")
    if doc.get("reason"):
        parts.append(f"Reason for amendment:\n{doc['reason']}")
    return "\n\n".join(parts)


def diagnostic_report(doc: dict[str, Any]) -> dict[str, Any]:
    """The DiagnosticReport resource of report ``doc``."""
    resource: dict[str, Any] = {
        "resourceType": "DiagnosticReport",
        "id": str(doc["id"]),
        "meta": {"versionId": str(doc.get("version", 1))},
        "identifier": [{"system": REPORT_ID_SYSTEM, "value": str(doc["id"])}],
        "status": STATUS.get(str(doc.get("state")), "unknown"),
        "category": [{"coding": [{"system": "http://terminology.hl7.org/CodeSystem/v2-0074", "code": "RAD",
                                  "display": "Radiology"}]}],
        "code": {"coding": [{"system": LOINC, "code": "18748-4", "display": "Diagnostic imaging study"}],
                 "text": str(doc.get("template_title", "") or "Diagnostic imaging study")},
        "subject": {"identifier": {"value": str(doc.get("patient_id", ""))},
                    **({"display": str(doc["patient_name"])} if doc.get("patient_name") else {})},
        "imagingStudy": [{"identifier": {"system": DICOM_UID_SYSTEM, "value": f"urn:oid:{doc.get('study', '')}"},
                          "display": f"Study {doc.get('study', '')}"}],
        "presentedForm": [{"contentType": "text/plain; charset=utf-8", "language": "en",
                           "data": base64.b64encode(report_text(doc).encode()).decode("ascii"),
                           "title": str(doc.get("template_title", "") or "Report")}],
    }
    if doc.get("signed_at"):
        resource["issued"] = str(doc["signed_at"])
        resource["effectiveDateTime"] = str(doc["signed_at"])
        resource["resultsInterpreter"] = [{"display": str(doc.get("signed_by", ""))}]
    conclusion = str(doc.get("sections", {}).get(CONCLUSION, "")).strip()
    if conclusion:
        resource["conclusion"] = conclusion
    return resource


def searchset(docs: list[dict[str, Any]], base_url: str) -> dict[str, Any]:
    """A FHIR R4 searchset Bundle of the reports ``docs``."""
    return {"resourceType": "Bundle", "type": "searchset", "total": len(docs),
            "entry": [{"fullUrl": f"{base_url.rstrip('/')}/DiagnosticReport/{d['id']}",
                       "resource": diagnostic_report(d), "search": {"mode": "match"}} for d in docs]}
