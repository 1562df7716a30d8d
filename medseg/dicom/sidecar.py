"""De-identified acquisition metadata of a series, for the JSON sidecar beside its NIfTI.

Only an allow-list of acquisition attributes is copied; nothing that identifies a patient
(name, ID, birth date, address, accession number, institution, dates, UIDs) is ever read
into the sidecar. ``IDENTIFYING_KEYWORDS`` lists the attributes a privacy check looks for.
"""

from __future__ import annotations

import logging
from typing import Any

import numpy as np
import pydicom

from medseg.dicom.volume import SeriesVolume

log = logging.getLogger(__name__)

# Acquisition attributes safe to copy: they describe the scanner and the sequence, not the person.
ALLOWED_KEYWORDS = (
    "Modality",
    "Manufacturer",
    "ManufacturerModelName",
    "SoftwareVersions",
    "MagneticFieldStrength",
    "SeriesDescription",
    "ProtocolName",
    "SeriesNumber",
    "BodyPartExamined",
    "ImageType",
    "ScanningSequence",
    "SequenceVariant",
    "ScanOptions",
    "MRAcquisitionType",
    "SequenceName",
    "EchoTime",
    "RepetitionTime",
    "InversionTime",
    "FlipAngle",
    "EchoTrainLength",
    "PixelBandwidth",
    "SliceThickness",
    "SpacingBetweenSlices",
    "KVP",
    "XRayTubeCurrent",
    "ExposureTime",
    "ConvolutionKernel",
    "ReconstructionDiameter",
    "ContrastBolusAgent",
    "PhotometricInterpretation",
    "BitsStored",
)

# Attributes that identify a patient or a visit; none may reach a NIfTI header, sidecar, log or file name.
IDENTIFYING_KEYWORDS = (
    "PatientName",
    "PatientID",
    "PatientBirthDate",
    "PatientAddress",
    "PatientTelephoneNumbers",
    "OtherPatientIDs",
    "OtherPatientNames",
    "PatientMotherBirthName",
    "AccessionNumber",
    "InstitutionName",
    "InstitutionAddress",
    "InstitutionalDepartmentName",
    "ReferringPhysicianName",
    "PerformingPhysicianName",
    "OperatorsName",
    "StationName",
    "StudyID",
    "StudyDate",
    "SeriesDate",
    "AcquisitionDate",
    "ContentDate",
)


def _plain(value: Any) -> Any:
    if isinstance(value, pydicom.multival.MultiValue | list | tuple):
        return [_plain(v) for v in value]
    if isinstance(value, pydicom.valuerep.DSfloat | pydicom.valuerep.DSdecimal | float):
        return float(value)
    if isinstance(value, pydicom.valuerep.IS | int):
        return int(value)
    return str(value)


def sidecar(header: pydicom.Dataset, volume: SeriesVolume, *, case_id: str) -> dict[str, Any]:
    """The sidecar of one converted series: allowed attributes plus the geometry medseg wrote."""
    out: dict[str, Any] = {"case_id": case_id}
    for keyword in ALLOWED_KEYWORDS:
        try:
            value = header.get(keyword)
        except Exception as err:  # pydicom converts on first use and raises many kinds for a damaged value
            log.warning("%s: left %s out of the sidecar: its value is unreadable (%s)", case_id, keyword, type(err).__name__)
            continue
        if value not in (None, ""):
            out[keyword] = _plain(value)
    meta = getattr(header, "file_meta", None)
    if meta is not None and "TransferSyntaxUID" in meta:
        out["TransferSyntax"] = meta.TransferSyntaxUID.name
    sop_class = header.get("SOPClassUID")
    if sop_class:
        out["SOPClass"] = pydicom.uid.UID(str(sop_class)).name
    zooms = np.sqrt((volume.affine[:3, :3] ** 2).sum(axis=0))
    import nibabel as nib

    out.update(
        shape=list(volume.data.shape),
        dtype=str(volume.data.dtype),
        spacing_mm=[round(float(z), 6) for z in zooms],
        orientation="".join(nib.aff2axcodes(volume.affine)),
        volumes=int(volume.data.shape[3]) if volume.data.ndim == 4 and not volume.rgb else 1,
        rgb=volume.rgb,
        gantry_tilt_resampled=volume.tilt_resampled,
        converter="medseg",
    )
    return out
