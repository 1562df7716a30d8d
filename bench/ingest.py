"""Benchmark: DICOM to NIfTI with medseg, dcm2niix and dicom2nifti on the same folders, in one run.

    .venv/bin/python bench/ingest.py [--data ../shared/data/dicom] [--repeats 3] [--out bench/results/ingest.json]

Each tool converts each folder (dcm_qa_nih/In, dcm_qa_ts/In, dicom2nifti) into a fresh temporary
folder, as a subprocess, so start-up and imports count as a user sees them; then the three folders
copied into one tree, converted by a single run of each tool (start-up paid once, as when a user
hands over one folder). The goals ("over the whole set") are checked on the single run over the
whole set ("one tree"); the sum of the three separate runs ("all", each paying start-up again) is
printed beside them for information. The runs are repeated
(interleaving the tools, in a rotating order) and the median is reported. Wall time is
time.perf_counter() around the subprocess; peak memory is the largest resident set of any single
process of the run (GNU `/usr/bin/time -f %M`, or getrusage(RUSAGE_CHILDREN) in a small Python
wrapper where that is missing). All three write gzip .nii.gz at their fastest level: medseg with
ISA-L (`isal`) level 1, dicom2nifti with nibabel's zlib level 1, dcm2niix with `-z i -1` (its
internal zlib at level 1).

The outputs of the last repeat are then compared tool against tool: each output is matched to its
DICOM series folder(s) and series number, both images are brought to the closest canonical (RAS)
orientation, and the voxel values (scaling applied) and affines (within 1e-3 mm) are compared.
dcm2niix's source files come from one extra, untimed `-v 1` run; dicom2nifti's from replaying its
grouping by SeriesInstanceUID. Prints a table and writes bench/results/ingest.json.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from functools import lru_cache
from pathlib import Path

import nibabel as nib
import numpy as np

REPO = Path(__file__).resolve().parents[1]
FOLDERS = ("dcm_qa_nih/In", "dcm_qa_ts/In", "dicom2nifti")
TOOLS = ("medseg", "dcm2niix", "dicom2nifti")
TREE = "one tree"  # the three folders copied into one tree and converted by one run of each tool
AFFINE_TOL_MM = 1e-3
GNU_TIME = "/usr/bin/time"
# Fallback when GNU time is missing: run the tool and write the children's peak RSS (KiB).
RSS_WRAPPER = ("import resource, subprocess, sys; rc = subprocess.call(sys.argv[2:]); "
               "open(sys.argv[1], 'w').write(str(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss)); "
               "sys.exit(rc)")
DICOM2NIFTI = ("import sys, dicom2nifti; "
               "dicom2nifti.convert_directory(sys.argv[1], sys.argv[2], compression=True, reorient=False)")


def commands(bin_dir: Path) -> dict[str, Callable[[Path, Path], list[str]]]:
    """Each tool's command line for one input folder and one output folder."""
    return {
        "medseg": lambda src, out: [str(bin_dir / "medseg"), "ingest", str(src), "--out", str(out)],
        # -z i: internal zlib (no pigz, as for the others); -1: gzip level 1; -b y: JSON sidecar like
        # medseg's; -d 9: search all sub-folders; -f %s_%d: series number and description.
        "dcm2niix": lambda src, out: [str(bin_dir / "dcm2niix"), "-z", "i", "-1", "-b", "y", "-d", "9",
                                      "-f", "%s_%d", "-o", str(out), str(src)],
        "dicom2nifti": lambda src, out: [str(bin_dir / "python"), "-c", DICOM2NIFTI, str(src), str(out)],
    }


