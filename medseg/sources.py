"""Find the cases of a dataset: MSD / nnU-Net folders, case sheets, folders of DICOM series."""

from __future__ import annotations

import csv
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Literal

from medseg.errors import DataError
from medseg.io import is_nifti, read_json, strip_nifti_suffix

SourceKind = Literal["msd", "nnunet", "sheet", "dicom", "nifti"]
_CHANNEL = re.compile(r"^(?P<case>.+)_(?P<channel>\d{4})$")


@dataclass(frozen=True)
class CaseSource:
    """Where one case's files are: one path per channel (or one DICOM folder), optional label."""

    case_id: str
    images: tuple[Path, ...]
    label: Path | None = None
    kind: Literal["nifti", "dicom"] = "nifti"
    dicom_files: tuple[Path, ...] = ()  # the DICOM series a NIfTI was converted from (for DICOM-SEG output)


@dataclass(frozen=True)
class DatasetSource:
    """The cases found in an input, with what the input declares about them."""

    root: Path
    kind: SourceKind
    cases: tuple[CaseSource, ...]
    labels: dict[int, str] | None = None
    modality: str | None = None
    test_cases: tuple[CaseSource, ...] = field(default=())


def _resolve(base: Path, rel: str) -> Path:
    path = Path(rel)
    return path if path.is_absolute() else (base / path).resolve()


def _group_channels(files: list[Path]) -> dict[str, list[Path]]:
    """Group ``case_0000.nii.gz``, ``case_0001.nii.gz`` by case; files without a suffix are one channel."""
    groups: dict[str, list[tuple[int, Path]]] = {}
    for path in files:
        stem = strip_nifti_suffix(path.name)
        match = _CHANNEL.match(stem)
        case, channel = (match["case"], int(match["channel"])) if match else (stem, 0)
        groups.setdefault(case, []).append((channel, path))
    return {case: [p for _, p in sorted(items)] for case, items in sorted(groups.items())}


def _labels_from_json(info: dict, where: Path) -> dict[int, str] | None:
    labels = info.get("labels")
    if labels is None:
        return None
    try:
        if all(str(k).lstrip("-").isdigit() for k in labels):  # MSD: {"0": "background"}
            return {int(k): str(v) for k, v in labels.items()}
        return {int(v): str(k) for k, v in labels.items()}  # nnU-Net v2: {"background": 0}
    except (TypeError, ValueError):
        raise DataError(f"{where}: expected 'labels' to map integers to names, found {labels!r}") from None


def _modality_from_json(info: dict) -> str | None:
    modality = info.get("modality") or info.get("channel_names")
    if isinstance(modality, dict) and modality:
        return str(modality.get("0", next(iter(modality.values()))))
    return None


def _entries(info: dict, key: str, where: Path) -> list:
    entries = info.get(key) or []
    if not isinstance(entries, list):
        raise DataError(f"{where}: expected '{key}' to be a list, found {type(entries).__name__} {entries!r:.60}")
    return entries


def read_dataset_folder(root: Path) -> DatasetSource:
    """An MSD (``training`` list) or nnU-Net v2 (``channel_names``, ``file_ending``) folder."""
    meta_path = root / "dataset.json"
    info = read_json(meta_path)
    if not isinstance(info, dict):
        raise DataError(f"{meta_path}: expected a JSON object, found {type(info).__name__}")
    labels = _labels_from_json(info, meta_path)
    modality = _modality_from_json(info)
    if "training" in info:
        cases = []
        for n, entry in enumerate(_entries(info, "training", meta_path)):
            if not isinstance(entry, dict) or not isinstance(entry.get("image"), str):
                raise DataError(f"{meta_path}: expected training[{n}] to be an object with an 'image' path, "
                                f"found {entry!r}")
            if not isinstance(entry.get("label") or "", str):
                raise DataError(f"{meta_path}: expected training[{n}].label to be a path, found {entry['label']!r}")
            image = _resolve(root, entry["image"])
            label = _resolve(root, entry["label"]) if entry.get("label") else None
            case_id = strip_nifti_suffix(image.name)
            cases.append(CaseSource(case_id, (image,), label))
        tests = []
        for n, entry in enumerate(_entries(info, "test", meta_path)):
            path = entry if isinstance(entry, str) else entry.get("image") if isinstance(entry, dict) else None
            if not isinstance(path, str):
                raise DataError(f"{meta_path}: expected test[{n}] to be a path or an object with an 'image' path, "
                                f"found {entry!r}")
            image = _resolve(root, path)
            tests.append(CaseSource(strip_nifti_suffix(image.name), (image,)))
        return DatasetSource(root, "msd", tuple(cases), labels, modality, tuple(tests))
    images_dir, labels_dir = root / "imagesTr", root / "labelsTr"
    if not images_dir.is_dir():
        raise DataError(f"{root}: expected imagesTr/ beside dataset.json, found none")
    ending = info.get("file_ending", ".nii.gz")
    groups = _group_channels(sorted(p for p in images_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("._")))
    cases = tuple(CaseSource(case, tuple(paths), labels_dir / f"{case}{ending}") for case, paths in groups.items())
    test_dir = root / "imagesTs"
    tests: tuple[CaseSource, ...] = ()
    if test_dir.is_dir():
        tgroups = _group_channels(sorted(p for p in test_dir.iterdir() if p.name.endswith(ending) and not p.name.startswith("._")))
        tests = tuple(CaseSource(case, tuple(paths)) for case, paths in tgroups.items())
    return DatasetSource(root, "nnunet", cases, labels, modality, tests)


