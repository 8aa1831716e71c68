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


def rule_rows(rankings: list[dict]) -> list[dict]:
    """Every answer of every ranking as a rules.jsonl row: {prompt, response, rules, meta}."""
    return [{"prompt": row["prompt"], "response": text, "rules": rule_flags(row["prompt"], text, row.get("meta")),
             "meta": row.get("meta", {})}
            for row in rankings for text in row["responses"]]