def measure(argv: list[str], log: Path, env: dict[str, str]) -> tuple[float, float, int]:
    """Run one command; return (wall seconds, peak RSS in MiB, exit status)."""
    rss_file = log.with_suffix(".rss")
    if Path(GNU_TIME).exists():
        cmd = [GNU_TIME, "-f", "%M", "-o", str(rss_file), *argv]
    else:
        cmd = [sys.executable, "-c", RSS_WRAPPER, str(rss_file), *argv]
    with log.open("wb") as fh:
        start = time.perf_counter()
        rc = subprocess.run(cmd, stdout=fh, stderr=subprocess.STDOUT, cwd=REPO, env=env).returncode
        wall = time.perf_counter() - start
    peak_kib = int(rss_file.read_text().split()[-1])  # GNU time puts "Command exited ..." first on failure
    return wall, peak_kib / 1024, rc


def count_converted(tool: str, out: Path) -> int:
    if tool == "medseg":
        return len(json.loads((out / "report.json").read_text())["converted"])
    if tool == "dcm2niix":
        return len(list(out.glob("*.json")))  # one sidecar per series; _Eq/_Tilt variants have none
    return len(list(out.glob("*.nii.gz")))


# --- which DICOM series each output came from ---------------------------------------------------

def _rel(path: str | Path, data: Path) -> str:
    p = Path(path)
    p = p if p.is_absolute() else REPO / p
    return os.path.relpath(p.resolve(), data.resolve())


def records_medseg(src: Path, out: Path, data: Path) -> tuple[list[dict], list[dict]]:
    """Every converted case of report.json, with its DICOM files from manifest.json (or, for a case the
    manifest leaves out, from medseg's own scan of the folder)."""
    manifest = json.loads((out / "manifest.json").read_text())
    report = json.loads((out / "report.json").read_text())
    sources = {c["case_id"]: [s["path"] for s in c["sources"]] for c in manifest["cases"]}
    if any(c["case_id"] not in sources for c in report["converted"]):
        sources = {**scan_sources(src), **sources}
    records = []
    for case in report["converted"]:
        side = json.loads((out / case["image"]).with_name(case["case_id"] + ".json").read_text())
        files = [_rel(p, data) for p in sources.get(case["case_id"], [])]
        records.append({"tool": "medseg", "output": case["image"], "path": str(out / case["image"]),
                        "series": {side.get("SeriesNumber")}, "description": side.get("SeriesDescription", ""),
                        "folders": {str(Path(f).parent) for f in files}, "files": files})
    refused = [{"series": _rel(r["file"], data), "case_id": r["case_id"], "error": r["error"]}
               for r in report["refused"]]
    kept = {c["case_id"] for c in manifest["cases"]}
    for rec, case in zip(records, report["converted"]):
        if case["case_id"] not in kept:
            why = next((f["error"] for f in manifest.get("failed", []) if f["case_id"] == case["case_id"]), "")
            refused.append({"series": sorted(rec["folders"])[0] if rec["folders"] else case["case_id"],
                            "case_id": case["case_id"],
                            "error": f"converted, but left out of manifest.json ({why or 'no reason given'})"})
    return records, refused


def scan_sources(src: Path) -> dict[str, list[str]]:
    """case id -> DICOM files, from medseg's scan, numbered as medseg ingest numbers repeated ids."""
    from medseg.dicom import scan

    seen: dict[str, int] = {}
    out = {}
    for group in scan(src).series:
        seen[group.case_id] = seen.get(group.case_id, 0) + 1
        case_id = group.case_id if seen[group.case_id] == 1 else f"{group.case_id}_{seen[group.case_id]}"
        out[case_id] = sorted(str(f.path) for f in group.frames)
    return out


