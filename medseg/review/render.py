"""Pictures of one case: slices of its scan under its mask, as a reader of scans expects them.

A case is shown in the closest canonical (RAS) orientation of its scan, whatever the order of its
voxel axes: axial slices with anterior up and the patient's right on the left of the picture (the
radiological convention), coronal slices with superior up and the right on the left, sagittal
slices with superior up and anterior on the left. Pixels are square in millimetres (nearest
neighbour), so a scan of 0.8 x 0.8 x 2 mm shows the anatomy's proportions, not its grid's.

Layers: ``mask`` (each label filled in its colour at ``alpha`` and outlined in it), ``reference``
(the outline of a reference label, yellow), ``uncertainty`` (the uncertainty map from 0, clear,
to 1, red-yellow).
"""

from __future__ import annotations

import io
from collections.abc import Collection
from dataclasses import dataclass
from pathlib import Path

import nibabel as nib
import numpy as np

from medseg.errors import GeometryMismatchError
from medseg.io import load_nifti

VIEWS = {"sagittal": 0, "coronal": 1, "axial": 2}  # view -> the RAS axis it cuts across
LAYERS = ("mask", "reference", "uncertainty")
PALETTE = (  # label k gets PALETTE[(k - 1) % len(PALETTE)]
    (230, 25, 75), (60, 180, 75), (0, 130, 200), (245, 130, 48), (145, 30, 180),
    (70, 240, 240), (240, 50, 230), (210, 245, 60), (0, 128, 128), (170, 110, 40),
)
REFERENCE_COLOUR = (255, 225, 25)
MAX_WINDOW_SAMPLES = 2_000_000


def label_colour(label: int) -> tuple[int, int, int]:
    return PALETTE[(int(label) - 1) % len(PALETTE)]


@dataclass
class CaseImages:
    """A scan (its first channel) and the volumes drawn over it, all on its grid in RAS order."""

    image: np.ndarray
    mask: np.ndarray
    spacing: tuple[float, float, float]  # mm along R, A, S
    low: float  # the intensity window: low shows black, high white
    high: float
    reference: np.ndarray | None = None
    uncertainty: np.ndarray | None = None

    def slices(self, view: str) -> int:
        return int(self.mask.shape[VIEWS[view]])

    def busiest(self, view: str) -> int:
        """The slice of ``view`` with the most foreground voxels (the middle one if there are none)."""
        axis = VIEWS[view]
        counts = np.count_nonzero(self.mask, axis=tuple(a for a in range(3) if a != axis))
        return int(np.argmax(counts)) if counts.any() else self.slices(view) // 2


def _canonical(img: nib.Nifti1Image) -> nib.Nifti1Image:
    return nib.as_closest_canonical(img)


def _window(image: np.ndarray) -> tuple[float, float]:
    """The 0.5th and 99.5th percentiles of the scan (of a regular sample of a large one)."""
    step = max(1, int(np.ceil((image.size / MAX_WINDOW_SAMPLES) ** (1 / 3))))
    sample = image[::step, ::step, ::step].astype(np.float32)
    sample = sample[np.isfinite(sample)]
    if sample.size == 0:
        return 0.0, 1.0
    low, high = (float(v) for v in np.percentile(sample, [0.5, 99.5]))
    return (low, high) if high > low else (low, low + 1.0)


def _same_grid(img: nib.Nifti1Image, scan: nib.Nifti1Image, path: Path, scan_name: str) -> None:
    if tuple(img.shape[:3]) != tuple(scan.shape[:3]) or not np.allclose(img.affine, scan.affine, atol=1e-3):
        raise GeometryMismatchError(
            f"{path}: expected the grid of the scan {scan_name} (shape {tuple(scan.shape[:3])}), "
            f"found shape {tuple(img.shape[:3])}" + ("" if tuple(img.shape[:3]) != tuple(scan.shape[:3])
                                                      else " and another affine")
        )


def load_case(
    scan: nib.Nifti1Image,
    scan_name: str,
    mask_path: Path,
    *,
    reference_path: Path | None = None,
    uncertainty_path: Path | None = None,
    window: tuple[float, float] | None = None,
) -> CaseImages:
    """The case to draw: ``scan`` (3D, or 4D with channels last), the mask on its grid and,
    optionally, a reference label and an uncertainty map on that grid too (checked)."""
    mask_img = load_nifti(mask_path)
    _same_grid(mask_img, scan, mask_path, scan_name)
    canonical = _canonical(scan)
    image = np.asanyarray(canonical.dataobj)
    if image.ndim == 4:
        image = image[..., 0]
    mask = np.asanyarray(_canonical(mask_img).dataobj).round().astype(np.uint8)
    low, high = window if window is not None else _window(image)
    spacing = tuple(float(s) for s in np.sqrt((canonical.affine[:3, :3] ** 2).sum(axis=0)))
    extra = {}
    for key, path in (("reference", reference_path), ("uncertainty", uncertainty_path)):
        if path is not None:
            img = load_nifti(path)
            _same_grid(img, scan, path, scan_name)
            data = np.asanyarray(_canonical(img).dataobj)
            extra[key] = data.round().astype(np.uint8) if key == "reference" else data.astype(np.float32)
    return CaseImages(image, mask, spacing, float(low), float(high), **extra)  # type: ignore[arg-type]


