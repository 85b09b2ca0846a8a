"""``report.html``: one self-contained page (no network; images embedded as data URIs) with an evaluation's
tables and a sample of its trajectories.

Each trajectory card shows the question and its options, the original as the model saw it with every box
the model drew (green valid, red invalid, numbered by turn) and the ground truth (blue), every crop the
env showed, the model's text of every turn with what the env made of it, and whether the answer was right;
in a counterfactual run also the answer without zoom and after the oracle crop. Cards are filterable by
category and by outcome (``gain``, ``harm``, ``both_right``, ``both_wrong``; ``right`` / ``wrong``
without the counterfactual); the filters also read the page's address (``report.html#outcome=harm``).
Episodes are replayed from their action texts in fresh envs: the env is deterministic given the sample
and the actions, so the pictures are the ones the model saw.
"""

from __future__ import annotations

import base64
import html
import io
import json
from collections import defaultdict
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
from PIL import Image
from zoomgym.agents.evaluate.records import EpisodeRecord
from zoomgym.agents.evaluate.runner import DIRECT_ARM, MAIN_ARM, ORACLE_ARM, Arm, EvalSettings
from zoomgym.agents.evaluate.summary import Table
from zoomgym.agents.metrics import OUTCOMES, UNCATEGORISED, paired_outcomes
from zoomgym.envs.render import render_episode
from zoomgym.envs.spaces import message_images, message_views

OVERVIEW_SIDE = 512
CROP_SIDE = 320

STYLE = """
body{font:14px/1.4 system-ui,sans-serif;margin:24px;color:#222;background:#fafafa}
h1{font-size:22px}h2{font-size:18px;margin-top:28px}table{border-collapse:collapse;margin:8px 0 4px;background:#fff}
th,td{border:1px solid #ccc;padding:3px 8px;text-align:right}th{background:#eee}td:first-child,th:first-child{text-align:left}
p.note{color:#555;margin:2px 0 12px;max-width:70em}.filters{margin:12px 0;position:sticky;top:0;background:#fafafa;padding:6px 0}
.cards{display:flex;flex-wrap:wrap;gap:14px}.card{background:#fff;border:1px solid #ccc;border-radius:6px;padding:10px;width:560px}
.card[hidden]{display:none}.badge{display:inline-block;padding:1px 7px;border-radius:9px;color:#fff;font-size:12px}
.right,.both_right{background:#2a8a3a}.wrong,.both_wrong{background:#888}.gain{background:#1f6fd1}.harm{background:#c8372d}
.turn{border-top:1px dashed #ddd;margin-top:8px;padding-top:6px}pre{white-space:pre-wrap;word-break:break-word;
background:#f4f4f4;padding:4px 6px;margin:4px 0;font-size:12px}img{max-width:100%;border:1px solid #ddd}
.crops img{margin-right:6px;vertical-align:top}.meta{color:#555;font-size:12px}details{margin:6px 0}
"""

SCRIPT = """
const cards=[...document.querySelectorAll('.card')],cat=document.getElementById('category'),
out=document.getElementById('outcome'),count=document.getElementById('count');
function apply(){let n=0;for(const c of cards){const show=(cat.value==='all'||c.dataset.category===cat.value)&&
(out.value==='all'||c.dataset.outcome===out.value);c.hidden=!show;if(show)n++;}
count.textContent=n+' of '+cards.length+' shown';}
const wanted=new URLSearchParams(location.hash.slice(1));
if(wanted.has('category'))cat.value=wanted.get('category');if(wanted.has('outcome'))out.value=wanted.get('outcome');
cat.onchange=out.onchange=apply;apply();
window.addEventListener('load',()=>{const imgs=[...document.images];document.body.dataset.images=imgs.length;
document.body.dataset.imagesDecoded=imgs.filter(i=>i.complete&&i.naturalWidth>0).length;});
"""


def data_uri(image: Image.Image | np.ndarray, side: int) -> str:
    """The image as a JPEG data URI, its longer side at most ``side`` pixels."""
    picture = Image.fromarray(image) if isinstance(image, np.ndarray) else image.convert("RGB")
    if max(picture.size) > side:
        scale = side / max(picture.size)
        picture = picture.resize((max(1, round(picture.width * scale)), max(1, round(picture.height * scale))),
                                 Image.Resampling.BICUBIC)
    buffer = io.BytesIO()
    picture.save(buffer, format="JPEG", quality=85)
    return "data:image/jpeg;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