def records_dcm2niix(argv: list[str], out: Path, data: Path, env: dict[str, str]) -> tuple[list[dict], list[dict]]:
    """Convert once more with -v 1 (untimed) and read which files went into each output."""
    text = subprocess.run(argv[:-1] + ["-v", "1", argv[-1]], capture_output=True, text=True, cwd=REPO,
                          env=env).stdout
    records, failed, dupes, first = [], [], set(), None
    for line in text.splitlines():
        if m := re.match(r"^\t(.+)\t=\t(.+)$", line):
            dupes.update(m.groups())
        elif line.startswith("Converting "):
            first = line[len("Converting "):].strip()
        elif m := re.match(r"^Convert \d+ DICOM as (.+) \((\S+)\)$", line):
            prefix = Path(m.group(1))
            side = json.loads(prefix.with_name(prefix.name + ".json").read_text())
            files = [_rel(f, data) for f in ([first] if first else []) + sorted(dupes)]
            for nii in sorted(prefix.parent.glob(glob_escape(prefix.name) + "*.nii.gz")):
                variant = nii.name[len(prefix.name):-len(".nii.gz")]
                if variant and not re.fullmatch(r"(_Tilt|_Eq|_Tilt_Eq)_\d+", variant):
                    continue  # another series whose name starts with this one's
                records.append({"tool": "dcm2niix", "output": nii.name, "path": str(nii),
                                "series": {side.get("SeriesNumber")}, "description": side.get("SeriesDescription", ""),
                                "folders": {str(Path(f).parent) for f in files}, "files": files,
                                "variant": variant.lstrip("_") or None})
            dupes, first = set(), None
        elif re.match(r"^\s*error", line, re.IGNORECASE):
            failed.append({"series": first and str(Path(_rel(first, data)).parent), "error": line.strip()})
    return records, failed


def glob_escape(name: str) -> str:
    return re.sub(r"([\[\]*?])", r"[\1]", name)


def records_dicom2nifti(src: Path, out: Path, data: Path, extra: Path) -> tuple[list[dict], list[dict]]:
    """Replay dicom2nifti's grouping (by SeriesInstanceUID, file name from series number and
    description). Where a name is missing or shared, convert those groups again (untimed, into
    ``extra``) to learn which failed and why; a group whose file a later group of the same name
    overwrote is compared through that re-conversion."""
    import logging
    import warnings

    from dicom2nifti import common, convert_dicom, convert_dir, settings
    from pydicom import dcmread

    logging.getLogger("dicom2nifti").setLevel(logging.CRITICAL)
    warnings.filterwarnings("ignore", category=RuntimeWarning, module="dicom2nifti")
    groups: dict[str, list[str]] = {}
    first: dict[str, object] = {}
    numbers: dict[str, set] = {}
    for root, _, names in os.walk(src):
        for name in names:
            path = os.path.join(root, name)
            try:
                if not common.is_dicom_file(path):
                    continue
                ds = dcmread(path, defer_size="1 KB", stop_before_pixels=True, force=settings.pydicom_read_force)
                if not convert_dir._is_valid_imaging_dicom(ds):
                    continue
            except Exception:  # dicom2nifti skips unreadable files the same way
                continue
            uid = ds.SeriesInstanceUID
            groups.setdefault(uid, []).append(path)
            first.setdefault(uid, ds)
            numbers.setdefault(uid, set()).add(ds.get("SeriesNumber"))
    by_name: dict[str, list[str]] = {}
    for uid in groups:  # the file name, as convert_directory builds it
        ds = first[uid]
        base = convert_dir._remove_accents(str(ds.SeriesInstanceUID))
        if "SeriesNumber" in ds:
            base = convert_dir._remove_accents(f"{ds.SeriesNumber}")
            for key in ("SeriesDescription", "SequenceName", "ProtocolName"):
                if key in ds:
                    base = convert_dir._remove_accents(f"{base}_{ds.get(key)}")
                    break
        by_name.setdefault(base, []).append(uid)

    def record(uid: str, output: str, path: Path) -> dict:
        files = sorted(_rel(p, data) for p in groups[uid])
        return {"tool": "dicom2nifti", "output": output, "path": str(path), "series": numbers[uid],
                "description": str(first[uid].get("SeriesDescription", "")),
                "folders": {str(Path(f).parent) for f in files}, "files": files}

    def where(uid: str) -> str:
        return ", ".join(sorted({_rel(Path(p).parent, data) for p in groups[uid]}))

    records, failed = [], []
    extra.mkdir(parents=True, exist_ok=True)
    for base, uids in by_name.items():
        target = out / f"{base}.nii.gz"
        if target.exists() and len(uids) == 1:
            records.append(record(uids[0], target.name, target))
            continue
        done = []
        for k, uid in enumerate(uids):
            again = extra / f"{base}.{k}.nii.gz"
            try:
                headers = [dcmread(p, force=settings.pydicom_read_force) for p in groups[uid]]
                convert_dicom.dicom_array_to_nifti(headers, str(again), False)
                done.append((uid, again))
            except Exception as err:  # what convert_directory catches, prints and goes on from
                failed.append({"series": where(uid), "name": base, "error": f"{type(err).__name__}: {err}".strip()})
        for uid, again in done[:-1]:
            failed.append({"series": where(uid), "name": base,
                           "error": "converted, then overwritten by a later series of the same file name"})
            records.append(record(uid, f"{target.name} (overwritten; re-converted untimed)", again))
        if done and target.exists():
            records.append(record(done[-1][0], target.name, target))
    return records, failed


