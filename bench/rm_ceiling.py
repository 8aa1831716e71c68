"""How well can a reward model rank toy-world answers if it cannot tell a right value from a wrong one?

    .venv/bin/python bench/rm_ceiling.py RANKINGS.jsonl [SCORES.jsonl]

RANKINGS is a toy-world rankings file (`world export`, or `rankings.jsonl` of a quickstart run);
SCORES, if given, is `rlhflab rm score --data RANKINGS --out SCORES` of some reward model.

Prints, over every pair of answers to one prompt whose gold scores differ:
- the accuracy of a *value-blind judge*: the gold judge itself, every facet known exactly, except
  that `correct` is one constant for every answer (ties count half). No reward model that cannot
  check values can rank better than this, whatever its size or data;
- with SCORES, the reward model's accuracy against the gold order, by the facet that separates
  the two answers (the only facet, or "correct+other" / "several").

Candidates are of one kind each (world/demonstrator.py): a filler or verbose answer wraps a good
one, so its value is always right, while a plain answer is wrong 29% of the time. A reward model
blind to values is right, on the labels, to like filler: that is why the concise pairs fall with
the correct ones.
"""

from __future__ import annotations

import collections
import importlib
import itertools
import json
import sys

judge = importlib.import_module("rlhflab.world.judge")   # the module, not the function it exports
TIE = 1e-6


def blind_score(facets: dict, correct: float = 1.0) -> float:
    """The gold judge's formula with `correct` replaced by a constant."""
    facets = {**facets, "correct": correct} if "correct" in facets else dict(facets)
    weights = {k: w for k, w in judge.WEIGHTS.items() if k in facets}
    base = sum(w * facets[k] for k, w in weights.items()) / sum(weights.values())
    for gate in judge.GATES:
        base *= 0.5 + 0.5 * facets[gate]
    return facets["nonempty"] * base


def separating_facet(a: dict, b: dict) -> str:
    differ = [f for f in judge.FACETS if a.get(f) != b.get(f)]
    if len(differ) == 1:
        return differ[0]
    return "correct+other" if "correct" in differ else "several"


def measure(rankings_path: str, scores_path: str | None = None) -> dict:
    rows = [json.loads(line) for line in open(rankings_path, encoding="utf-8") if line.strip()]
    scores = ([json.loads(line)["score"] for line in open(scores_path, encoding="utf-8") if line.strip()]
              if scores_path else None)
    if scores is not None and len(scores) != sum(len(row["responses"]) for row in rows):
        raise SystemExit(f"{scores_path}: {len(scores)} scores for "
                         f"{sum(len(row['responses']) for row in rows)} responses in {rankings_path}")
    blind = [0.0, 0]
    by_facet = collections.defaultdict(lambda: [0, 0])
    offset = 0
    for row in rows:
        if "gold_scores" not in row:
            raise SystemExit(f"{rankings_path}: rows need gold_scores (a toy-world rankings file)")
        facets = [judge.judge(row["prompt"], text).facets for text in row["responses"]]
        gold = row["gold_scores"]
        for a, b in itertools.combinations(range(len(gold)), 2):
            if abs(gold[a] - gold[b]) <= TIE:
                continue
            better, worse = (a, b) if gold[a] > gold[b] else (b, a)
            sb, sw = blind_score(facets[better]), blind_score(facets[worse])
            blind[0] += 0.5 if abs(sb - sw) <= TIE else float(sb > sw)
            blind[1] += 1
            if scores is not None:
                kind = separating_facet(facets[better], facets[worse])
                for key in (kind, "all"):
                    by_facet[key][0] += scores[offset + better] > scores[offset + worse]
                    by_facet[key][1] += 1
        offset += len(gold)
    return {"pairs": blind[1], "value_blind_accuracy": blind[0] / max(blind[1], 1),
            "by_facet": {k: {"pairs": n, "share": n / blind[1], "accuracy": c / n}
                         for k, (c, n) in sorted(by_facet.items(), key=lambda kv: -kv[1][1])}}


def main(argv: list[str]) -> int:
    if not 1 <= len(argv) <= 2:
        print(__doc__.strip().splitlines()[2], file=sys.stderr)
        return 2
    result = measure(*argv)
    print(f"{result['pairs']} pairs with different gold scores")
    print(f"value-blind judge (every facet but `correct` known): {result['value_blind_accuracy']:.3f}")
    for kind, row in result["by_facet"].items():
        print(f"  reward model, pairs separated by {kind:14s} {row['pairs']:6d} ({row['share']:5.1%})  "
              f"accuracy {row['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
