"""Corrected masks that reviewers save from the case page.

The page sends the drawing as NIfTI (gzip or not), on the grid of the scan it was drawn on. A
correction is kept only when it is a mask of that case: the predicted mask's shape and affine,
whole numbers from 0 to the highest label, starting from a mask the case has shown (the predicted
one or an earlier correction). It is then written, atomically, as a new file of the review folder,
``corrections/<case>/<time>-<reviewer>-<random>.nii.gz``, with the predicted mask's header (the
scan's own geometry; the predicted mask is never touched), and recorded as the verdict ``fix`` with who saved it, when,
and the SHA-256 of the mask it started from and of itself. Anything else is refused with a
:class:`ConfigError` that says what was expected, and nothing is written.
"""

from __future__ import annotations

import logging
import math
import secrets
import zlib
from pathlib import Path
from typing import Any
from urllib.parse import quote

import nibabel as nib
import numpy as np

from medseg.errors import ConfigError
from medseg.io import atomic_path, sha256
from medseg.review import verdicts
from medseg.review.folder import mask_digest

log = logging.getLogger(__name__)

HEADER_ROOM = 64 * 1024


def upload_limit(entry: dict[str, Any]) -> int:
    """The most bytes a correction of the queue entry may have, packed or not: its voxels at 4 bytes each."""
    shape = nib.load(str(entry["mask"])).shape[:3]
    return 4 * math.prod(shape) + HEADER_ROOM


def _unpack(case_id: str, body: bytes, limit: int) -> bytes:
    if body[:2] != b"\x1f\x8b":
        return body
    inflate = zlib.decompressobj(wbits=31)
    try:
        raw = inflate.decompress(body, limit + 1)
    except zlib.error as err:
        raise ConfigError(f"case {case_id}: expected a gzip-packed NIfTI mask, found damaged gzip data ({err})") from None
    if len(raw) > limit:
        raise ConfigError(f"case {case_id}: expected a corrected mask of at most {limit} bytes unpacked, found more")
    return raw


def read_upload(case_id: str, body: bytes, reference: nib.Nifti1Image, labels: int, limit: int) -> np.ndarray:
    """The voxels of an uploaded correction, checked against the predicted mask ``reference``."""
    raw = _unpack(case_id, body, limit)
    try:
        image = nib.Nifti1Image.from_bytes(raw)
        data = np.asanyarray(image.dataobj)
    except Exception as err:  # nibabel raises many kinds on bad headers and short data
        raise ConfigError(f"case {case_id}: expected a NIfTI-1 mask, found {len(raw)} bytes that are not one "
                          f"({type(err).__name__}: {err})") from None
    while data.ndim > 3 and data.shape[-1] == 1:
        data = data[..., 0]
    expected = reference.shape[:3]
    if data.shape != expected:
        raise ConfigError(f"case {case_id}: expected a mask of the scan's shape {expected}, found {data.shape}")
    affine = image.affine
    if not np.allclose(affine, reference.affine, atol=1e-3, rtol=1e-4):
        raise ConfigError(f"case {case_id}: expected a mask on the scan's grid (affine {reference.affine.round(4).tolist()}), "
                          f"found the affine {np.asarray(affine).round(4).tolist()}")
    if not np.all(np.isfinite(data)) or not np.array_equal(data, np.round(data)):
        raise ConfigError(f"case {case_id}: expected whole label numbers in the mask, found fractions or NaN")
    found = np.unique(data)
    unknown = [int(v) for v in found if v < 0 or v > labels]
    if unknown:
        raise ConfigError(f"case {case_id}: expected label values 0 to {labels}, found {unknown[:10]}")
    return data.astype(np.uint8)


def _started_from(review_dir: Path, case_id: str, predicted: str) -> set[str]:
    """The masks a correction of the case may start from: its predicted mask and its corrections on it."""
    return {predicted} | {row.correction_sha256 for row in verdicts.history(review_dir, case_id)
                          if row.correction and row.mask_sha256 == predicted}


def _name(text: str) -> str:
    name = quote(text, safe="-_.") or "_"
    return "_" + name if name.startswith(".") else name


def save(review_dir: Path, entry: dict[str, Any], body: bytes, *, reviewer: str, base_sha256: str,
         note: str = "") -> verdicts.Verdict:
    """Check and save a correction of the queue ``entry``; see the module doc."""
    review_dir = Path(review_dir)
    case_id = entry["case_id"]
    reference = nib.load(str(entry["mask"]))
    predicted = mask_digest(entry["mask"])
    if base_sha256 not in _started_from(review_dir, case_id, predicted):
        raise ConfigError(f"case {case_id}: expected the SHA-256 of the mask the correction started from (the "
                          f"predicted mask {predicted[:12]}... or one of its corrections), found {base_sha256!r}")
    labels = max((int(k) for k in entry.get("labels") or {}), default=0)
    data = read_upload(case_id, body, reference, labels, upload_limit(entry))
    time = verdicts.now()
    unique = secrets.token_hex(4)  # two saves in the same millisecond keep both files
    stamp = f"{time.replace(':', '')}-{_name(reviewer or 'anonymous')}-{unique}"
    relative = Path(verdicts.CORRECTIONS) / _name(case_id) / f"{stamp}.nii.gz"
    target = review_dir / relative
    header = reference.header.copy()
    header.set_data_dtype(np.uint8)
    image = nib.Nifti1Image(data, reference.affine, header)
    image.header.set_slope_inter(1, 0)
    with atomic_path(target) as tmp:
        nib.save(image, str(tmp))
    try:
        row = verdicts.record(review_dir, case_id, "fix", note=note, reviewer=reviewer, mask_sha256=predicted,
                              flags=entry.get("flags", []), correction=relative.as_posix(),
                              base_sha256=base_sha256, correction_sha256=sha256(target), time=time)
    except BaseException:
        target.unlink(missing_ok=True)
        raise
    changed = int(np.count_nonzero(data != np.asarray(reference.dataobj)))
    log.info("case %s: correction by %s, %d voxels differ from the predicted mask -> %s", case_id, reviewer or "-",
             changed, target)
    return row