# --- comparing two outputs ----------------------------------------------------------------------

@lru_cache(maxsize=None)
def canonical(path: str) -> tuple[np.ndarray, np.ndarray, str, str]:
    """Voxels (scaled, float64; RGB as a last axis of 3) and affine in the closest canonical orientation."""
    img = nib.load(path)
    raw = np.asanyarray(img.dataobj)
    note = ""
    if raw.dtype.names:  # RGB24 / RGBA32
        fields = [f for f in raw.dtype.names if f != "A"]
        note = "RGBA, alpha dropped" if "A" in raw.dtype.names else "RGB"
        raw = np.stack([raw[f] for f in fields], axis=-1)
    data = raw.astype(np.float64)
    data = data.reshape(data.shape[:3] + tuple(s for s in data.shape[3:] if s != 1))
    ornt = nib.orientations.io_orientation(img.affine)
    data = nib.orientations.apply_orientation(data, ornt)
    affine = img.affine @ nib.orientations.inv_ornt_aff(ornt, img.shape[:3])
    return data, affine, str(img.get_data_dtype()), note


def compare(path_a: str, path_b: str) -> dict:
    a, aff_a, dtype_a, note_a = canonical(path_a)
    b, aff_b, dtype_b, note_b = canonical(path_b)
    out: dict = {"reasons": [], "dtype": [dtype_a, dtype_b], "orientation": [
        "".join(nib.aff2axcodes(nib.load(p).affine)) for p in (path_a, path_b)]}
    if note_a or note_b:
        out["note"] = [note_a, note_b]
    aff_diff = float(np.abs(aff_a - aff_b).max())
    out["affine_max_diff_mm"] = aff_diff
    if aff_diff > AFFINE_TOL_MM:
        out["reasons"].append("affine")
        out["spacing_mm"] = [np.sqrt((m[:3, :3] ** 2).sum(0)).round(4).tolist() for m in (aff_a, aff_b)]
        out["origin_ras_mm"] = [m[:3, 3].round(3).tolist() for m in (aff_a, aff_b)]
        out["affines_ras"] = [m.round(4).tolist() for m in (aff_a, aff_b)]
    if a.shape != b.shape:
        out["reasons"].append("shape")
        out["shape_ras"] = [list(a.shape), list(b.shape)]
        return out
    tol = 1e-5 * max(1.0, float(np.abs(a).max()))
    diff = np.abs(a - b)
    if diff.max() > tol:
        out["reasons"].append("values")
        out["max_abs_diff"] = float(diff.max())
        out["voxels_differing"] = f"{int((diff > tol).sum())} of {diff.size}"
        out["range"] = [[float(a.min()), float(a.max())], [float(b.min()), float(b.max())]]
        out["hint"] = value_hint(a, b, tol)
    return out


