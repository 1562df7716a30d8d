"""The SOP classes medseg tells apart: DICOM-SEG and RT structure sets, the label objects that
``scan`` files apart from images and ``labels`` reads."""

from __future__ import annotations

import pydicom

SEG_STORAGE = ("1.2.840.10008.5.1.4.1.1.66.4", "1.2.840.10008.5.1.4.1.1.66.7")  # binary/fractional, label map
RTSTRUCT_STORAGE = "1.2.840.10008.5.1.4.1.1.481.3"


def sop_class_uid(ds: pydicom.Dataset) -> str:
    """The SOP class of a data set, from SOPClassUID or else its file meta ('' if neither)."""
    return str(ds.get("SOPClassUID", "") or getattr(ds.get("file_meta", None), "MediaStorageSOPClassUID", ""))
