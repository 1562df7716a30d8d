"""The review pages, as HTML text: the queue of cases, and one case with its slices and verdict form.

The queue page is written into the review folder by the build (``served=False``: it opens from
the file system, links to the overview pictures and shows the verdicts of the build's time) and
served by ``medseg review --serve`` (links to the case pages, verdicts as they are now). Every
value taken from the files is escaped.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from html import escape
from typing import Any
from urllib.parse import quote

from medseg.review.render import label_colour
from medseg.review.verdicts import CHOICES, Verdict

STYLE = """
body{font-family:system-ui,sans-serif;margin:1.2em;background:#fafafa;color:#222}
table{border-collapse:collapse;font-size:13px}th,td{border-bottom:1px solid #ddd;padding:4px 8px;text-align:left;
vertical-align:top}th{cursor:pointer;background:#eee;position:sticky;top:0}
.flag{display:inline-block;background:#c0392b;color:#fff;border-radius:3px;padding:0 5px;margin:1px;font-size:12px}
.problem{background:#6c3483}.open{color:#888}.accept{color:#1e8449;font-weight:bold}.fix{color:#b9770e;
font-weight:bold}.reject{color:#c0392b;font-weight:bold}.outdated{color:#888;text-decoration:line-through}
.views{display:flex;gap:14px;flex-wrap:wrap}.view{background:#111;color:#eee;padding:6px;border-radius:4px}
.view img{display:block;image-rendering:pixelated}.small{color:#666;font-size:12px}
form button{font-size:15px;padding:6px 14px;margin-right:6px}code{background:#eee;padding:1px 4px}
.swatch{display:inline-block;width:10px;height:10px;margin-right:3px}
"""

VIEWER_STYLE = """
#viewer-box{width:100%;max-width:1400px;height:440px;background:#000}#viewer{display:block}
.tools button{font-size:13px;padding:3px 8px;margin:1px}.tools .active{outline:3px solid #2e86c1}
.slider{display:inline-block;margin-right:18px}.slider input{width:180px;vertical-align:middle}
"""

FILTER_SCRIPT = """
function show(kind){for(const r of document.querySelectorAll('tr[data-case]')){
 const hide=(kind==='flagged'&&r.dataset.flagged!=='1')||(kind==='open'&&!['open','outdated'].includes(r.dataset.status));
 r.style.display=hide?'none':'';}}
function sortBy(col){const body=document.querySelector('tbody');const rows=[...body.rows];
 const key=r=>{const v=r.cells[col].dataset.v;const n=parseFloat(v);return isNaN(n)?v:n;};
 const dir=body.dataset.col==col&&body.dataset.dir==='1'?-1:1;body.dataset.col=col;body.dataset.dir=dir===1?'1':'-1';
 rows.sort((a,b)=>{const x=key(a),y=key(b);return (x>y?1:x<y?-1:0)*dir;});rows.forEach(r=>body.appendChild(r));}
"""


def _number(value: Any, digits: int = 3) -> str:
    if value is None or (isinstance(value, float) and not math.isfinite(value)):
        return "-"
    return f"{value:.{digits}f}"


def _badges(entry: Mapping[str, Any]) -> str:
    parts = ['<span class="flag problem">problem</span>'] if entry.get("problem") else []
    parts += [f'<span class="flag" title="{escape(entry["details"].get(f, ""))}">{escape(f)}</span>'
              for f in entry["flags"]]
    return "".join(parts)


def _reasons(entry: Mapping[str, Any]) -> str:
    reasons = [entry["problem"]] if entry.get("problem") else []
    reasons += [entry["details"].get(f, f) for f in entry["flags"]]
    return "<br>".join(escape(r) for r in reasons)


def _verdict_cell(state: str, verdict: Verdict | None) -> str:
    note = f'<div class="small">{escape(verdict.note)}</div>' if verdict and verdict.note else ""
    who = f' title="{escape(verdict.reviewer)} {escape(verdict.time)}"' if verdict else ""
    return f'<td data-v="{escape(state)}"><span class="{escape(state)}"{who}>{escape(state)}</span>{note}</td>'


def case_href(case_id: str, served: bool) -> str:
    return f"/case/{quote(case_id, safe='')}" if served else f"cases/{quote(case_id)}.png"


def index_page(
    queue: Sequence[Mapping[str, Any]],
    states: Mapping[str, str],
    current: Mapping[str, Verdict],
    summary: Mapping[str, Any],
    *,
    served: bool,
) -> str:
    """The queue: a row per case in review order, with its flags, scores, verdict and overview."""
    class_names = list(dict.fromkeys(n for e in queue for n in (e.get("metrics") or {}).get("dice", {})))
    volume_names = list(dict.fromkeys(n for e in queue for n in e.get("volumes_ml", {})))
    head = ["#", "case", "flags", "reasons", "uncertainty", *[f"{n} mL" for n in volume_names]]
    if class_names:
        head += ["mean Dice", *[f"Dice {n}" for n in class_names]]
    head += ["verdict", "views"]
    rows = []
    for position, entry in enumerate(queue, start=1):
        case_id = entry["case_id"]
        metrics = entry.get("metrics") or {}
        cells = [
            f'<td data-v="{position}">{position}</td>',
            f'<td data-v="{escape(case_id)}"><a href="{escape(case_href(case_id, served))}">{escape(case_id)}</a></td>',
            f'<td data-v="{len(entry["flags"]) + (10 if entry.get("problem") else 0)}">{_badges(entry)}</td>',
            f'<td data-v="">{_reasons(entry)}</td>',
            f'<td data-v="{_number(entry.get("uncertainty"), 6)}">{_number(entry.get("uncertainty"))}</td>',
        ]
        cells += [f'<td data-v="{_number(entry["volumes_ml"].get(n), 6)}">{_number(entry["volumes_ml"].get(n), 2)}</td>'
                  for n in volume_names]
        if class_names:
            cells.append(f'<td data-v="{_number(metrics.get("mean_dice"), 6)}">{_number(metrics.get("mean_dice"))}</td>')
            cells += [f'<td data-v="{_number(metrics.get("dice", {}).get(n), 6)}">'
                      f'{_number(metrics.get("dice", {}).get(n))}</td>' for n in class_names]
        cells.append(_verdict_cell(states[case_id], current.get(case_id)))
        picture = entry.get("overview")
        if picture:
            src = f"/picture/{quote(case_id, safe='')}.png" if served else quote(picture)
            cells.append(f'<td data-v=""><a href="{escape(case_href(case_id, served))}"><img src="{escape(src)}" '
                         f'height="96" loading="lazy" alt="{escape(case_id)}"></a></td>')
        else:
            cells.append('<td data-v=""></td>')
        flagged = "1" if entry["flags"] or entry.get("problem") else "0"
        rows.append(f'<tr data-case="{escape(case_id)}" data-flagged="{flagged}" data-status="{escape(states[case_id])}">'
                    + "".join(cells) + "</tr>")
    counts = ", ".join(f"{escape(k)} {v}" for k, v in summary.get("verdicts", {}).items())
    flags = ", ".join(f"{escape(k)} {v}" for k, v in summary.get("flags", {}).items()) or "none"
    dice = summary.get("dice")
    dice_line = ""
    if dice:
        dice_line = (f"<p>Mean Dice of the flagged cases {_number(dice['flagged']['mean_dice'])} "
                     f"(n={dice['flagged']['n']}), of the others {_number(dice['not_flagged']['mean_dice'])} "
                     f"(n={dice['not_flagged']['n']}). First quarter of the queue "
                     f"{_number(dice['queue_first_quarter']['mean_dice'])}, the rest "
                     f"{_number(dice['queue_rest']['mean_dice'])}; rank correlation of uncertainty and Dice "
                     f"{_number(dice['uncertainty_spearman'], 2)}.</p>")
    mode = ("Open a case to scroll through its slices and record a verdict."
            if served else "Read-only: <code>medseg review --output &lt;this folder&gt; --serve</code> serves this page "
            "with slice scrolling and a verdict form per case.")
    header = "".join(f'<th onclick="sortBy({i})">{escape(h)}</th>' for i, h in enumerate(head))
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>medseg review</title><style>{STYLE}</style>
<script>{FILTER_SCRIPT}</script></head><body>
<h1>medseg review</h1>
<p>{summary.get('n_cases', len(queue))} cases: {summary.get('n_problems', 0)} with problems, {summary.get('n_flagged', 0)}
flagged ({flags}). Verdicts: {counts or 'none'}. Flagged cases and problems come first. {mode}</p>
{dice_line}
<p>Show: <button onclick="show('all')">all</button> <button onclick="show('flagged')">flagged</button>
<button onclick="show('open')">without a verdict</button> <span class="small">Click a column to sort.</span></p>
<table><thead><tr>{header}</tr></thead><tbody>
{chr(10).join(rows)}
</tbody></table></body></html>
"""


def _history_table(history: Sequence[Verdict]) -> str:
    """Who said what on the case, when, and on which mask: newest first."""
    if not history:
        return '<p class="small" id="history">No verdict yet.</p>'
    rows = []
    for v in reversed(history):
        mask = f"predicted {escape(v.mask_sha256[:10])}" if v.mask_sha256 else "-"
        if v.correction:
            mask = (f"correction {escape(v.correction_sha256[:10])} (from {escape(v.base_sha256[:10])})")
        rows.append(f'<tr><td>{escape(v.time)}</td><td>{escape(v.reviewer) or "-"}</td>'
                    f'<td class="{escape(v.verdict)}">{escape(v.verdict)}</td><td>{escape(v.note)}</td><td>{mask}</td></tr>')
    return ('<table id="history"><thead><tr><th>time</th><th>reviewer</th><th>verdict</th><th>note</th>'
            f"<th>mask</th></tr></thead><tbody>{''.join(rows)}</tbody></table>")


def _data(payload: Mapping[str, Any]) -> str:
    """JSON for a ``<script type="application/json">`` element (no ``</`` can close it early)."""
    return json.dumps(payload).replace("</", "<\\/")


def case_page(
    entry: Mapping[str, Any],
    state: str,
    verdict: Verdict | None,
    *,
    position: int,
    total: int,
    previous: str | None,
    following: str | None,
    slices: Mapping[str, int],
    reviewer: str,
    reviewer_fixed: bool = False,
    history: Sequence[Verdict] = (),
    shown_sha256: str = "",
    correction: Verdict | None = None,
    alpha: float = 0.4,
) -> str:
    """One case: the viewer (three views with a slider each, layers, the correction tools), its
    history and the verdict form. The viewer is NiiVue, driven by ``static/review.js``."""
    case_id = entry["case_id"]
    quoted = quote(case_id, safe="")
    layers = ["mask"] + [name for name, key in (("reference", "reference"), ("uncertainty", "uncertainty_map"))
                         if entry.get(key)]
    judged = bool(slices) and not entry.get("problem")
    labels = {str(k): str(n) for k, n in (entry.get("labels") or {}).items()}
    if judged:
        layers.append("saliency")
    start = {view: entry.get("shown", {}).get(view, slices[view] // 2) for view in slices}
    sliders = "".join(
        f'<label class="slider">{view} <span id="n-{view}">{start[view]}</span> / {slices[view] - 1}'
        f'<input type="range" min="0" max="{slices[view] - 1}" value="{start[view]}" id="s-{view}"></label>'
        for view in ("axial", "coronal", "sagittal") if view in slices
    )
    boxes = " ".join(
        f'<label><input type="checkbox" id="layer-{name}" {"checked" if name in ("mask", "reference") else ""}> '
        f"{name}</label>" for name in layers
    )
    legend = " ".join(f'<span class="swatch" style="background:rgb{label_colour(int(k))}"></span>{escape(name)}'
                      for k, name in labels.items())
    pens = "".join(f'<button type="button" class="tool" data-pen="{escape(k)}" id="pen-{escape(k)}">'
                   f'<span class="swatch" style="background:rgb{label_colour(int(k))}"></span>paint {escape(name)}'
                   "</button>" for k, name in labels.items())
    saliency_labels = "".join(f'<option value="{escape(k)}">{escape(name)}</option>' for k, name in labels.items())
    metrics = entry.get("metrics") or {}
    scores = ""
    if metrics:
        scores = "<p>Against the reference: " + ", ".join(
            f"{escape(name)} Dice {_number(v)}, HD95 {_number(metrics.get('hd95_mm', {}).get(name), 2)} mm"
            for name, v in metrics.get("dice", {}).items()) + "</p>"
    scan = entry.get("scan") or []
    buttons = "".join(f'<button name="verdict" value="{c}" accesskey="{c[0]}">{c} ({c[0]})</button>' for c in CHOICES)
    nav = " ".join(filter(None, [
        f'<a id="prev" href="/case/{quote(previous, safe="")}">previous (p)</a>' if previous else "",
        '<a href="/">queue</a>',
        f'<a id="next" href="/case/{quote(following, safe="")}">next (n)</a>' if following else "",
    ]))
    recorded = ""
    if verdict is not None:
        recorded = (f'<p id="recorded">Recorded: <span class="{escape(state)}">{escape(state)}</span> by '
                    f"{escape(verdict.reviewer) or '-'} at {escape(verdict.time)}"
                    f"{': ' + escape(verdict.note) if verdict.note else ''}"
                    f"{' (on an earlier mask)' if state == 'outdated' else ''}</p>")
    shown = ("the predicted mask" if correction is None else
             f"the correction by {escape(correction.reviewer) or '-'} at {escape(correction.time)}")
    who = (f'Reviewer <b id="reviewer">{escape(reviewer)}</b>' if reviewer_fixed else
           f'<label>Reviewer <input name="reviewer" value="{escape(reviewer)}" size="16"></label>')
    form = f"""<form method="post" action="/case/{quoted}/verdict" id="verdict-form">
<p>{buttons}</p>
<p><label>Note <input name="note" id="note" size="60" maxlength="2000"></label> {who}</p>
</form>"""
    tools = f"""<div class="tools">
<p>Layers: {boxes} &nbsp; {legend}
<span id="saliency-controls" hidden>for <select id="saliency-label">{saliency_labels}</select></span></p>
<p>{sliders}</p>
<p><button type="button" class="tool active" data-pen="" id="navigate">navigate</button>{pens}
<button type="button" class="tool" data-pen="0" id="pen-erase">erase</button>
<label>brush <input type="range" id="brush" min="1" max="15" value="1"> <span id="brush-n">1</span></label>
<label><input type="checkbox" id="fill"> fill the outline</label>
<button type="button" id="undo">undo</button> <button type="button" id="redo">redo</button>
<button type="button" id="save">save correction</button> <span id="status" class="small"></span></p>
</div>
<div id="viewer-box"><canvas id="viewer"></canvas></div>
<p class="small">Showing {shown}.</p>"""
    data = {"case": case_id, "quoted": quoted, "shown_sha256": shown_sha256, "alpha": alpha, "start": start,
            "layers": layers, "labels": labels}
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(case_id)} - medseg review</title><style>{STYLE}{VIEWER_STYLE}</style>
<script id="case-data" type="application/json">{_data(data)}</script>
<script src="/static/niivue/niivue.umd.js"></script><script src="/static/review.js" defer></script></head><body>
<p>{nav} <span class="small">case {position} of {total}</span></p>
<h1>{escape(case_id)} {_badges(entry)}</h1>
<p>{_reasons(entry) or 'No QC flag.'}</p>
<p>Uncertainty {_number(entry.get('uncertainty'))}; volumes: {', '.join(f'{escape(k)} {v:.2f} mL' for k, v in entry.get('volumes_ml', {}).items()) or '-'}</p>
{scores}
{tools if judged else ''}
{recorded}
{form if judged else '<p>Nothing to judge: the case has no mask to show.</p>'}
<h2>History</h2>
{_history_table(history)}
<p class="small">Keys: a accept, f fix, r reject, n next, p previous, Ctrl+Z undo, Ctrl+Y redo. Scan:
{escape(', '.join(scan[:1]) or '-')} {'(+' + str(len(scan) - 1) + ' files)' if len(scan) > 1 else ''}; mask:
{escape(entry.get('mask') or '-')}</p>
</body></html>
"""
