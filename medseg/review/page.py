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
) -> str:
    """One case: its three views with a slider each, the layers to draw, and the verdict form."""
    case_id = entry["case_id"]
    quoted = quote(case_id, safe="")
    layers = ["mask"] + [name for name, key in (("reference", "reference"), ("uncertainty", "uncertainty_map"))
                         if entry.get(key)]
    start = {view: entry.get("shown", {}).get(view, slices[view] // 2) for view in slices}
    views = []
    for view in [v for v in ("axial", "coronal", "sagittal") if v in slices]:
        views.append(
            f'<div class="view"><div>{view} <span id="n-{view}">{start[view]}</span> / {slices[view] - 1}</div>'
            f'<img id="img-{view}" alt="{view}"><input type="range" min="0" max="{slices[view] - 1}" '
            f'value="{start[view]}" id="s-{view}" style="width:100%" oninput="draw(\'{view}\')"></div>'
        )
    boxes = " ".join(
        f'<label><input type="checkbox" id="layer-{name}" {"checked" if name != "uncertainty" else ""} '
        f'onchange="drawAll()"> {name}</label>' for name in layers
    )
    legend = " ".join(f'<span class="swatch" style="background:rgb{label_colour(int(k))}"></span>{escape(str(name))}'
                      for k, name in entry.get("labels", {}).items())
    metrics = entry.get("metrics") or {}
    scores = ""
    if metrics:
        scores = "<p>Against the reference: " + ", ".join(
            f"{escape(name)} Dice {_number(v)}, HD95 {_number(metrics.get('hd95_mm', {}).get(name), 2)} mm"
            for name, v in metrics.get("dice", {}).items()) + "</p>"
    scan = entry.get("scan") or []
    viewer = ""
    if scan and entry.get("scan_kind") == "nifti" and entry.get("mask"):
        viewer = (f'<p class="small">To correct it: <code>itksnap -g {escape(scan[0])} -s {escape(entry["mask"])}'
                  "</code></p>")
    judged = bool(slices) and not entry.get("problem")
    buttons = "".join(f'<button name="verdict" value="{c}" accesskey="{c[0]}">{c} ({c[0]})</button>' for c in CHOICES)
    nav = " ".join(filter(None, [
        f'<a id="prev" href="/case/{quote(previous, safe="")}">previous (p)</a>' if previous else "",
        '<a href="/">queue</a>',
        f'<a id="next" href="/case/{quote(following, safe="")}">next (n)</a>' if following else "",
    ]))
    recorded = ""
    if verdict is not None:
        recorded = (f'<p>Recorded: <span class="{escape(state)}">{escape(state)}</span> by {escape(verdict.reviewer) or "-"}'
                    f" at {escape(verdict.time)}{': ' + escape(verdict.note) if verdict.note else ''}"
                    f"{' (on an earlier mask)' if state == 'outdated' else ''}</p>")
    form = f"""<form method="post" action="/case/{quoted}/verdict">
<p>{buttons}</p>
<p><label>Note <input name="note" size="60" maxlength="2000"></label>
<label>Reviewer <input name="reviewer" value="{escape(reviewer)}" size="16"></label></p>
</form>"""
    script = f"""
const CASE={json.dumps(quoted)};
function layers(){{return [...document.querySelectorAll('input[id^=layer-]')].filter(b=>b.checked)
 .map(b=>b.id.slice(6)).join(',');}}
function draw(view){{const i=document.getElementById('s-'+view).value;document.getElementById('n-'+view).textContent=i;
 document.getElementById('img-'+view).src='/slice/'+CASE+'/'+view+'/'+i+'.png?layers='+layers();}}
function drawAll(){{for(const v of ['axial','coronal','sagittal'])draw(v);}}
document.addEventListener('keydown',e=>{{if(['INPUT','TEXTAREA'].includes(e.target.tagName)&&e.target.type!=='range')return;
 const go=id=>{{const a=document.getElementById(id);if(a)location=a.href;}};
 if(e.key==='n')go('next');else if(e.key==='p')go('prev');
 else if('afr'.includes(e.key)&&e.key.length===1){{const b=document.querySelector('button[accesskey='+e.key+']');if(b)b.click();}}}});
window.onload=drawAll;
"""
    return f"""<!doctype html>
<html><head><meta charset="utf-8"><title>{escape(case_id)} - medseg review</title><style>{STYLE}</style>
<script>{script}</script></head><body>
<p>{nav} <span class="small">case {position} of {total}</span></p>
<h1>{escape(case_id)} {_badges(entry)}</h1>
<p>{_reasons(entry) or 'No QC flag.'}</p>
<p>Uncertainty {_number(entry.get('uncertainty'))}; volumes: {', '.join(f'{escape(k)} {v:.2f} mL' for k, v in entry.get('volumes_ml', {}).items()) or '-'}</p>
{scores}
<p>Layers: {boxes} &nbsp; {legend} {'<span class="swatch" style="background:rgb(255,225,25)"></span>reference outline' if 'reference' in layers else ''}</p>
<div class="views">{''.join(views)}</div>
{recorded}
{form if judged else '<p>Nothing to judge: the case has no mask to show.</p>'}
<p class="small">Keys: a accept, f fix, r reject, n next, p previous. Scan: {escape(', '.join(scan[:1]) or '-')}
{'(+' + str(len(scan) - 1) + ' files)' if len(scan) > 1 else ''}; mask: {escape(entry.get('mask') or '-')}</p>
{viewer}
</body></html>
"""