def value_hint(a: np.ndarray, b: np.ndarray, tol: float) -> str:
    """A guess at why two same-shaped volumes differ: a flip, a scaling, a volume order."""
    for axes in ((0,), (1,), (2,), (0, 1), (0, 2), (1, 2), (0, 1, 2)):
        if np.allclose(np.flip(a, axes), b, atol=tol, rtol=0):
            return f"equal after flipping RAS axes {axes}"
    design = np.stack([a.ravel(), np.ones(a.size)], 1)
    (scale, offset), *_ = np.linalg.lstsq(design, b.ravel(), rcond=None)
    if np.allclose(a * scale + offset, b, atol=max(tol, 1e-3 * float(np.abs(b).max())), rtol=0):
        return f"b = {scale:.6g} * a + {offset:.6g} (slope/intercept?)"
    if a.ndim == 4:
        order = [next((j for j in range(b.shape[3]) if np.allclose(a[..., i], b[..., j], atol=tol, rtol=0)), None)
                 for i in range(a.shape[3])]
        if None not in order:
            return f"same volumes in another order: b index of each a volume {order}"
    if a.ndim >= 3:
        same = [k for k in range(a.shape[2]) if np.allclose(a[:, :, k], b[:, :, k], atol=tol, rtol=0)]
        if same:
            return f"slices equal along the 3rd RAS axis: {same} of {a.shape[2]}"
    corr = np.corrcoef(a.ravel(), b.ravel())[0, 1] if a.std() and b.std() else float("nan")
    return f"correlation {corr:.4f}"


def label(rec: dict) -> str:
    folders = sorted(rec["folders"])
    where = folders[0] if len(folders) == 1 else "{" + ", ".join(folders) + "}"
    if len(rec["files"]) == 1 and len(folders) == 1:
        where = rec["files"][0]
    series = "/".join(str(s) for s in sorted(rec["series"], key=str))
    return f"{where} #{series} -> {rec['output']}"


def agreement(recs_a: list[dict], recs_b: list[dict]) -> dict:
    """Match each output of tool A to tool B's outputs of the same series (number and folder) and compare."""
    matched_b, rows = set(), []
    for ra in recs_a:
        cands = [rb for rb in recs_b if ra["series"] & rb["series"] and ra["folders"] & rb["folders"]]
        how = "series folder and number"
        if not ra["folders"]:  # sources unknown: fall back on series number and shape
            cands = [rb for rb in recs_b if ra["series"] & rb["series"]
                     and canonical(ra["path"])[0].shape == canonical(rb["path"])[0].shape]
            how = "series number and shape"
        if not cands:
            rows.append({"a": label(ra), "status": f"only {ra['tool']}"})
            continue
        results = [(rb, compare(ra["path"], rb["path"])) for rb in cands]
        matched_b.update(id(rb) for rb, _ in results)
        good = [rb for rb, r in results if not r["reasons"]]
        if good:
            worst = max(r["affine_max_diff_mm"] for _, r in results if not r["reasons"])
            rows.append({"a": label(ra), "b": [label(rb) for rb in good], "status": "agree", "matched_by": how,
                         "affine_max_diff_mm": worst})
        else:
            rb, best = min(results, key=lambda t: (len(t[1]["reasons"]), "shape" in t[1]["reasons"]))
            rows.append({"a": label(ra), "b": [label(rb)], "status": "differ", "matched_by": how, **best})
    for rb in recs_b:
        if id(rb) not in matched_b:
            rows.append({"b": [label(rb)], "status": f"only {rb['tool']}"})
    counts: dict[str, int] = {}
    for row in rows:
        key = row["status"] + ("" if row["status"] != "differ" else " (" + ", ".join(row["reasons"]) + ")")
        counts[key] = counts.get(key, 0) + 1
    return {"counts": counts, "series": rows}


# --- the run ------------------------------------------------------------------------------------

