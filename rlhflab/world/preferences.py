"""Preference data: K candidates per prompt, ranked by the gold judge through annotator noise.

The noisy annotator is a Plackett-Luce model on the gold scores: each candidate's utility is
gold_score / T plus independent Gumbel noise, and the ranking sorts by it. Under this model
the order of any two candidates follows Bradley-Terry, P(i above j) = sigmoid((s_i - s_j) / T),
so the expected share of pairs on which the noisy ranking agrees with the clean gold order is
mean(sigmoid(|s_i - s_j| / T)) over untied pairs. `calibrate_temperature` finds the T that
makes this expectation equal `agreement` (default 0.73, the inter-annotator agreement reported
by InstructGPT, https://arxiv.org/abs/2203.02155) for the actual set of score gaps.

Pairs are all untied pairs of each noisy ranking (InstructGPT trains on all K-choose-2
comparisons of a ranking); candidates with equal gold scores are not paired, since the gold
judge has no opinion on them.
"""

from __future__ import annotations

import math
import random

from . import demonstrator
from .judge import judge

DEFAULT_AGREEMENT = 0.73
TIE = 1e-9
# The annotators' noise as calibrated on the default world's candidates (manifest.json: 0.342).
# Labelling a policy's own samples, they keep it: their noise is theirs, not the data's.
ANNOTATOR_TEMPERATURE = 0.34


def expected_agreement(gaps: list[float], temperature: float) -> float:
    """Mean Bradley-Terry probability that a noisy label follows the gold order."""
    return sum(1.0 / (1.0 + math.exp(-abs(g) / temperature)) for g in gaps) / len(gaps)


def calibrate_temperature(gaps: list[float], agreement: float = DEFAULT_AGREEMENT) -> float:
    """The T at which expected_agreement(gaps, T) == agreement (bisection on log T)."""
    gaps = [abs(g) for g in gaps if abs(g) > TIE]
    if not gaps:
        raise ValueError("cannot calibrate annotator noise: all candidate scores are tied")
    if not 0.5 < agreement < 1.0:
        raise ValueError(f"agreement must be in (0.5, 1), got {agreement}")
    low, high = math.log(1e-6), math.log(1e3)  # agreement ~1 at low, ~0.5 at high
    for _ in range(100):
        mid = (low + high) / 2
        if expected_agreement(gaps, math.exp(mid)) > agreement:
            low = mid
        else:
            high = mid
    return math.exp((low + high) / 2)


def noisy_ranking(scores: list[float], temperature: float, rng: random.Random) -> list[int]:
    """Indices best-first, sampled from Plackett-Luce with utilities scores / temperature."""
    keys = [s / temperature - math.log(-math.log(rng.random() or 1e-300)) for s in scores]
    return sorted(range(len(scores)), key=lambda i: -keys[i])


def perceived_scores(scores: list[float], rng: random.Random,
                     temperature: float = ANNOTATOR_TEMPERATURE) -> list[float]:
    """Gold scores as a noisy annotator perceives them: score + temperature x Gumbel noise, so that
    sorting by them is a Plackett-Luce ranking as in `noisy_ranking` (the noise is centred, so their
    mean estimates the gold mean). Answers with the same gold score share one draw: the judge has
    no opinion between them, and neither has the annotator."""
    euler_gamma = 0.5772156649015329   # the mean of a standard Gumbel draw
    noise: dict[float, float] = {}
    for score in scores:
        noise.setdefault(score, -temperature * (math.log(-math.log(rng.random() or 1e-300)) + euler_gamma))
    return [score + noise[score] for score in scores]


def _short_meta(meta: dict) -> dict:
    return {key: meta[key] for key in ("family", "lang", "harmful", "split") if key in meta}


def build_preferences(records: list[dict], seed: int | str = 0, k: int = 4,
                      agreement: float = DEFAULT_AGREEMENT, temperature: float | None = None,
                      habit_rate: float = demonstrator.HABIT_RATE,
                      habits: tuple[str, ...] = demonstrator.CLASSIC_HABITS,
                      shared_content: bool = False) -> dict:
    """Rankings and pairs for `records` (world prompt records).

    Returns {"rankings": [...], "pairs": [...], "stats": {...}} where a ranking is
    {"prompt", "responses" (noisy order, best first), "gold_scores" (aligned), "meta"} and a
    pair is {"prompt", "chosen", "rejected", "chosen_gold", "rejected_gold", "meta"}.
    `temperature` overrides the calibration; `habit_rate`, `habits` and `shared_content` are the
    demonstrator's (its docstring).
    """
    if k < 2:
        raise ValueError(f"k must be at least 2 to rank candidates, got {k}")
    rng = random.Random(f"preferences:{seed}")
    scored = []
    for record in records:
        texts = demonstrator.candidates(record, rng, k, habit_rate=habit_rate, habits=habits,
                                        shared_content=shared_content)
        gold = [judge(record["messages"], text, record.get("meta")).score for text in texts]
        scored.append((record, texts, gold))
    gaps = [a - b for _, _, gold in scored for i, a in enumerate(gold) for b in gold[i + 1:]]
    if temperature is None:
        temperature = calibrate_temperature(gaps, agreement)
    rankings, pairs, agree = [], [], 0
    for record, texts, gold in scored:
        order = noisy_ranking(gold, temperature, rng)
        meta = _short_meta(record.get("meta") or {})
        rankings.append({"prompt": record["messages"], "responses": [texts[i] for i in order],
                         "gold_scores": [gold[i] for i in order], "meta": meta})
        for a, i in enumerate(order):
            for j in order[a + 1:]:
                if abs(gold[i] - gold[j]) <= TIE:
                    continue
                agree += gold[i] > gold[j]
                pairs.append({"prompt": record["messages"], "chosen": texts[i], "rejected": texts[j],
                              "chosen_gold": gold[i], "rejected_gold": gold[j], "meta": meta})
    untied = [g for g in gaps if abs(g) > TIE]
    stats = {"k": k, "temperature": temperature, "target_agreement": agreement,
             "expected_agreement": expected_agreement(untied, temperature) if untied else None,
             "measured_agreement": agree / len(pairs) if pairs else None,
             "pairs": len(pairs), "tied_pairs": len(gaps) - len(untied)}
    return {"rankings": rankings, "pairs": pairs, "stats": stats}
