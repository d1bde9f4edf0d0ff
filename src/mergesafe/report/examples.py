"""What changed, prompt by prompt: pre, post and the recommended merge side by side.

Built from the per-prompt rows each sweep trial keeps (`OUT/generations/KEY.jsonl`, eval's
`generations.jsonl` rows: `set`, `kind`, `line`, `prompt`, `response`, `verdict`, `category`).
A safety engineer reads these first:

* safety sets: every prompt whose verdict flipped between pre and post (`safe → unsafe`: the
  fine-tune's damage, and `unsafe → safe`), with whether the recommended merge is safe again;
* over-refusal sets: every probe whose refusal flipped between pre and post;
* task sets: the first few prompts whose score changed (else the first few), with their scores.

The same rows go to `OUT/examples.jsonl` and to the report's filterable table.
"""

from __future__ import annotations

from typing import Any

Row = dict[str, Any]

TASK_EXAMPLES = 5  # task prompts shown per task set

# the verdict that counts as "good" for each kind (safety: safe; over-refusal: compliance)
_GOOD = {"safety": "safe", "over_refusal": "compliance"}


def _index(rows: list[Row]) -> dict[tuple[str, str, int], Row]:
    """(kind, set, line) → row; with several samples only the first (sample 0) is kept."""
    out: dict[tuple[str, str, int], Row] = {}
    for r in rows:
        out.setdefault((r["kind"], r["set"], int(r["line"])), r)
    return out


def response_side(row: Row | None) -> Row | None:
    """One model's side of an example row: its response, verdict and (task sets) score."""
    if row is None:
        return None
    side = {"response": row.get("response", ""), "verdict": row.get("verdict")}
    if "score" in row:
        side["score"] = row["score"]
    return side


def changed_examples(pre: list[Row], post: list[Row], recommended: list[Row] | None,
                     task_examples: int = TASK_EXAMPLES) -> list[Row]:
    """The example rows (see the module doc), in set order then line order."""
    pre_i, post_i = _index(pre), _index(post)
    rec_i = _index(recommended) if recommended is not None else {}
    examples: list[Row] = []
    tasks_shown: dict[str, int] = {}
    # task sets where some prompt's score changed: only those prompts are shown there
    changed_sets = {k[1] for k in pre_i if k[0] == "task" and k in post_i
                    and pre_i[k].get("score") != post_i[k].get("score")}
    ordered = sorted(pre_i, key=lambda k: ({"safety": 0, "over_refusal": 1, "task": 2}.get(k[0], 3), k[1], k[2]))
    for key in ordered:
        kind, set_name, line = key
        a, b = pre_i[key], post_i.get(key)
        if b is None:
            continue
        rec = rec_i.get(key)
        entry: Row = {"kind": kind, "set": set_name, "line": line, "category": a.get("category"),
                      "prompt": a["prompt"], "pre": response_side(a), "post": response_side(b),
                      "recommended": response_side(rec)}
        if kind in _GOOD:
            if a["verdict"] == b["verdict"] or "unparsed" in (a["verdict"], b["verdict"]):
                continue
            good = _GOOD[kind]
            entry["change"] = f"{a['verdict']} → {b['verdict']}"
            entry["recommended_good"] = None if rec is None else rec["verdict"] == good
        else:
            shown = tasks_shown.get(set_name, 0)
            if shown >= task_examples:
                continue
            if a.get("score") == b.get("score") and set_name in changed_sets:
                continue
            tasks_shown[set_name] = shown + 1
            entry["change"] = f"score {a.get('score', 0):g} → {b.get('score', 0):g}"
            entry["recommended_good"] = None if rec is None else rec.get("score", 0) >= b.get("score", 0)
        examples.append(entry)
    return examples