def plane(volume: np.ndarray, view: str, index: int) -> np.ndarray:
    """Slice ``index`` of ``view`` of a RAS volume, rows top to bottom and columns left to right
    as displayed (see the module doc)."""
    cut: list[slice | int] = [slice(None)] * 3
    cut[VIEWS[view]] = index
    return volume[tuple(cut)].T[::-1, ::-1]  # a view: np.take would copy the whole volume


def pixel_mm(spacing: tuple[float, float, float], view: str) -> tuple[float, float]:
    """The millimetres of a row and of a column of ``plane``'s output."""
    first, second = (a for a in range(3) if a != VIEWS[view])
    return spacing[second], spacing[first]


def display_shape(shape: tuple[int, int], mm: tuple[float, float], size: int) -> tuple[int, int]:
    """The picture's rows and columns: square pixels in mm, the longer side ``size`` pixels."""
    height, width = shape[0] * mm[0], shape[1] * mm[1]
    scale = size / max(height, width)
    return max(1, round(height * scale)), max(1, round(width * scale))


def _nearest(length: int, out: int) -> np.ndarray:
    return np.minimum(((np.arange(out) + 0.5) * length / out).astype(np.int64), length - 1)


def _outline(inside: np.ndarray) -> np.ndarray:
    """The pixels of ``inside`` with a 4-neighbour outside it (or on the picture's border)."""
    padded = np.pad(inside, 1, constant_values=False)
    interior = padded[:-2, 1:-1] & padded[2:, 1:-1] & padded[1:-1, :-2] & padded[1:-1, 2:]
    return inside & ~interior


def render(
    case: CaseImages,
    view: str,
    index: int,
    *,
    layers: Collection[str] = ("mask", "reference"),
    alpha: float = 0.4,
    size: int = 384,
) -> np.ndarray:
    """Slice ``index`` of ``view`` as an RGB picture (uint8, rows x columns x 3) whose longer side
    is ``size`` pixels; see the module doc for the layers."""
    if view not in VIEWS:
        raise ValueError(f"expected a view of {sorted(VIEWS)}, found {view!r}")
    if not 0 <= index < case.slices(view):
        raise IndexError(f"expected a {view} slice from 0 to {case.slices(view) - 1}, found {index}")
    grey = plane(case.image, view, index)
    rows, cols = display_shape(grey.shape, pixel_mm(case.spacing, view), size)
    pick = np.ix_(_nearest(grey.shape[0], rows), _nearest(grey.shape[1], cols))

    def show(volume: np.ndarray) -> np.ndarray:
        return plane(volume, view, index)[pick]

    scaled = (grey[pick].astype(np.float32) - case.low) / (case.high - case.low)
    rgb = np.repeat((np.nan_to_num(scaled).clip(0, 1) * 255)[..., None], 3, axis=-1)
    if "uncertainty" in layers and case.uncertainty is not None:
        u = np.nan_to_num(show(case.uncertainty)).clip(0, 1)[..., None]
        heat = np.concatenate([np.full_like(u, 255), 255 * u, np.zeros_like(u)], axis=-1)
        rgb = rgb * (1 - 0.8 * u) + heat * 0.8 * u
    if "mask" in layers:
        mask = show(case.mask)
        for label in np.unique(mask):
            if label == 0:
                continue
            inside = mask == label
            colour = np.array(label_colour(label), dtype=np.float32)
            rgb[inside] = rgb[inside] * (1 - alpha) + colour * alpha
            rgb[_outline(inside)] = colour
    if "reference" in layers and case.reference is not None:
        reference = show(case.reference)
        for label in np.unique(reference):
            if label != 0:
                rgb[_outline(reference == label)] = REFERENCE_COLOUR
    return rgb.round().astype(np.uint8)


def overview(case: CaseImages, *, layers: Collection[str] = ("mask", "reference"), alpha: float = 0.4,
             size: int = 256, gap: int = 6) -> tuple[np.ndarray, dict[str, int]]:
    """The axial, coronal and sagittal slices with the most foreground side by side (the longer
    side of each ``size`` pixels), and the slice shown of each view."""
    shown = {view: case.busiest(view) for view in ("axial", "coronal", "sagittal")}
    pictures = [render(case, view, index, layers=layers, alpha=alpha, size=size) for view, index in shown.items()]
    height = max(p.shape[0] for p in pictures)
    width = sum(p.shape[1] for p in pictures) + gap * (len(pictures) - 1)
    out = np.zeros((height, width, 3), dtype=np.uint8)
    left = 0
    for picture in pictures:
        top = (height - picture.shape[0]) // 2
        out[top : top + picture.shape[0], left : left + picture.shape[1]] = picture
        left += picture.shape[1] + gap
    return out, shown


def png(rgb: np.ndarray) -> bytes:
    """An RGB picture as PNG bytes."""
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(np.ascontiguousarray(rgb)).save(buffer, format="PNG", optimize=False)
    return buffer.getvalue()