def read_case_sheet(sheet: Path) -> DatasetSource:
    """A tab-separated ``cases.tsv``: columns ``case_id``, ``image`` (paths joined by ';'), optional ``label``.

    Relative paths are relative to the sheet's folder.
    """
    base = sheet.parent
    with open(sheet, newline="") as handle:
        reader = csv.DictReader(handle, delimiter="\t")
        missing = {"case_id", "image"} - set(reader.fieldnames or [])
        if missing:
            raise DataError(f"{sheet}: expected columns case_id, image (and optional label), missing {sorted(missing)}")
        cases = []
        seen: set[str] = set()
        for line_no, row in enumerate(reader, start=2):
            case_id = (row.get("case_id") or "").strip()
            if not case_id or not (row.get("image") or "").strip():
                raise DataError(f"{sheet}:{line_no}: expected a case_id and an image path, found {row!r}")
            if case_id in seen:
                raise DataError(f"{sheet}:{line_no}: case_id '{case_id}' appears twice")
            seen.add(case_id)
            images = tuple(_resolve(base, p.strip()) for p in row["image"].split(";") if p.strip())
            label = (row.get("label") or "").strip()
            kind = "dicom" if len(images) == 1 and images[0].is_dir() else "nifti"
            cases.append(CaseSource(case_id, images, _resolve(base, label) if label else None, kind))
    return DatasetSource(sheet, "sheet", tuple(cases))


def read_dicom_tree(root: Path) -> DatasetSource:
    """A DICOM folder of any structure: one case per series (its files listed as the case's images)."""
    from medseg.dicom import scan

    found = scan(root)
    cases = tuple(
        CaseSource(group.case_id, files, None, "dicom", files)
        for group in found.series
        for files in [tuple(sorted({f.path for f in group.frames}))]
    )
    if not cases:
        raise DataError(f"{root}: expected DICOM image series, found none ({len(found.refused)} files refused)")
    return DatasetSource(root, "dicom", cases)


def is_dicom_root(path: Path) -> bool:
    """True for a folder without dataset.json, cases.tsv or NIfTI files that holds DICOM somewhere below."""
    path = Path(path)
    if not path.is_dir() or (path / "dataset.json").exists() or (path / "cases.tsv").exists():
        return False
    if any(is_nifti(p) for p in path.iterdir()):
        return False
    from medseg.dicom import is_dicom_series_folder  # pydicom only when needed

    return is_dicom_series_folder(path)


def read_nifti_folder(root: Path) -> DatasetSource:
    """A plain folder of NIfTI scans (``case.nii.gz`` or ``case_0000.nii.gz``), no labels."""
    groups = _group_channels(sorted(p for p in root.iterdir() if is_nifti(p)))
    return DatasetSource(root, "nifti", tuple(CaseSource(c, tuple(p)) for c, p in groups.items()))


def _refuse_dicom_beside_nifti(folder: Path) -> None:
    """A folder of NIfTI scans that also holds DICOM files (beside them or below) is refused: reading
    one kind would leave the other out without a word."""
    from medseg.dicom import is_dicom_series_folder  # pydicom only when needed
    from medseg.dicom.scan import list_files

    others = [p for p in list_files(folder) if not is_nifti(p) and p.suffix.lower() not in _NOT_DICOM]
    if not others or not is_dicom_series_folder(folder, others):
        return
    nifti = sorted(p.name for p in folder.iterdir() if is_nifti(p))
    places = sorted({str(p.parent.relative_to(folder)) or "." for p in others})
    raise DataError(
        f"{folder}: expected one kind of scan, found both NIfTI files ({len(nifti)}, e.g. {nifti[0]}) and DICOM "
        f"files (in {', '.join(places[:3])}{', ...' if len(places) > 3 else ''}); put the DICOM series in a folder of "
        "their own, or list both kinds in a cases.tsv"
    )


# Files beside NIfTI scans that are not taken for DICOM (sidecars, notes, checksums).
_NOT_DICOM = {".json", ".txt", ".md", ".csv", ".tsv", ".yaml", ".yml", ".sha256", ".md5", ".png", ".jpg"}


def discover(path: Path) -> DatasetSource:
    """Recognise the kind of input at ``path`` and list its cases."""
    path = Path(path)
    if not path.exists():
        raise DataError(f"input not found: {path}")
    if path.is_file():
        if path.suffix in (".tsv", ".txt"):
            return read_case_sheet(path)
        raise DataError(f"{path}: expected a folder or a .tsv case sheet, found a {path.suffix or 'plain'} file")
    if (path / "dataset.json").exists():
        return read_dataset_folder(path)
    if (path / "cases.tsv").exists():
        return read_case_sheet(path / "cases.tsv")
    if any(is_nifti(p) for p in path.iterdir()):
        _refuse_dicom_beside_nifti(path)
        return read_nifti_folder(path)
    if is_dicom_root(path):
        return read_dicom_tree(path)
    raise DataError(
        f"{path}: expected dataset.json (MSD/nnU-Net), cases.tsv, NIfTI files or DICOM files; found none"
    )
