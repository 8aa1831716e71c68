"""A reward model's accuracy against the clean gold order, by the kinds of the two answers, on a
fresh ranking set of the default toy world (300 held-out prompts, K=4, candidates sharing content).

    .venv/bin/python bench/rm_by_kind.py RM_DIR
"""

import collections
import random
import sys

from rlhflab.models.loading import choose_placement
from rlhflab.rewards.model import load_reward_model, score_texts
from rlhflab.world import demonstrator, tasks
from rlhflab.world.judge import judge

rm_dir = sys.argv[1]
model, tok = load_reward_model(rm_dir, choose_placement("cpu", "fp32"))
habits, shared = demonstrator.WORLDS["default"]
recs = tasks.make_prompts("eval", 300, seed="diag")
rng = random.Random(0)
items = []
for r in recs:
    cs = demonstrator.candidates(r, rng, 4, with_kinds=True, habit_rate=0.6, habits=habits, shared_content=True)
    items.append((r, cs, [judge(r["messages"], t, r["meta"]).score for t, _ in cs]))
convs = [r["messages"] + [{"role": "assistant", "content": t}] for r, cs, _ in items for t, _ in cs]
scores = score_texts(model, tok, convs)
acc = collections.defaultdict(lambda: [0, 0]); i = 0; tot = [0, 0]
for r, cs, g in items:
    s = scores[i:i + len(cs)]; i += len(cs)
    for a in range(len(cs)):
        for b in range(a + 1, len(cs)):
            if abs(g[a] - g[b]) < 1e-9: continue
            hi, lo = (a, b) if g[a] > g[b] else (b, a)
            key = (cs[hi][1], cs[lo][1]); ok = s[hi] > s[lo]
            acc[key][0] += ok; acc[key][1] += 1; tot[0] += ok; tot[1] += 1
print("overall", round(tot[0] / tot[1], 3), tot[1])
for k, (ok, n) in sorted(acc.items(), key=lambda kv: -kv[1][1])[:14]:
    print(f"{k[0]:>15} > {k[1]:<15} {ok / n:.2f} n={n}")
