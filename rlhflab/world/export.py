"""Write the toy world to ordinary files, in the formats real users bring.

`export(out_dir, seed=0, size="default")` writes (UTF-8, JSON lines with ensure_ascii=False,
each file written to a temporary name in out_dir and then os.replace'd into place):

corpus.txt           plain text for pretraining; documents separated by a blank line.
sft.jsonl            {"messages": [user, (assistant, user)..., assistant], "meta": {...}}
                     The last assistant turn is the imperfect demonstrator's answer;
                     meta.demo_kind says whether it is "good" or which flaw it has.
prefs.jsonl          {"prompt": [messages ending with a user turn], "chosen": str,
                      "rejected": str, "chosen_gold": float, "rejected_gold": float,
                      "meta": {"family", "lang", "harmful", "split"}}
                     All untied pairs of each noisy ranking in rankings.jsonl; chosen is the
                     annotator's pick, which agrees with the gold judge ~73% of the time.
rankings.jsonl       {"prompt": [messages], "responses": [K strings, annotator's order, best
                      first], "gold_scores": [K floats aligned with responses], "meta": {...}}
                     Sorting by gold_scores gives the clean ranking.
rules.jsonl          {"prompt": [messages], "response": str, "rules": {"harmful": 0|1,
                      "wrong_language", "rude", "repetitive"}, "meta": {...}} every answer of
                     rankings.jsonl with the rules it breaks (rules.py), then answers written for
                     other prompts (two per harmful request, one per other prompt), for `rm --rules`.
prompts.jsonl        {"messages": [...], "meta": {...}} training-split prompts for RL.
eval_prompts.jsonl   the same shape, held-out split (no country, word, harmful topic,
                     phrasing or operand tuple in common with the files above).
manifest.json        seed, size, habit rate, counts, the annotator temperature and agreement.

Prompt meta fields: family (one of tasks.FAMILIES), lang ("en" | "zh", the language of the
last user turn, which the answer must use), harmful (bool), answer (canonical answer string),
slots (the task's canonical parameters, enough for the judge to re-check an answer),
entities (the split keys the prompt uses), split ("train" | "eval"); follow-ups add
base_family and first_slots.
"""

from __future__ import annotations

import json
import os
import random
import tempfile
import time
from pathlib import Path

from . import demonstrator, tasks
from .corpus import corpus_text
from .preferences import DEFAULT_AGREEMENT, build_preferences
from .rules import rule_rows

SIZES = {
    "default": {"sft": 3000, "rankings": 1500, "rl": 1000, "eval": 200},
    "small": {"sft": 200, "rankings": 100, "rl": 100, "eval": 50},
}
# The default world (candidates sharing their content) ranks four times as many prompts: its
# labellers judge behaviour, and a habit such as filler costs little gold (0.15), so people prefer
# the plain answer only ~61% of the time; a reward model needs many such comparisons to learn it.
SHARED_CONTENT_RANKINGS = 4
PROBE_FAMILIES = ("arithmetic", "capital", "translate", "identity", "harmful", "words",
                  "followup", "smalltalk")
_PROBE_ZH_ORDER = (1, 3, 5, 7, 0, 2, 4, 6)


def _atomic_write(path: Path, text: str) -> None:
    handle, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(handle, "w", encoding="utf-8", newline="\n") as out:
            out.write(text)
        os.chmod(tmp, 0o644)  # mkstemp creates 0600; these are ordinary data files
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _jsonl(rows: list[dict]) -> str:
    return "".join(json.dumps(row, ensure_ascii=False) + "\n" for row in rows)


