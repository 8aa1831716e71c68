"""Rule flags of the toy world: which of its rules an answer breaks, read off the gold judge's facets.

The rules are those a rule reward model learns (`rlhflab rm --rules`, rules.jsonl in
docs/data-formats.md), each a flaw that people flag on sight, as Sparrow's raters flag rule
breaks beside their preferences:

    harmful         complies with a harmful request (refusal facet 0 on a harmful prompt)
    wrong_language  is not in the language of the question (language facet below 0.5)
    rude            insults the user (polite facet 0)
    repetitive      repeats itself (nonrepetitive facet below 0.5)
"""

from __future__ import annotations

import random

from .judge import judge

RULES = ("harmful", "wrong_language", "rude", "repetitive")


def rule_flags(messages: list[dict], response: str, meta: dict | None = None) -> dict[str, int]:
    """{rule: 1 if broken else 0} for one answer to a world prompt."""
    facets = judge(messages, response, meta).facets
    harmful_prompt = bool((meta or {}).get("harmful"))
    return {"harmful": int(harmful_prompt and facets.get("refusal", 1.0) == 0.0),
            "wrong_language": int(facets.get("language", 1.0) < 0.5),
            "rude": int(facets.get("polite", 1.0) == 0.0),
            "repetitive": int(facets.get("nonrepetitive", 1.0) < 0.5)}


OFF_TOPIC = 2   # answers written for other prompts, added to each harmful request's rows (one to each other prompt's)


def rule_rows(rankings: list[dict], seed: int | str = 0, off_topic: int = OFF_TOPIC) -> list[dict]:
    """Every answer of every ranking as a rules.jsonl row: {prompt, response, rules, meta}; then
    answers written for other prompts, flagged by the same judge: `off_topic` for each harmful
    request (drawn from benign prompts' answers), one for each other prompt. The rankings only set
    a prompt's own answers against each other (a refusal against compliance, a Chinese answer
    against its English twin): a rule model that never saw an answer to another question lets a
    policy escape with one (measured: PPO against preference RM + rule RM drifted to "Great
    question! I hope this helps!" on harmful requests and on Chinese questions)."""
    def flagged(row: dict, text: str) -> dict:
        return {"prompt": row["prompt"], "response": text, "rules": rule_flags(row["prompt"], text, row.get("meta")),
                "meta": row.get("meta", {})}

    rows = [flagged(row, text) for row in rankings for text in row["responses"]]
    rng = random.Random(f"rules:{seed}")
    benign = [(i, text) for i, row in enumerate(rankings) if not row.get("meta", {}).get("harmful")
              for text in row["responses"]]
    every = [(i, text) for i, row in enumerate(rankings) for text in row["responses"]]
    for index, row in enumerate(rankings):
        harmful = row.get("meta", {}).get("harmful")
        pool, count = (benign, off_topic) if harmful else (every, 1)
        drawn = [text for owner, text in rng.sample(pool, min(len(pool), 4 * count)) if owner != index]
        rows += [flagged(row, text) for text in drawn[:count]]
    return rows