def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    default_data = Path(os.environ.get("MEDSEG_DATA", REPO.parent / "shared" / "data")) / "dicom"
    ap.add_argument("--data", type=Path, default=default_data, help="the dicom folder (default: %(default)s)")
    ap.add_argument("--repeats", type=int, default=3)
    ap.add_argument("--out", type=Path, default=REPO / "bench" / "results" / "ingest.json")
    args = ap.parse_args()
    data = args.data.resolve()
    missing = [f for f in FOLDERS if not (data / f).is_dir()]
    if missing:
        sys.exit(f"expected the folders {', '.join(FOLDERS)} under {data}; missing: {', '.join(missing)}")
    bin_dir = Path(sys.executable).parent
    if not (bin_dir / "dcm2niix").exists():
        sys.exit(f"no dcm2niix in {bin_dir}: install the bench extra (pip install -e '.[bench]')")
    env = {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}
    cmd = commands(bin_dir)
    info = versions(bin_dir, env)
    print(f"medseg {info['medseg']} from {info['medseg_source']} ({info['medseg_commit']}), dcm2niix {info['dcm2niix']}, "
          f"dicom2nifti {info['dicom2nifti']}; data {data}", file=sys.stderr)
    work = Path(tempfile.mkdtemp(prefix="medseg-bench-ingest-"))
    # The whole set as one folder tree, as a user hands it over: each tool starts once (untimed copy).
    tree = work / "tree"
    for folder in FOLDERS:
        shutil.copytree(data / folder, tree / folder.split("/")[0])
    sources = {**{f: data / f for f in FOLDERS}, TREE: tree}
    runs: dict[tuple[str, str], list[dict]] = {(t, f): [] for t in TOOLS for f in sources}
    last: dict[tuple[str, str], Path] = {}
    try:
        for rep in range(args.repeats):
            for fi, folder in enumerate(sources):
                shift = (rep + fi) % len(TOOLS)
                for tool in TOOLS[shift:] + TOOLS[:shift]:
                    out = work / f"{tool}-{folder.replace('/', '_')}-{rep}"
                    out.mkdir()
                    wall, peak, rc = measure(cmd[tool](sources[folder], out), out.with_suffix(".log"), env)
                    n = count_converted(tool, out) if rc == 0 else 0
                    runs[tool, folder].append({"wall_s": wall, "peak_mib": peak, "rc": rc, "converted": n})
                    print(f"[{rep + 1}/{args.repeats}] {folder:14} {tool:12} {wall:7.2f} s {peak:7.0f} MiB "
                          f"{n:3d} series" + (f"  FAILED rc={rc}, see {out.with_suffix('.log')}" if rc else ""),
                          file=sys.stderr)
                    if (tool, folder) in last:
                        shutil.rmtree(last[tool, folder])
                    last[tool, folder] = out
        report = summarize(runs, args.repeats)
        print_table(report)
        print("\nchecking that the outputs agree ...", file=sys.stderr)
        report["agreement"], report["refused_or_failed"] = check_agreement(last, data, cmd, env, work)
        print_agreement(report)
    finally:
        if any(r["rc"] for rs in runs.values() for r in rs):
            print(f"a run failed: its output and log are kept in {work}", file=sys.stderr)
        else:
            shutil.rmtree(work, ignore_errors=True)
    report.update({
        "machine": {"cpus": os.cpu_count(), "platform": platform.platform(), "python": platform.python_version()},
        "data": str(data), "repeats": args.repeats,
        "peak_memory": "largest resident set of one process of the run: " +
                       ("GNU time %M" if Path(GNU_TIME).exists() else "getrusage(RUSAGE_CHILDREN) in a wrapper"),
        "commands": {t: " ".join(cmd[t]("IN", "OUT")).replace(str(bin_dir) + "/", "") for t in TOOLS},
        "versions": info,
    })
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2, default=sorted))
    print(f"\nwritten {args.out}")