def outcomes_of(records: Mapping[str, Sequence[EpisodeRecord]]) -> dict[tuple[str, int], str]:
    """Each main-arm episode's outcome: an `agents.metrics.OUTCOMES` entry when the direct arm ran, else
    ``right`` / ``wrong``."""
    main = records.get(MAIN_ARM, ())
    if records.get(DIRECT_ARM):
        return paired_outcomes(records[DIRECT_ARM], main)
    return {(r.sample_id, r.draw): "right" if r.correct else "wrong" for r in main}


def choose(outcomes: Mapping[tuple[str, int], str], n: int, seed: int = 0) -> list[tuple[str, int]]:
    """Up to ``n`` episodes, taken in turn from each outcome (a seeded shuffle within each), so that rare
    outcomes (harm) are shown beside common ones."""
    groups: dict[str, list[tuple[str, int]]] = defaultdict(list)
    for key, outcome in sorted(outcomes.items()):
        groups[outcome].append(key)
    rng = np.random.default_rng(seed)
    queues = [[group[i] for i in rng.permutation(len(group))] for _, group in sorted(groups.items())]
    chosen: list[tuple[str, int]] = []
    while len(chosen) < n and any(queues):
        for queue in queues:
            if queue and len(chosen) < n:
                chosen.append(queue.pop(0))
    return chosen


def _replay(record: EpisodeRecord, sample: Any, arm: Arm, settings: EvalSettings) -> list[dict[str, Any]]:
    """The final chat of ``record`` replayed in a fresh env of its arm."""
    env = arm.factory(settings.view_budget, settings.coord_frame)(sample)
    chat, _ = env.reset(options={"sample": sample})
    for action in record.actions:
        chat, *_ = env.step(action)
    env.close()
    return chat


def _text(message: Mapping[str, Any]) -> str:
    return "\n".join(part["text"] for part in message["content"] if part.get("type") == "text")


def _card(sample: Any, draw: int, outcome: str, by_arm: Mapping[str, EpisodeRecord], arms: Mapping[str, Arm],
          settings: EvalSettings) -> str:
    record = by_arm[MAIN_ARM]
    chat = _replay(record, sample, arms[MAIN_ARM], settings)
    original, view = message_images(chat[:2])[0], message_views(chat[:2])[0]
    predicted = [(info["box_original"], bool(info["box_valid"])) for info in record.infos[1:]
                 if info.get("box_original") is not None]
    overview = render_episode(original, view, predicted, [], truth=sample.boxes)
    esc = html.escape
    options = "<br>".join(f"({chr(65 + i)}) {esc(text)}" for i, text in enumerate(sample.options))
    parts = [
        f'<div class="card" data-category="{esc(sample.category or UNCATEGORISED)}" data-outcome="{outcome}">',
        f'<div><span class="badge {outcome}">{outcome.replace("_", " ")}</span> <b>{esc(sample.id)}</b>'
        f'{f" (draw {draw})" if draw else ""} <span class="meta">{esc(sample.category or UNCATEGORISED)}</span></div>',
        f"<p>{esc(sample.question)}<br>{options}<br><span class='meta'>correct: {esc(sample.answer)}</span></p>",
        f'<img alt="original with boxes" src="{data_uri(overview, OVERVIEW_SIDE)}">',
        '<div class="meta">original as shown; green: valid boxes, red: invalid, blue: ground truth</div>',
    ]
    for turn, action in enumerate(record.actions):
        info = record.infos[turn + 1]
        verdict = info.get("action") or "-"
        if info.get("iou") is not None:
            verdict += f", IoU {info['iou']:.2f}"
        if verdict.startswith("answer") or info.get("answer") is not None:
            verdict += f", answer {info.get('answer')} ({'right' if info.get('correct') else 'wrong'})"
        parts.append(f'<div class="turn"><b>turn {turn + 1}</b> <span class="meta">{esc(verdict)}</span>'
                     f"<pre>{esc(action)}</pre>")
        reply = chat[3 + 2 * turn] if 3 + 2 * turn < len(chat) else None
        if reply is not None:
            shown = [(image, v) for image, v in zip(message_images([reply]), message_views([reply]))]
            crops = "".join(f'<img alt="{v.kind}" src="{data_uri(image, CROP_SIDE)}">' for image, v in shown
                            if v.kind == "crop")
            if crops:
                parts.append(f'<div class="crops">{crops}</div>')
            elif shown:
                parts.append('<div class="meta">no valid box: the env showed the same image again</div>')
            parts.append(f"<details><summary>env's text</summary><pre>{esc(_text(reply))}</pre></details>")
        parts.append("</div>")
    for name, label in ((DIRECT_ARM, "without zoom"), (ORACLE_ARM, "after the oracle crop")):
        if name in by_arm:
            other = by_arm[name]
            last = other.infos[-1]
            parts.append(f'<div class="turn"><b>{label}</b> <span class="meta">answer {esc(str(last.get("answer")))} '
                         f'({"right" if other.correct else "wrong"})</span><pre>{esc(other.actions[-1])}</pre></div>')
    parts.append("</div>")
    return "\n".join(parts)