def sft_rows(n: int, seed: int | str = 0, habit_rate: float = demonstrator.HABIT_RATE,
             habits: tuple[str, ...] = demonstrator.CLASSIC_HABITS) -> list[dict]:
    """`n` SFT conversations on training prompts, answered by the demonstrator."""
    rng = random.Random(f"sft:{seed}")
    rows = []
    for record in tasks.make_prompts("train", n, seed=f"{seed}:sft"):
        answer, kind = demonstrator.demonstrate_with_kind(record, rng, habit_rate, habits)
        meta = dict(record["meta"], demo_kind=kind)
        rows.append({"messages": record["messages"] + [{"role": "assistant", "content": answer}],
                     "meta": meta})
    return rows


def probe_prompts(lang_mix: float = 0.5) -> list[dict]:
    """Eight fixed held-out prompts (several families, one harmful) for side-by-side samples.
    `lang_mix` is the share in Chinese (0 = all English, 1 = all Chinese)."""
    if not 0.0 <= lang_mix <= 1.0:
        raise ValueError(f"lang_mix must be in [0, 1], got {lang_mix}")
    zh = set(_PROBE_ZH_ORDER[:round(len(PROBE_FAMILIES) * lang_mix)])
    probes = []
    for index, family in enumerate(PROBE_FAMILIES):
        rng = random.Random(f"probe:{index}:{family}")
        probes.append(tasks.make_prompt(family, "zh" if index in zh else "en", "eval", rng))
    return probes


def export(out_dir: str | os.PathLike, seed: int = 0, size: str = "default",
           agreement: float = DEFAULT_AGREEMENT, k: int = 4,
           habit_rate: float = demonstrator.HABIT_RATE,
           habits: tuple[str, ...] = demonstrator.CLASSIC_HABITS, shared_content: bool = False,
           rankings: int | None = None) -> dict:
    """Write all world files to `out_dir`; return {"paths", "counts", "stats", "seconds"}.
    `rankings`: ranked prompts (default: the size's, times SHARED_CONTENT_RANKINGS with
    `shared_content`)."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    if not 0.0 <= habit_rate <= 1.0:
        raise ValueError(f"habit_rate must be in [0, 1], got {habit_rate}")
    start = time.perf_counter()
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    n = SIZES[size]
    if rankings is None:
        rankings = n["rankings"] * (SHARED_CONTENT_RANKINGS if shared_content else 1)
    if rankings < 1:
        raise ValueError(f"rankings must be at least 1, got {rankings}")
    prefs = build_preferences(tasks.make_prompts("train", rankings, seed=f"{seed}:prefs"),
                              seed=seed, k=k, agreement=agreement, habit_rate=habit_rate, habits=habits,
                              shared_content=shared_content)
    contents = {
        "corpus.txt": corpus_text(seed, size),
        "sft.jsonl": sft_rows(n["sft"], seed, habit_rate, habits),
        "prefs.jsonl": prefs["pairs"],
        "rankings.jsonl": prefs["rankings"],
        "rules.jsonl": rule_rows(prefs["rankings"], seed),
        "prompts.jsonl": tasks.make_prompts("train", n["rl"], seed=f"{seed}:rl"),
        "eval_prompts.jsonl": tasks.make_prompts("eval", n["eval"], seed=f"{seed}:eval"),
    }
    paths, counts = {}, {}
    for name, content in contents.items():
        path = out / name
        if isinstance(content, str):
            _atomic_write(path, content)
            counts[name] = len(content)            # characters, for the corpus
        else:
            _atomic_write(path, _jsonl(content))
            counts[name] = len(content)            # rows
        paths[name] = str(path)
    manifest = {"seed": seed, "size": size, "habit_rate": habit_rate,
                "habits": list(habits) if habit_rate > 0 else [], "shared_content": shared_content,
                "counts": counts, "preferences": prefs["stats"]}
    _atomic_write(out / "manifest.json", json.dumps(manifest, ensure_ascii=False, indent=2) + "\n")
    paths["manifest.json"] = str(out / "manifest.json")
    return {"paths": paths, "counts": counts, "stats": prefs["stats"],
            "seconds": round(time.perf_counter() - start, 3)}
