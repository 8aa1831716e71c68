"""Aggregating several people's rankings of one task, and how far they agree.

A label ranks a task's K answers as `ranks`: one number per answer, 1 = best, equal numbers for
a tie (so [2, 1, 2, 3] says: answer 1 best, answers 0 and 2 tied next, answer 3 worst). Every
statistic here is a pure function of such lists, so it is tested on hand-computed cases.

    preference(ranks, i, j)       +1 if i is above j, -1 if below, 0 if tied
    positions(ranks)              fractional positions (ties share the mean of their places)
    aggregate(labels)             mean position per answer over annotators (Borda count)
    task_agreement(labels)        share of (annotator pair, answer pair) judgements that match
    krippendorff_alpha(units)     ordinal alpha over (task, answer) units valued by position
    agreement_with(...)           share of one annotator's pair judgements that match a reference
"""

from __future__ import annotations

import random
from collections import Counter
from itertools import combinations


def preference(ranks: list[int], i: int, j: int) -> int:
    """+1 if answer i is ranked above answer j, -1 if below, 0 if tied."""
    return (ranks[i] < ranks[j]) - (ranks[i] > ranks[j])


def positions(ranks: list[int]) -> list[float]:
    """Fractional positions 1..K: tied answers share the mean of the places they take together,
    so [1, 1, 2] -> [1.5, 1.5, 3.0]. Positions of different annotators are comparable."""
    order = sorted(ranks)
    out = []
    for r in ranks:
        first = order.index(r) + 1
        count = order.count(r)
        out.append(first + (count - 1) / 2)
    return out


def aggregate(labels: list[list[int]]) -> list[float]:
    """Mean fractional position of each answer over the labels (a Borda count); lower is better."""
    k = len(labels[0])
    mean = [0.0] * k
    for ranks in labels:
        for i, p in enumerate(positions(ranks)):
            mean[i] += p / len(labels)
    return mean


def order_from_scores(mean_positions: list[float], rng: random.Random | None = None) -> list[int]:
    """Answer indices best first (lower mean position first). Equal ones keep their index order,
    or with `rng` come in a random order: a rankings file cannot mark a tie, and the order the
    answers were imported in (a source's own ranking, say) must not decide it."""
    ties = list(range(len(mean_positions)))
    if rng is not None:
        rng.shuffle(ties)
    return sorted(range(len(mean_positions)), key=lambda i: (mean_positions[i], ties[i]))


def task_agreement(labels: list[list[int]]) -> float | None:
    """Share of (pair of annotators, pair of answers) on which both said the same: above, below
    or tied. None with fewer than two labels."""
    if len(labels) < 2:
        return None
    k = len(labels[0])
    same = total = 0
    for a, b in combinations(labels, 2):
        for i, j in combinations(range(k), 2):
            same += preference(a, i, j) == preference(b, i, j)
            total += 1
    return same / total if total else None


def krippendorff_alpha(units: list[list[float]]) -> float | None:
    """Krippendorff's alpha with the ordinal metric. `units` holds, per unit (here: one answer of
    one task), the values the annotators gave it (here: its fractional position). Units with
    fewer than two values carry no information on agreement and are left out. None when there is
    no variation at all to measure against. (Krippendorff, Content Analysis, ch. 12.)"""
    units = [u for u in units if len(u) >= 2]
    if not units:
        return None
    # Coincidence matrix o[c, k]: each ordered pair of values within a unit, weighted 1 / (m_u - 1).
    coincidence: Counter = Counter()
    for values in units:
        m = len(values)
        for a in range(m):
            for b in range(m):
                if a != b:
                    coincidence[values[a], values[b]] += 1 / (m - 1)
    totals: Counter = Counter()
    for (c, _), weight in coincidence.items():
        totals[c] += weight
    categories = sorted(totals)
    n = sum(totals.values())
    if len(categories) < 2:
        return None
    index = {c: i for i, c in enumerate(categories)}
    cumulative = [0.0]
    for c in categories:
        cumulative.append(cumulative[-1] + totals[c])

    def delta(c, k) -> float:   # ordinal metric: the mass of the categories between c and k
        lo, hi = sorted((index[c], index[k]))
        return (cumulative[hi + 1] - cumulative[lo] - (totals[c] + totals[k]) / 2) ** 2

    observed = sum(weight * delta(c, k) for (c, k), weight in coincidence.items())
    expected = sum(totals[c] * totals[k] * delta(c, k) for c in categories for k in categories) / (n - 1)
    return 1.0 - observed / expected if expected else None


def alpha_of_tasks(tasks: list[list[list[int]]]) -> float | None:
    """Ordinal alpha over every (task, answer): its position as given by each annotator."""
    units = []
    for labels in tasks:
        if len(labels) < 2:
            continue
        placed = [positions(ranks) for ranks in labels]
        units += [[p[i] for p in placed] for i in range(len(labels[0]))]
    return krippendorff_alpha(units)


def agreement_with(ranks: list[int], reference: list[int]) -> tuple[int, int]:
    """(agreeing, counted) over the answer pairs the reference orders strictly: the annotator
    agrees when they order the pair the same way (a tie counts as not agreeing)."""
    agree = counted = 0
    for i, j in combinations(range(len(ranks)), 2):
        want = preference(reference, i, j)
        if want:
            counted += 1
            agree += preference(ranks, i, j) == want
    return agree, counted


def agreement_with_majority(ranks: list[int], others: list[list[int]]) -> tuple[int, int]:
    """(agreeing, counted) against the majority of the other annotators of the same task: for
    each answer pair, the judgement (above, below or tied) more than half of them made; pairs on
    which the others have no majority are not counted."""
    agree = counted = 0
    if not others:
        return 0, 0
    for i, j in combinations(range(len(ranks)), 2):
        votes = Counter(preference(o, i, j) for o in others)
        verdict, count = votes.most_common(1)[0]
        if count * 2 > len(others):
            counted += 1
            agree += preference(ranks, i, j) == verdict
    return agree, counted


def implied_pairs(ranks: list[int]) -> list[tuple[int, int]]:
    """(better, worse) answer indices for every strictly ordered pair of one label."""
    return [(i, j) if preference(ranks, i, j) > 0 else (j, i)
            for i, j in combinations(range(len(ranks)), 2) if preference(ranks, i, j)]