def _table_html(table: Table) -> str:
    head = "".join(f"<th>{html.escape(h)}</th>" for h in table.header)
    body = "".join("<tr>" + "".join(f"<td>{html.escape(c)}</td>" for c in row) + "</tr>" for row in table.rows)
    note = f'<p class="note">{html.escape(table.note)}</p>' if table.note else ""
    return f"<h2>{html.escape(table.title)}</h2><table><tr>{head}</tr>{body}</table>{note}"


def _select(name: str, values: Sequence[str]) -> str:
    options = "".join(f'<option value="{html.escape(v)}">{html.escape(v)}</option>' for v in values)
    return f'<label>{name} <select id="{name}"><option value="all">all</option>{options}</select></label> '


def report_html(results: Mapping[str, Any], table_list: Sequence[Table], records: Mapping[str, Sequence[EpisodeRecord]],
                samples: Mapping[str, Any], arms: Sequence[Arm], settings: EvalSettings, n_trajectories: int = 24,
                seed: int = 0) -> str:
    """The report page (see the module docstring).

    Args:
        results: ``results.json``'s content (model, data, protocol, versions).
        table_list: `summary.tables` of the run.
        records: each arm's records.
        samples: the run's samples by id.
        arms: the run's arms (to replay episodes).
        settings: the run's settings (view budget and frame of the replays).
        n_trajectories: trajectory cards to show at most.
        seed: of the choice of cards.
    """
    esc = html.escape
    outcomes = outcomes_of(records)
    keyed = {arm: {(r.sample_id, r.draw): r for r in group} for arm, group in records.items()}
    by_name = {arm.name: arm for arm in arms}
    cards = []
    for sample_id, draw in choose(outcomes, n_trajectories, seed):
        by_arm = {arm: group[(sample_id, draw)] for arm, group in keyed.items() if (sample_id, draw) in group}
        cards.append(_card(samples[sample_id], draw, outcomes[(sample_id, draw)], by_arm, by_name, settings))
    categories = sorted({samples[s].category or UNCATEGORISED for s, _ in outcomes})
    kinds = [o for o in (*OUTCOMES, "right", "wrong") if o in set(outcomes.values())]
    model, data = results["model"], results["data"]
    return "\n".join([
        "<!DOCTYPE html>", '<html lang="en"><head><meta charset="utf-8">',
        f"<title>zoomgym eval: {esc(str(model.get('name')))} on {esc(str(data.get('name')))}</title>",
        f"<style>{STYLE}</style></head><body>",
        f"<h1>zoomgym eval: {esc(str(model.get('name')))} on {esc(str(data.get('source') or data['name']))}</h1>",
        f'<p class="meta">{data["evaluated"]} of {data["samples"]} samples, data sha256 {esc(data["sha256"][:16])}; '
        f"zoomgym {esc(str(results['versions'].get('zoomgym')))} ({esc(str(results['versions'].get('git_commit')))})</p>",
        *(_table_html(table) for table in table_list),
        "<h2>Protocol</h2><details><summary>every setting of every arm (as in results.json)</summary>"
        f"<pre>{esc(json.dumps(results['protocol'], indent=2))}</pre></details>",
        f"<h2>Trajectories ({len(cards)} of {len(outcomes)} episodes)</h2>",
        '<div class="filters">' + _select("category", categories) + _select("outcome", kinds) + '<span id="count"></span></div>',
        '<div class="cards">', *cards, "</div>",
        f"<script>{SCRIPT}</script></body></html>", ""])