def summarize(runs: dict, repeats: int) -> dict:
    med = statistics.median
    rows = []
    for folder in FOLDERS + ("all", TREE):
        for tool in TOOLS:
            if folder == "all":  # per repeat: the sum over folders; then the median over repeats
                walls = [sum(runs[tool, f][r]["wall_s"] for f in FOLDERS) for r in range(repeats)]
                peak = max(x["peak_mib"] for f in FOLDERS for x in runs[tool, f])
                n = sum(runs[tool, f][-1]["converted"] for f in FOLDERS)
            else:
                walls = [x["wall_s"] for x in runs[tool, folder]]
                peak = med([x["peak_mib"] for x in runs[tool, folder]])
                n = runs[tool, folder][-1]["converted"]
            rows.append({"tool": tool, "folder": folder, "wall_s": med(walls), "walls_s": walls, "peak_mib": peak,
                         "converted": n})
    for row in rows:
        ref = {r["tool"]: r for r in rows if r["folder"] == row["folder"]}
        for peer in ("dcm2niix", "dicom2nifti"):
            row[f"time_vs_{peer}"] = row["wall_s"] / ref[peer]["wall_s"]
            row[f"memory_vs_{peer}"] = row["peak_mib"] / ref[peer]["peak_mib"]
    goals = {}
    for where in (TREE, "all"):  # one run on the whole set (the goal), and the sum of three runs per tool
        total = {r["tool"]: r for r in rows if r["folder"] == where}
        goals[where] = {
            "medseg_time_vs_dcm2niix": total["medseg"]["time_vs_dcm2niix"],
            "medseg_at_most_2x_dcm2niix": total["medseg"]["time_vs_dcm2niix"] <= 2.0,
            "dicom2nifti_time_vs_medseg": 1 / total["medseg"]["time_vs_dicom2nifti"],
            "medseg_at_least_3x_faster_than_dicom2nifti": 1 / total["medseg"]["time_vs_dicom2nifti"] >= 3.0,
        }
    return {"table": rows, "goals": goals,
            "runs": {f"{t} {f}": runs[t, f] for t, f in runs}}


def print_table(report: dict) -> None:
    print(f"\n{'tool':12} {'folder':14} {'wall s':>7} {'peak MiB':>9} {'series':>6} "
          f"{'time/dcm2niix':>13} {'time/dicom2nifti':>16} {'mem/dcm2niix':>12} {'mem/dicom2nifti':>15}")
    for r in report["table"]:
        if r["folder"] in ("all", TREE) and r["tool"] == TOOLS[0]:
            print("-" * 120)
        print(f"{r['tool']:12} {r['folder']:14} {r['wall_s']:7.2f} {r['peak_mib']:9.0f} {r['converted']:6d} "
              f"{r['time_vs_dcm2niix']:13.2f} {r['time_vs_dicom2nifti']:16.2f} "
              f"{r['memory_vs_dcm2niix']:12.2f} {r['memory_vs_dicom2nifti']:15.2f}")
    g = report["goals"][TREE]
    print(f"\nthe whole set in one run ({TREE}):")
    print(f"  goal medseg at most 2x dcm2niix's time: {g['medseg_time_vs_dcm2niix']:.2f}x -> "
          f"{'met' if g['medseg_at_most_2x_dcm2niix'] else 'MISSED'}")
    print(f"  goal medseg at least 3x faster than dicom2nifti: {g['dicom2nifti_time_vs_medseg']:.2f}x -> "
          f"{'met' if g['medseg_at_least_3x_faster_than_dicom2nifti'] else 'MISSED'}")
    g = report["goals"]["all"]
    print(f"for information, three separate runs (start-up paid three times): medseg {g['medseg_time_vs_dcm2niix']:.2f}x "
          f"dcm2niix's time, {g['dicom2nifti_time_vs_medseg']:.2f}x faster than dicom2nifti")


