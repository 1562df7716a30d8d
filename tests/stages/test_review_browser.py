"""The review page in a real headless Chromium: queue, case, slider, layers, a stroke painted with the
mouse and saved, verdicts with notes, and two reviewers with their own tokens seeing each other's work.

The saved mask is checked on disk, voxel by voxel: the scan has a flipped axis, so a correction saved
mirrored (a bug browser viewers have had) would change voxels away from where the stroke went.
"""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from pathlib import Path

import nibabel as nib
import numpy as np
import pytest
from conftest import ARTIFACTS, write_nifti

from medseg.review import verdicts
from medseg.stages.review import review

LABELS = {"1": "anterior", "2": "posterior"}
TOKENS = {"ann": "ann-token-0123456789abcdef", "bob": "bob-token-0123456789abcdef"}
FLIP = np.diag([-1.0, 1.0, 1.0, 1.0]) @ np.array([[1, 0, 0, -34], [0, 1, 0, 0], [0, 0, 1, 0], [0, 0, 0, 1.0]])
SHOTS = ARTIFACTS / "browser"


def _case(shared_data: Path, root: Path, case: str, source: str, uncertainty: float) -> None:
    """A predicted case from a real hippocampus scan, stored with its first axis flipped (x runs to
    the left), its predicted mask the reference label with the posterior part thinned."""
    image = np.asarray(nib.load(str(shared_data / "hippocampus" / "imagesTr" / f"{source}.nii.gz")).dataobj)
    label = np.asarray(nib.load(str(shared_data / "hippocampus" / "labelsTr" / f"{source}.nii.gz")).dataobj)
    from scipy.ndimage import binary_erosion

    predicted = np.where((label == 2) & ~binary_erosion(label == 2), 0, label).astype(np.uint8)
    scan = write_nifti(root / "scans" / f"{case}.nii.gz", image[::-1].copy(), FLIP)
    write_nifti(root / "pred" / f"{case}.nii.gz", predicted[::-1].copy(), FLIP)
    write_nifti(root / "pred" / "uncertainty" / f"{case}.nii.gz",
                (predicted[::-1] > 0).astype(np.float32) * 0.5, FLIP)
    record = {"case_id": case, "volumes_ml": {"anterior": 1.0, "posterior": 1.0}, "uncertainty": uncertainty,
              "flags": [], "details": {}, "scan": [str(scan)], "scan_kind": "nifti", "labels": LABELS}
    (root / "pred" / "qc").mkdir(parents=True, exist_ok=True)
    (root / "pred" / "qc" / f"{case}.json").write_text(json.dumps(record))


@pytest.fixture
def site(shared_data: Path, box_model: Path, tmp_path: Path) -> Iterator[tuple[str, Path]]:
    from medseg.review.server import make_server

    _case(shared_data, tmp_path, "first", "hippocampus_001", 0.4)
    _case(shared_data, tmp_path, "second", "hippocampus_004", 0.1)
    (tmp_path / "pred" / "predict.json").write_text(json.dumps({"models": [{"model": str(box_model)}]}))
    folder = tmp_path / "review"
    review([tmp_path / "pred"], folder)
    server = make_server(folder, port=0, tokens=TOKENS)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    host, port = server.server_address
    yield f"http://{host}:{port}/", folder
    server.shutdown()
    server.server_close()


def _opened(page) -> None:  # noqa: ANN001
    page.wait_for_function("window.medseg && (window.medseg.ready || window.medseg.error)", timeout=60_000)
    assert page.evaluate("window.medseg.error") is None


def _shot(page, name: str) -> None:  # noqa: ANN001
    SHOTS.mkdir(parents=True, exist_ok=True)
    page.screenshot(path=str(SHOTS / f"{name}.png"), full_page=True)


def _canvas(page) -> bytes:  # noqa: ANN001
    page.wait_for_timeout(300)
    return page.locator("#viewer").screenshot()


def _crosshair_voxel(page) -> list[int]:  # noqa: ANN001
    """The crosshair's voxel in the viewer's RAS grid (that of nibabel's closest canonical image)."""
    return page.evaluate("""() => { const nv = window.medseg.nv, d = nv.back.dimsRAS.slice(1, 4);
        return nv.scene.crosshairPos.map((f, a) => Math.min(d[a] - 1, Math.floor(f * d[a]))); }""")


