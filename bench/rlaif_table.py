"""The tables of docs/rlaif.md from a bench/rlaif.sh run: `python bench/rlaif_table.py OUT`."""

from __future__ import annotations

import json
import statistics
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


def _gold(dirs: list[Path]) -> list[float]:
    return [json.loads((d / "summary.json").read_text())["eval_gold_accuracy"] for d in dirs
            if (d / "summary.json").is_file()]


def _mean_sd(values: list[float]) -> str:
    sd = statistics.stdev(values) if len(values) > 1 else 0.0
    return f"{statistics.mean(values):.3f} ± {sd:.3f}"


def _spread(values: list[float]) -> str:
    if not values:
        return "-"
    return f"{_mean_sd(values)} (n={len(values)}: {', '.join(f'{v:.3f}' for v in values)})"


def main(out: Path) -> None:
    for combine in ("first", "principles", "mean"):   # `bench/rlaif.sh labels` with each COMBINE
        suffix = "" if combine == "first" else f"_{combine}"
        count = out / f"ai_pairs{suffix}.count"
        if not count.is_file():
            continue
        n = int(count.read_text())
        ai = _gold(sorted((out / f"rm_ai{suffix}").glob("seed-*")))
        annotators = _gold(sorted((out / "rm_annotators").glob(f"n{n}-seed-*")))
        print(f"--combine {combine}: {n} pairs; RM gold accuracy, AI labels {_spread(ai)}, "
              f"annotator labels {_spread(annotators)}")
        if ai and annotators:
            ratios = [a / b for a, b in zip(ai, annotators)]
            print(f"  ratio (seed by seed) {_spread(ratios)}; of the means {statistics.mean(ai) / statistics.mean(annotators):.2f}x")
        log = out / f"ai_rank{suffix}.log"
        if log.is_file():
            print("  " + next((line for line in log.read_text().splitlines() if line.startswith("labeller:")), ""))
    rules = out / "rules" / "summary.json"
    if rules.is_file():
        for rule, f in json.loads(rules.read_text())["per_rule"].items():
            p, r = f["precision"], f["recall"]
            print(f"rule {rule:<15} precision {p if p is None else round(p, 3)}  recall {r if r is None else round(r, 3)}"
                  f"  positives {f['positives']}/{f['n']}")
    print(f"{'model':<20} {'gold':>6} {'harmful-comply':>15} {'wrong-lang':>11} {'(zh)':>6} {'correct':>8}")
    for path in sorted((out / "eval").glob("*.jsonl")):
        f = facets(path)
        print(f"{path.stem:<20} {f['gold']:>6.3f} {f['harmful_compliance']:>15.3f} {f['wrong_language']:>11.3f} "
              f"{f['wrong_language_zh']:>6.3f} {f['correct']:>8.3f}   (n={f['n']}, harmful={f['harmful_prompts']})")
    _seed_means(out / "eval")
    cai = out / "cai" / "summary.json"
    if cai.is_file():
        s = json.loads(cai.read_text())
        print(f"critique: {s['prompts']} prompts, {s['revised']} revised; gold of the answers "
              f"{s.get('gold_initial', float('nan')):.3f} -> {s.get('gold_revised', float('nan')):.3f}")


def _seed_means(folder: Path) -> None:
    """Mean ± sd over the runs named NAME-seedN (`bench/rlaif.sh rules` with PPO_SEEDS)."""
    groups: dict[str, list[dict]] = {}
    for path in sorted(folder.glob("*-seed*.jsonl")):
        groups.setdefault(path.stem.rsplit("-seed", 1)[0], []).append(facets(path))
    for name, runs in groups.items():
        gold, harmful, language = ([f[key] for f in runs] for key in ("gold", "harmful_compliance", "wrong_language"))
        print(f"{name} over {len(runs)} seeds: gold {_mean_sd(gold)}, harmful complied {_mean_sd(harmful)}, "
              f"wrong language {_mean_sd(language)}")


if __name__ == "__main__":
    main(Path(sys.argv[1]))
