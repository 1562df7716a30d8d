// The case page of medseg review: NiiVue draws the scan, the mask as a drawing that reviewers
// correct (paint and erase per label, a brush of chosen size, fill a closed outline, undo/redo), and
// the layers (reference, uncertainty, saliency). Saving sends the drawing as NIfTI, on the scan's
// grid in its own voxel order, to POST /case/<case>/correction.
"use strict";

(async () => {
  const data = JSON.parse(document.getElementById("case-data").textContent);
  const base = "/volume/" + data.quoted + "/";
  const $ = (id) => document.getElementById(id);
  const status = (text) => { $("status").textContent = text; };
  const VIEWS = ["sagittal", "coronal", "axial"]; // the RAS axis each slider moves
  const state = { ready: false, dirty: false, redo: [], view: "axial", overlays: {}, error: null };
  window.medseg = state;

  const nv = new niivue.Niivue({
    show3Dcrosshair: false, isColorbar: false, isOrientCube: false, backColor: [0, 0, 0, 1],
    multiplanarShowRender: niivue.SHOW_RENDER.NEVER, multiplanarLayout: niivue.MULTIPLANAR_TYPE.ROW,
    crosshairWidth: 0.5, logLevel: "warn",
  });
  state.nv = nv;
  try {
    await nv.attachTo("viewer");
    await nv.loadVolumes([{ url: base + "scan.nii.gz", name: "scan.nii.gz" }]);
    nv.setDrawColormap(drawColours());
    if (!(await nv.loadDrawingFromUrl(base + "mask.nii.gz"))) {
      throw new Error("the mask does not fit the scan's grid");
    }
    nv.setDrawOpacity(Math.max(0.2, data.alpha + 0.3));
    nv.setSliceType(nv.sliceTypeMultiplanar);
    nv.setDrawingEnabled(false);
  } catch (err) {
    state.error = String(err);
    status("cannot show the case: " + err);
    return;
  }

  // the palette of the server's pictures (medseg.review.render.PALETTE), label k -> colour k - 1
  function drawColours() {
    const palette = [[230, 25, 75], [60, 180, 75], [0, 130, 200], [245, 130, 48], [145, 30, 180],
      [70, 240, 240], [240, 50, 230], [210, 245, 60], [0, 128, 128], [170, 110, 40]];
    const cmap = { R: [0], G: [0], B: [0], A: [0], labels: [""] };
    const top = Math.max(1, ...Object.keys(data.labels).map(Number));
    for (let k = 1; k <= top; k++) {
      const [r, g, b] = palette[(k - 1) % palette.length];
      cmap.R.push(r); cmap.G.push(g); cmap.B.push(b); cmap.A.push(255);
      cmap.labels.push(data.labels[String(k)] || String(k));
    }
    return cmap;
  }

  // -- sliders: each moves its view's slice; a click in the viewer moves them ---------------------
  const dims = () => nv.back.dimsRAS.slice(1, 4);
  function moveTo(view, index) {
    const axis = VIEWS.indexOf(view);
    const pos = [...nv.scene.crosshairPos];
    pos[axis] = (index + 0.5) / dims()[axis];
    nv.scene.crosshairPos = pos;
    $("n-" + view).textContent = index;
    state.view = view;
    nv.drawScene();
  }
  for (const view of VIEWS) {
    const slider = $("s-" + view);
    if (!slider) continue;
    slider.addEventListener("input", () => moveTo(view, Number(slider.value)));
  }
  for (const view of VIEWS) if ($("s-" + view)) moveTo(view, Number(data.start[view] ?? $("s-" + view).value));
  state.view = "axial";
  nv.onLocationChange = () => {
    const d = dims();
    VIEWS.forEach((view, axis) => {
      const slider = $("s-" + view);
      if (!slider) return;
      const index = Math.min(d[axis] - 1, Math.max(0, Math.floor(nv.scene.crosshairPos[axis] * d[axis])));
      slider.value = index;
      $("n-" + view).textContent = index;
    });
  };

  // -- layers -------------------------------------------------------------------------------------
  const overlayLook = {
    reference: { colormap: "blue", opacity: 0.45, cal_min: 0.5, cal_max: Math.max(1, Object.keys(data.labels).length) },
    uncertainty: { colormap: "hot", opacity: 0.6 },
    saliency: { colormap: "warm", opacity: 0.6 },
  };
  async function showOverlay(name, url) {
    const old = state.overlays[name];
    if (old && !url) { nv.setOpacity(nv.volumes.indexOf(old), overlayLook[name].opacity); return; }
    if (old) nv.removeVolume(old);
    status("loading " + name + "...");
    const volume = await nv.addVolumeFromUrl({ url, name: name + ".nii.gz", ...overlayLook[name] });
    state.overlays[name] = volume;
    status("");
  }
  function hideOverlay(name) {
    const volume = state.overlays[name];
    if (volume) nv.setOpacity(nv.volumes.indexOf(volume), 0);
  }
  function saliencyUrl() {
    const index = Number($("s-" + state.view).value);
    return "/saliency/" + data.quoted + ".nii.gz?label=" + $("saliency-label").value + "&view=" + state.view +
      "&index=" + index;
  }
  async function toggle(name) {
    const on = $("layer-" + name).checked;
    try {
      if (name === "mask") nv.setDrawOpacity(on ? Math.max(0.2, data.alpha + 0.3) : 0);
      else if (name === "saliency") {
        $("saliency-controls").hidden = !on;
        if (on) await showOverlay(name, saliencyUrl()); else hideOverlay(name);
      } else if (on) await showOverlay(name, state.overlays[name] ? null : base + name + ".nii.gz");
      else hideOverlay(name);
    } catch (err) {
      status("cannot show " + name + ": " + err);
    }
    nv.drawScene();
  }
  for (const name of data.layers) {
    const box = $("layer-" + name);
    box.addEventListener("change", () => toggle(name));
    if (box.checked && name !== "mask") toggle(name);
  }
  const saliencyLabel = $("saliency-label");
  if (saliencyLabel) saliencyLabel.addEventListener("change", () => $("layer-saliency").checked && toggle("saliency"));

  // -- drawing tools ------------------------------------------------------------------------------
  let pen = "";
  function applyPen() {
    for (const b of document.querySelectorAll(".tool")) b.classList.toggle("active", b.dataset.pen === pen);
    nv.setDrawingEnabled(pen !== "");
    if (pen !== "") nv.setPenValue(Number(pen), $("fill").checked);
    nv.opts.penSize = Number($("brush").value);
  }
  for (const button of document.querySelectorAll(".tool")) {
    button.addEventListener("click", () => { pen = button.dataset.pen; applyPen(); });
  }
  $("fill").addEventListener("change", applyPen);
  $("brush").addEventListener("input", () => { $("brush-n").textContent = $("brush").value; applyPen(); });
  nv.onDrawingChanged = (action) => {
    if (action === "draw") { state.redo = []; state.dirty = true; status("unsaved changes"); }
  };
  function undo() {
    state.redo.push(nv.drawBitmap.slice());
    nv.drawUndo();
    state.dirty = true;
  }
  function redo() {
    const bitmap = state.redo.pop();
    if (!bitmap) return;
    nv.drawBitmap.set(bitmap);
    nv.drawAddUndoBitmap();
    nv.refreshDrawing(true);
    state.dirty = true;
  }
  $("undo").addEventListener("click", undo);
  $("redo").addEventListener("click", redo);

  async function save() {
    status("saving...");
    const nifti = await nv.saveImage({ filename: "", isSaveDrawing: true, volumeByIndex: 0 });
    const packed = await new Response(new Blob([nifti]).stream().pipeThrough(new CompressionStream("gzip")))
      .arrayBuffer();
    const response = await fetch("/case/" + data.quoted + "/correction", {
      method: "POST", body: packed, credentials: "same-origin",
      headers: { "Content-Type": "application/gzip", "X-Base-SHA256": data.shown_sha256,
        "X-Note": encodeURIComponent($("note") ? $("note").value : "") },
    });
    const answer = await response.json().catch(() => ({ error: response.statusText }));
    if (!response.ok) { status("not saved: " + (answer.error || response.status)); return; }
    state.dirty = false;
    data.shown_sha256 = answer.correction_sha256;
    status("saved as " + answer.correction);
    location.reload();
  }
  $("save").addEventListener("click", () => save().catch((err) => status("not saved: " + err)));
  window.addEventListener("beforeunload", (e) => { if (state.dirty) e.preventDefault(); });

  document.addEventListener("keydown", (e) => {
    if (["INPUT", "TEXTAREA", "SELECT"].includes(e.target.tagName) && e.target.type !== "range") return;
    if (e.ctrlKey && e.key === "z") { e.preventDefault(); undo(); return; }
    if (e.ctrlKey && e.key === "y") { e.preventDefault(); redo(); return; }
    const go = (id) => { const a = $(id); if (a) location = a.href; };
    if (e.key === "n") go("next");
    else if (e.key === "p") go("prev");
    else if (e.key.length === 1 && "afr".includes(e.key)) {
      const b = document.querySelector("button[accesskey=" + e.key + "]");
      if (b) b.click();
    }
  });
  applyPen();
  nv.drawScene();
  state.ready = true;
})();