def test_browser_review_paints_saves_and_two_reviewers_see_each_other(chromium, site: tuple[str, Path]) -> None:  # noqa: ANN001
    base, folder = site
    ann = chromium.new_context(viewport={"width": 1300, "height": 1000})
    page = ann.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda err: errors.append(str(err)))

    # the queue, with the token moved into a cookie, then its first case
    page.goto(f"{base}?token={TOKENS['ann']}")
    assert page.url == base and page.locator("tr[data-case]").count() == 2
    _shot(page, "1-queue")
    page.locator("tbody tr a").first.click()
    assert page.url == f"{base}case/first"
    _opened(page)
    assert page.locator("#reviewer").inner_text() == "ann"

    # a slider moves its view; the uncertainty layer draws over it
    before = _canvas(page)
    start = int(page.locator("#s-axial").input_value())
    page.locator("#s-axial").fill(str(start - 6))
    assert page.locator("#n-axial").inner_text() == str(start - 6)
    assert _crosshair_voxel(page)[2] == start - 6
    moved = _canvas(page)
    assert moved != before
    page.locator("#layer-uncertainty").check()
    page.wait_for_function("window.medseg.overlays.uncertainty !== undefined")
    assert _canvas(page) != moved
    page.locator("#layer-uncertainty").uncheck()

    # where the stroke goes: the axial tile, along its middle row; the voxels under both ends
    tile = page.evaluate("""() => { const nv = window.medseg.nv;
        const t = nv.screenSlices.find(s => s.axCorSag === 0);
        return t.leftTopWidthHeight.map(v => v / nv.uiData.dpr); }""")
    box = page.locator("#viewer").bounding_box()
    y = box["y"] + tile[1] + 0.55 * tile[3]
    ends = [(box["x"] + tile[0] + f * tile[2], y) for f in (0.3, 0.7)]
    voxels = []
    for x, y_ in ends:
        page.mouse.click(x, y_)
        voxels.append(_crosshair_voxel(page))
    axial = voxels[0][2]
    assert voxels[1][2] == axial and voxels[0][0] != voxels[1][0]

    # paint the posterior label with the mouse, then save
    page.locator("#pen-2").click()
    page.mouse.move(*ends[0])
    page.mouse.down()
    page.mouse.move(*ends[1], steps=25)
    page.mouse.up()
    page.wait_for_function("window.medseg.dirty")
    _shot(page, "2-correction-in-progress")
    page.locator("#note").fill("posterior rim restored")
    page.locator("#save").click()
    page.wait_for_load_state("load")
    page.wait_for_function("document.body.innerText.includes('Showing the correction by ann')")
    _opened(page)

    # on disk: the scan's grid, and changes only along the stroke, all to the posterior label
    (saved,) = sorted((folder / verdicts.CORRECTIONS / "first").glob("*.nii.gz"))
    scan = nib.load(str(folder.parent / "scans" / "first.nii.gz"))
    corrected = nib.load(str(saved))
    assert corrected.shape == scan.shape and np.allclose(corrected.affine, scan.affine)
    predicted = nib.load(str(folder.parent / "pred" / "first.nii.gz"))
    new = np.asarray(nib.as_closest_canonical(corrected).dataobj)
    old = np.asarray(nib.as_closest_canonical(predicted).dataobj)
    changed = np.argwhere(new != old)
    assert len(changed) >= 3
    assert set(changed[:, 2]) == {axial}
    assert set(new[tuple(changed.T)]) == {2}
    a, b = np.array(voxels[0][:2], float), np.array(voxels[1][:2], float)
    points = changed[:, :2].astype(float)
    t = np.clip((points - a) @ (b - a) / ((b - a) @ (b - a)), 0, 1)
    distance = np.linalg.norm(points - (a + t[:, None] * (b - a)), axis=1)
    assert distance.max() <= 1.5, distance.max()
    # reopened, the page shows the corrected mask
    shown = page.evaluate("window.medseg.nv.drawBitmap.reduce((n, v) => n + (v > 0), 0)")
    assert shown == int(np.count_nonzero(new))
    (row,) = verdicts.history(folder)
    assert (row.verdict, row.reviewer, row.note, row.correction) == (
        "fix", "ann", "posterior rim restored", saved.relative_to(folder).as_posix())
    assert row.base_sha256 == row.mask_sha256 and row.correction_sha256 != row.base_sha256

    # a verdict with a note goes to the next case; reloaded, the case shows it
    page.locator("#note").fill("rim was missing")
    page.locator('button[value="fix"]').click()
    page.wait_for_url(f"{base}case/second")
    page.goto(f"{base}case/first")
    _opened(page)
    assert "rim was missing" in page.locator("#history").inner_text()

    # another reviewer, with their own token, sees both and adds theirs; the first sees it too
    bob = chromium.new_context(viewport={"width": 1300, "height": 1000})
    other = bob.new_page()
    other.goto(f"{base}case/first?token={TOKENS['bob']}")
    _opened(other)
    history = other.locator("#history").inner_text()
    assert "rim was missing" in history and "posterior rim restored" in history and "correction" in history
    other.locator("#note").fill("agree with ann")
    other.locator('button[value="accept"]').click()
    other.wait_for_url(f"{base}case/second")
    _shot(other, "4-second-reviewer")
    page.reload()
    _opened(page)
    history = page.locator("#history").inner_text()
    assert "agree with ann" in history and "bob" in history
    _shot(page, "3-case-after-two-reviewers")
    assert [(v.reviewer, v.verdict) for v in verdicts.history(folder)] == [("ann", "fix"), ("ann", "fix"),
                                                                           ("bob", "accept")]

    # the saliency layer: computed for the viewed slice, drawn over it
    plain = _canvas(page)
    page.locator("#layer-saliency").check()
    page.wait_for_function("window.medseg.overlays.saliency !== undefined", timeout=60_000)
    assert _canvas(page) != plain and list((folder / "saliency").glob("*.nii.gz"))
    page.locator("#layer-saliency").uncheck()

    # the tools: a brush stroke, undone and redone; an outline, drawn open and then filled
    count = "window.medseg.nv.drawBitmap.reduce((n, v) => n + (v > 0), 0)"
    tile = page.evaluate("""() => { const nv = window.medseg.nv;
        const t = nv.screenSlices.find(s => s.axCorSag === 0);
        return t.leftTopWidthHeight.map(v => v / nv.uiData.dpr); }""")
    at = lambda fx, fy: (box["x"] + tile[0] + fx * tile[2], box["y"] + tile[1] + fy * tile[3])  # noqa: E731

    def stroke(*points: tuple[float, float]) -> None:
        page.mouse.move(*at(*points[0]))
        page.mouse.down()
        for point in points[1:]:
            page.mouse.move(*at(*point), steps=15)
        page.mouse.up()

    original = page.evaluate(count)
    page.locator("#pen-1").click()
    page.locator("#brush").fill("3")
    stroke((0.1, 0.15), (0.9, 0.15))
    painted = page.evaluate(count)
    assert painted > original
    page.locator("#undo").click()
    assert page.evaluate(count) == original
    page.locator("#redo").click()
    assert page.evaluate(count) == painted
    page.locator("#undo").click()
    page.locator("#brush").fill("1")
    triangle = [(0.2, 0.7), (0.8, 0.7), (0.5, 0.95), (0.2, 0.7)]
    stroke(*triangle)
    outline = page.evaluate(count) - original
    page.locator("#undo").click()
    page.locator("#fill").check()
    stroke(*triangle)
    filled = page.evaluate(count) - original
    assert outline > 0 and filled > 2 * outline, (outline, filled)
    page.locator("#pen-erase").click()
    page.locator("#brush").fill("15")
    stroke((0.05, 0.5), (0.95, 0.5))
    assert page.evaluate(count) < original + filled

    # without a token: 401 and no image
    stranger = chromium.new_context()
    answer = stranger.request.get(f"{base}volume/first/scan.nii.gz")
    assert answer.status == 401 and b"\x1f\x8b" not in answer.body()
    assert errors == []
    for context in (ann, bob, stranger):
        context.close()
