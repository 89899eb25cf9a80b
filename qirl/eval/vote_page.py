"""Collecting human votes: one self-contained HTML page, no server, no network.

`qirl eval arena --judge human` writes `vote.html` into the arena folder: every pair of images to
compare (as PNG data URIs), shown one pair at a time in random left / right order (so position bias
does not favour model a), with buttons and keys 1 (left better), 2 (tie), 3 (right better). "Download
votes" saves `votes_human.jsonl` in the votes schema (votes.py), which
`qirl eval arena --out <folder> --votes votes_human.jsonl` adds to the arena. Votes in progress are also
kept in the browser's localStorage, so a reload does not lose them.
"""

from __future__ import annotations

import html
import json
from collections.abc import Sequence
from typing import Any

_PAGE = """<!DOCTYPE html>
<html lang="en"><head><meta charset="utf-8"><title>qirl arena: vote</title>
<style>
body {{ font-family: sans-serif; max-width: 760px; margin: 2em auto; color: #222; }}
.pair {{ display: flex; gap: 24px; justify-content: center; }}
.pair img {{ width: 256px; height: 256px; image-rendering: pixelated; border: 1px solid #999; }}
.src img {{ width: 128px; height: 128px; image-rendering: pixelated; }}
button {{ font-size: 1.1em; margin: 0.4em; padding: 0.4em 1em; }}
#prompt {{ font-size: 1.2em; margin: 1em 0; }}
</style></head><body>
<h1>Which image follows the text better?</h1>
<p>Task: {task}. Judge what the text asks first, then clean shapes, then looks. Keys: 1 left, 2 tie, 3 right.</p>
<p>Your name (optional): <input id="annotator" size="20"></p>
<div id="prompt"></div><div class="src" id="src"></div>
<div class="pair"><img id="left" alt="left image"><img id="right" alt="right image"></div>
<p style="text-align:center"><button onclick="vote(0)">1: left is better</button>
<button onclick="vote(1)">2: tie</button><button onclick="vote(2)">3: right is better</button></p>
<p id="progress"></p><p><button onclick="download()">Download votes</button></p>
<script>
const PAIRS = {pairs};
const STORE = "qirl-votes-" + {store};
let votes = JSON.parse(localStorage.getItem(STORE) || "[]");
let flips = PAIRS.map(() => Math.random() < 0.5);
function show() {{
  const i = votes.length;
  document.getElementById("progress").textContent = i + " / " + PAIRS.length + " voted";
  if (i >= PAIRS.length) {{ document.getElementById("prompt").textContent = "Done: download your votes."; return; }}
  const p = PAIRS[i], f = flips[i];
  document.getElementById("prompt").textContent = p.prompt;
  document.getElementById("src").innerHTML = p.src ? 'source: <img src="' + p.src + '" alt="source">' : "";
  document.getElementById("left").src = f ? p.img_b : p.img_a;
  document.getElementById("right").src = f ? p.img_a : p.img_b;
}}
function vote(choice) {{
  const i = votes.length; if (i >= PAIRS.length) return;
  const p = PAIRS[i], f = flips[i];
  let winner = choice === 1 ? "tie" : ((choice === 0) !== f ? "a" : "b");
  votes.push({{model_a: p.model_a, model_b: p.model_b, task: p.task, prompt: p.prompt, prompt_id: p.prompt_id,
    seed: p.seed, winner: winner, judge: "human", annotator: document.getElementById("annotator").value || null,
    time: new Date().toISOString()}});
  localStorage.setItem(STORE, JSON.stringify(votes)); show();
}}
function download() {{
  const text = votes.map(v => JSON.stringify(v)).join("\\n") + (votes.length ? "\\n" : "");
  const a = document.createElement("a");
  a.href = URL.createObjectURL(new Blob([text], {{type: "application/jsonl"}}));
  a.download = "votes_human.jsonl"; a.click();
}}
document.addEventListener("keydown", e => {{ if ("123".includes(e.key) && e.target.tagName !== "INPUT") vote(Number(e.key) - 1); }});
show();
</script></body></html>
"""


def vote_page(task: str, pairs: Sequence[dict[str, Any]], store: str) -> str:
    """The page's HTML. `pairs`: dicts with model_a, model_b, task, prompt, prompt_id, seed, img_a,
    img_b and, for edits, src (images as data URIs)."""
    # JSON inside <script>: escape "<" so no prompt text can close the script element.
    data = json.dumps(list(pairs)).replace("<", "\\u003c")
    return _PAGE.format(task=html.escape(task), pairs=data, store=json.dumps(store).replace("<", "\\u003c"))
