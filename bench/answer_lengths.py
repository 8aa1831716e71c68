"""How long a perfect answer is, against the demonstrator SFT learns from, on held-out prompts.

    .venv/bin/python bench/answer_lengths.py [--n 400] [--world default]

The gold judge's `concise` facet rewards short answers, and the demonstrator's habits (filler,
compliance, answering in the other language) make its answers longer than the canonical ones.
A policy that unlearns the habits therefore gets shorter than its SFT model; this prints by how
much, so that a length change after RLHF can be read against it: against the demonstrations, and
against each prompt's likeliest demonstration (what greedy decoding of a faithful SFT model gives).
"""

from __future__ import annotations

import argparse
import collections
import random
import statistics

from rlhflab.world import demonstrator, tasks
from rlhflab.world.judge import judge


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--n", type=int, default=400, help="held-out prompts")
    parser.add_argument("--world", default="default", choices=sorted(demonstrator.WORLDS))
    parser.add_argument("--habit-rate", type=float, default=0.6, help="as `world export --habit-rate`")
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args()
    habits, _ = demonstrator.WORLDS[args.world]
    records = tasks.make_prompts("eval", args.n, seed=f"{args.seed}:eval")
    rng = random.Random(f"lengths:{args.seed}")
    best = [demonstrator.good_response(r) for r in records]
    demo = [demonstrator.demonstrate_with_kind(r, rng, args.habit_rate, habits) for r in records]
    gold = lambda texts: statistics.mean(judge(r["messages"], t, r.get("meta")).score  # noqa: E731
                                         for r, t in zip(records, texts))
    print(f"world {args.world}, habit rate {args.habit_rate}, {args.n} held-out prompts")
    print(f"  canonical answers:   {statistics.mean(map(len, best)):6.1f} characters, gold {gold(best):.3f}")
    texts = [t for t, _ in demo]
    print(f"  demonstrator's:      {statistics.mean(map(len, texts)):6.1f} characters, gold {gold(texts):.3f}")
    by_kind = collections.defaultdict(list)
    for text, kind in demo:
        by_kind[kind].append(len(text))
    for kind, lengths in sorted(by_kind.items(), key=lambda kv: -len(kv[1])):
        print(f"    {kind:<15} {len(lengths) / len(demo):5.1%} of answers, {statistics.mean(lengths):6.1f} characters")
    # What greedy decoding of a faithful SFT model copies: each prompt's likeliest kind of answer
    # (a habit where one applies at a rate above one half), drawn 50 times to find it.
    likeliest = []
    for record in records:
        kinds = collections.Counter(demonstrator.demonstrate_with_kind(record, rng, args.habit_rate, habits)[1]
                                    for _ in range(50))
        likeliest.append(demonstrator.render(record, kinds.most_common(1)[0][0], rng))
    print(f"  likeliest per prompt: {statistics.mean(map(len, likeliest)):6.1f} characters, gold {gold(likeliest):.3f}; "
          f"canonical / likeliest = {statistics.mean(map(len, best)) / statistics.mean(map(len, likeliest)):.2f}")


if __name__ == "__main__":
    main()
