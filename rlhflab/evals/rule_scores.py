"""`rlhflab rm score` with a rule reward model: each answer's probability of breaking each rule."""

from __future__ import annotations

from rlhflab.data.formats import iter_raw_rows, load_records
from rlhflab.models.loading import choose_placement
from rlhflab.rewards.rules import load_rule_model, read_rule_rows, rule_probabilities
from rlhflab.runs import atomic_write_jsonl


def _items(path: str) -> list[tuple[list[dict], str, dict]]:
    """(prompt, response, known flags) from rules.jsonl rows, or from pairs, rankings or
    conversations (no flags)."""
    first = next((row for _, row in iter_raw_rows(path)), None)
    if isinstance(first, dict) and "rules" in first and "response" in first:
        return read_rule_rows(path)[0]
    records, _ = load_records(path, "preference" if isinstance(first, dict) and
                              ("responses" in first or "chosen" in first) else "sft")
    if records and records[0].responses:
        return [(r.messages, text, {}) for r in records for text in r.responses]
    return [(r.messages[:-1], r.messages[-1]["content"], {}) for r in records]


def score_command(config) -> int:
    """Per-answer rule probabilities (to --out), and per rule: the mean probability, the share over
    0.5, and precision / recall where the file flags the rule."""
    items = _items(config.data)
    model, tokenizer = load_rule_model(config.model, choose_placement(config.device, config.dtype),
                                       config.trust_remote_code, option="--model")
    probs = rule_probabilities(model, tokenizer, [m + [{"role": "assistant", "content": a}] for m, a, _ in items])
    if config.out:
        atomic_write_jsonl(config.out, [{"prompt": m, "response": a, "rules": {k: round(v, 4) for k, v in p.items()},
                                         **({"flags": f} if f else {})} for (m, a, f), p in zip(items, probs)])
    print(f"scored {len(items)} responses with {len(model.rules)} rule heads")
    for rule in model.rules:
        values = [p[rule] for p in probs]
        line = f"  {rule:<16} mean p {sum(values) / len(values):.3f}, flagged {sum(v > 0.5 for v in values)}"
        known = [(p[rule] > 0.5, f[rule]) for p, (_, _, f) in zip(probs, items) if f.get(rule) is not None]
        if known:
            tp = sum(pred and truth for pred, truth in known)
            predicted, positives = sum(pred for pred, _ in known), sum(truth for _, truth in known)
            line += (f"; vs flags: precision {tp / predicted:.3f}" if predicted else "; vs flags: precision -") + \
                (f", recall {tp / positives:.3f}" if positives else ", recall -") + f" ({positives} flagged of {len(known)})"
        print(line)
    return 0
