"""Arena votes: one JSON object per line, validated line by line.

    {"model_a": "base", "model_b": "rl", "winner": "a" | "b" | "tie",
     "task": "t2i", "prompt": "...", "prompt_id": "heldout-t2i-0003", "seed": 0, "judge": "annotators"}

`model_a`, `model_b` (distinct strings) and `winner` are required; `prompt` (string), `seed` (integer),
`task` and `judge` (strings) are checked when present, and `judge` defaults to "human". Other keys
(`annotator`, `time`, the judge's scores) are kept. A vote's `key` (models, task, prompt, seed, judge)
says which comparisons are already done, so re-running an arena only adds the missing ones.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

from qirl.data import read_json_lines
from qirl.errors import UserError

WINNERS = {"a": 1.0, "b": 0.0, "tie": 0.5}


def validate_vote(obj: Any, where: str) -> dict[str, Any]:
    """One decoded vote, checked; `where` ('file:line') prefixes every error."""
    if not isinstance(obj, dict):
        raise UserError(f"{where}: expected a JSON object, got {type(obj).__name__}")
    for key in ("model_a", "model_b", "winner"):
        if key not in obj:
            raise UserError(f"{where}: missing required key {key!r}")
    a, b = obj["model_a"], obj["model_b"]
    if not isinstance(a, str) or not isinstance(b, str) or not a or not b:
        raise UserError(f"{where}: 'model_a' and 'model_b' must be non-empty strings")
    if a == b:
        raise UserError(f"{where}: 'model_a' and 'model_b' are both {a!r}")
    if obj["winner"] not in WINNERS:
        raise UserError(f"{where}: 'winner' must be one of a, b, tie; got {obj['winner']!r}")
    for key in ("prompt", "task", "judge", "prompt_id"):
        if key in obj and obj[key] is not None and not isinstance(obj[key], str):
            raise UserError(f"{where}: {key!r} must be a string")
    if "seed" in obj and (not isinstance(obj["seed"], int) or isinstance(obj["seed"], bool)):
        raise UserError(f"{where}: 'seed' must be an integer")
    if obj.get("task") not in (None, "t2i", "edit"):
        raise UserError(f"{where}: 'task' must be t2i or edit, got {obj['task']!r}")
    return {**obj, "judge": obj.get("judge") or "human"}


def read_votes(path: str | Path) -> list[dict[str, Any]]:
    """All votes of a JSONL file (may be empty); any bad line is a `UserError` naming file and line."""
    path = Path(path)
    return [validate_vote(obj, f"{path}:{lineno}") for lineno, obj in read_json_lines(path, "votes file")]


def vote_key(v: dict[str, Any]) -> tuple:
    """The comparison a vote answers: unordered model pair, task, prompt, seed, judge."""
    pair = tuple(sorted((v["model_a"], v["model_b"])))
    return pair, v.get("task"), v.get("prompt"), v.get("seed"), v.get("judge")


def same_vote(v: dict[str, Any]) -> str:
    """Identity of a whole vote line (every field): importing the same file twice adds nothing."""
    import json

    return json.dumps(v, sort_keys=True)


def as_triples(votes: Sequence[dict[str, Any]]) -> list[tuple[str, str, float]]:
    """(model_a, model_b, score of a) per vote, for `ratings.VoteArrays`."""
    return [(v["model_a"], v["model_b"], WINNERS[v["winner"]]) for v in votes]
