"""The tables of docs/rlaif.md from a bench/rlaif.sh run: `python bench/rlaif_table.py OUT`."""

from __future__ import annotations

import json
import sys
from pathlib import Path


def facets(path: Path) -> dict:
    rows = [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]
    harmful = [r for r in rows if r.get("meta", {}).get("harmful")]
    zh = [r for r in rows if r.get("meta", {}).get("lang") == "zh"]
    return {"n": len(rows), "gold": sum(r["score"] for r in rows) / len(rows),
            "harmful_compliance": sum(r["facets"]["refusal"] == 0 for r in harmful) / max(1, len(harmful)),
            "harmful_prompts": len(harmful),
            "wrong_language": sum(r["facets"]["language"] < 0.5 for r in rows) / len(rows),
            "wrong_language_zh": sum(r["facets"]["language"] < 0.5 for r in zh) / max(1, len(zh)),
            "correct": sum(r["facets"].get("correct", 0) for r in rows) / len(rows)}


def main(out: Path) -> None:
    for combine in ("mean", "principles", "first"):   # `bench/rlaif.sh labels` with each COMBINE
        suffix = "" if combine == "mean" else f"_{combine}"
        gold = {}
        for name in (f"rm_ai{suffix}", f"rm_annotators{suffix}"):
            summary = out / name / "summary.json"
            if summary.is_file():
                s = json.loads(summary.read_text())
                gold[name] = s.get("eval_gold_accuracy", float("nan"))
                print(f"{name:<24} gold accuracy {gold[name]:.3f}  "
                      f"label accuracy {s.get('eval_accuracy', float('nan')):.3f}  pairs {s.get('rows_used')}")
        if len(gold) == 2:
            print(f"--combine {combine}: RM on AI labels / RM on annotator labels = "
                  f"{gold[f'rm_ai{suffix}'] / gold[f'rm_annotators{suffix}']:.2f}x")
        log = out / f"ai_rank{suffix}.log"
        if log.is_file():
            print(next((line for line in log.read_text().splitlines() if line.startswith("labeller:")), ""))
    rules = out / "rules" / "summary.json"
    if rules.is_file():
        for rule, f in json.loads(rules.read_text())["per_rule"].items():
            p, r = f["precision"], f["recall"]
            print(f"rule {rule:<15} precision {p if p is None else round(p, 3)}  recall {r if r is None else round(r, 3)}"
                  f"  positives {f['positives']}/{f['n']}")
    print(f"{'model':<14} {'gold':>6} {'harmful-comply':>15} {'wrong-lang':>11} {'(zh)':>6} {'correct':>8}")
    for path in sorted((out / "eval").glob("*.jsonl")):
        f = facets(path)
        print(f"{path.stem:<14} {f['gold']:>6.3f} {f['harmful_compliance']:>15.3f} {f['wrong_language']:>11.3f} "
              f"{f['wrong_language_zh']:>6.3f} {f['correct']:>8.3f}   (n={f['n']}, harmful={f['harmful_prompts']})")
    cai = out / "cai" / "summary.json"
    if cai.is_file():
        s = json.loads(cai.read_text())
        print(f"critique: {s['prompts']} prompts, {s['revised']} revised; gold of the answers "
              f"{s.get('gold_initial', float('nan')):.3f} -> {s.get('gold_revised', float('nan')):.3f}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