def check_agreement(last: dict, data: Path, cmd: dict, env: dict, work: Path) -> tuple[dict, dict]:
    refused: dict[str, list[dict]] = {t: [] for t in TOOLS}
    pairs = [("medseg", "dcm2niix"), ("medseg", "dicom2nifti"), ("dcm2niix", "dicom2nifti")]
    result: dict = {f"{a} vs {b}": {} for a, b in pairs}
    for folder in FOLDERS:
        src = data / folder
        mapping = work / f"dcm2niix-verbose-{folder.replace('/', '_')}"
        mapping.mkdir()
        readers = {
            "medseg": lambda: records_medseg(src, last["medseg", folder], data),
            "dcm2niix": lambda: records_dcm2niix(cmd["dcm2niix"](src, mapping), mapping, data, env),
            "dicom2nifti": lambda: records_dicom2nifti(src, last["dicom2nifti", folder], data,
                                                       work / f"dicom2nifti-again-{folder.replace('/', '_')}"),
        }
        per_tool = {}
        for tool, read in readers.items():
            try:
                per_tool[tool] = read()
            except Exception as err:  # e.g. the tool's run failed and left no report: compare the others
                per_tool[tool] = [], [{"series": folder, "error": f"outputs unreadable: {type(err).__name__}: {err}"}]
        for tool, (_, bad) in per_tool.items():
            refused[tool] += bad
        for a, b in pairs:
            result[f"{a} vs {b}"][folder] = agreement(per_tool[a][0], per_tool[b][0])
    for key, per_folder in result.items():
        total: dict[str, int] = {}
        for res in per_folder.values():
            for k, v in res["counts"].items():
                total[k] = total.get(k, 0) + v
        per_folder["all"] = {"counts": total}
    return result, refused


def print_agreement(report: dict) -> None:
    print("\nagreement (same series: voxel values after scaling, affines within 1e-3 mm, both in RAS):")
    for pair, per_folder in report["agreement"].items():
        counts = ", ".join(f"{v} {k}" for k, v in sorted(per_folder["all"]["counts"].items()))
        agreed = [r["affine_max_diff_mm"] for f in FOLDERS for r in per_folder[f]["series"] if r["status"] == "agree"]
        print(f"  {pair}: {counts}" + (f" (agreeing affines within {max(agreed):.1e} mm)" if agreed else ""))
        for folder in FOLDERS:
            for row in per_folder[folder]["series"]:
                if row["status"] == "agree":
                    continue
                if row["status"] == "differ":
                    print(f"    DIFFER ({', '.join(row['reasons'])}): {row['a']}  vs  {row['b'][0]}")
                    detail = {k: row[k] for k in ("shape_ras", "affine_max_diff_mm", "spacing_mm", "origin_ras_mm",
                                                  "max_abs_diff", "voxels_differing", "hint", "dtype", "orientation",
                                                  "note") if k in row}
                    print(f"      {json.dumps(detail)}")
                else:
                    print(f"    {row['status']}: {row.get('a') or row['b'][0]}")
    print("\nrefused or failed:")
    for tool, rows in report["refused_or_failed"].items():
        for row in rows:
            print(f"  {tool:12} {row['series']}: {row['error']}")


def versions(bin_dir: Path, env: dict[str, str]) -> dict[str, str]:
    """Package versions, and which medseg source was measured (its commit, and whether medseg/ had
    uncommitted changes: others may be editing it while this runs)."""
    from importlib.metadata import PackageNotFoundError, version
    found = {}
    for pkg in ("medseg", "dcm2niix", "dicom2nifti", "pydicom", "nibabel", "numpy"):
        try:
            found[pkg] = version(pkg)
        except PackageNotFoundError:
            found[pkg] = "not installed"
    where = subprocess.run([str(bin_dir / "python"), "-c", "import medseg; print(medseg.__file__)"],
                           capture_output=True, text=True, env=env, cwd="/").stdout.strip()
    pkg_dir = Path(where).parent if where else REPO / "medseg"
    git = lambda *a: subprocess.run(["git", "-C", str(pkg_dir), *a], capture_output=True, text=True).stdout.strip()  # noqa: E731
    commit = git("rev-parse", "--short", "HEAD")
    found["medseg_source"] = str(pkg_dir)
    found["medseg_commit"] = (commit + (" with uncommitted changes in medseg/" if git("status", "--porcelain", ".")
                                        else "")) if commit else "not a git checkout"
    return found


if __name__ == "__main__":
    main()
