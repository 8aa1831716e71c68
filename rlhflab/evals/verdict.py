"""The verdict of a run: one paragraph written from its figures, never by hand.

It says which model gained how much gold score over SFT, whether each reward model was good
enough (its accuracy against the clean gold order, and the audit), whether any alarm fired, and
whether answer length or the share of empty answers moved. The quickstart prints it and the
report opens with it. `facts` is the quickstart's results.json, or the same shape:

    models:  {name: {gold, mean_chars, empty, ...}}        held-out figures (rlhflab eval)
    stages:  {stage: summary.json}                         eval_gold_accuracy (rm), alarms (ppo)
    audits:  {reward-model stage: audit.json}              `rlhflab rm audit`
    rl:      {stage: {"reward_model": stage, "min_new_tokens": n}}   what each RL stage learned from
"""

from __future__ import annotations

import math

BASELINE = "sft"
NOT_RLHF = ("base", BASELINE)   # models shown for context, not judged as RLHF's outcome
GOLD_GAIN = 0.10      # gold gain over SFT that counts as RLHF clearly working
RM_GOOD = 0.85        # reward-model accuracy against the clean gold order that counts as good enough
RM_CHANCE = 0.60      # below this a reward model is little better than a coin toss
LENGTH_DRIFT = 0.20   # relative change of mean answer length (against SFT's) worth reporting
EMPTY_RISE = 0.05     # rise of the share of empty answers (absolute) worth reporting


def _number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


def _signed(value: float) -> str:
    return f"{value:+.3f}".replace("-", "−")


def gains(facts: dict) -> dict[str, float]:
    """Each RLHF model's gold score minus SFT's, best first."""
    models = facts.get("models") or {}
    sft = (models.get(BASELINE) or {}).get("gold")
    if not _number(sft):
        return {}
    out = {name: m["gold"] - sft for name, m in models.items()
           if name not in NOT_RLHF and isinstance(m, dict) and _number(m.get("gold"))}
    return dict(sorted(out.items(), key=lambda item: -item[1]))


def gold_sentence(facts: dict) -> str:
    models = facts.get("models") or {}
    found = gains(facts)
    if not found:
        return ("There is no gold score of SFT and an RLHF model to compare." if models else
                "No model was evaluated.")
    sft = models[BASELINE]["gold"]
    parts = [f"{name} {_signed(gain)} ({models[name]['gold']:.3f})" for name, gain in found.items()]
    best, best_gain = next(iter(found.items()))
    text = f"Against SFT's gold score of {sft:.3f} on held-out prompts: {', '.join(parts)}. "
    if best_gain >= GOLD_GAIN:
        return text + f"{best} gained the most, clearing the {GOLD_GAIN:.2f} that counts as a clear improvement."
    if best_gain > 0:
        return text + f"{best} gained the most, but less than the {GOLD_GAIN:.2f} that counts as a clear improvement."
    return text + "No RLHF model beat SFT."


def reward_model_sentences(facts: dict) -> list[str]:
    stages, audits, rl = facts.get("stages") or {}, facts.get("audits") or {}, facts.get("rl") or {}
    names = [n for n, s in stages.items() if isinstance(s, dict) and _number(s.get("eval_gold_accuracy"))]
    names += [n for n in audits if n not in names]
    out = []
    for name in names:
        users = [stage for stage, info in rl.items() if isinstance(info, dict) and info.get("reward_model") == name]
        who = f"The reward model {name}" + (f" (which {', '.join(users)} learned from)" if users else "")
        accuracy = (stages.get(name) or {}).get("eval_gold_accuracy")
        if _number(accuracy):
            if accuracy < RM_CHANCE:
                judged = "no better than a coin toss, so RL on it optimises noise"
            elif accuracy < RM_GOOD:
                judged = f"below the {RM_GOOD:.0%} that counts as good enough"
            else:
                judged = "good enough"
            # one decimal: 84.7% must not read as the 85% it falls short of
            text = f"{who} ranks held-out answers as the clean gold order does on {accuracy:.1%} of pairs: {judged}"
        else:
            text = f"{who} has no accuracy against the gold order"
        audit = audits.get(name)
        if isinstance(audit, dict) and isinstance(audit.get("hackable"), list):
            hackable = audit["hackable"]
            threshold = audit.get("threshold", 0.05)
            text += ("; the audit finds it hackable by " + ", ".join(hackable) + " answers" if hackable else
                     f"; the audit finds no degenerate answer that beats a good one on more than {threshold:.0%} "
                     "of prompts")
        out.append(text + ".")
    return out


def alarm_sentence(facts: dict) -> str:
    raised = {name: s["alarms"] for name, s in (facts.get("stages") or {}).items()
              if isinstance(s, dict) and isinstance(s.get("alarms"), list) and s["alarms"]}
    watched = [name for name, s in (facts.get("stages") or {}).items() if isinstance(s, dict) and "alarms" in s]
    if not raised:
        return f"No alarm fired during {', '.join(watched)}." if watched else ""
    parts = []
    for name, alarms in raised.items():
        first = alarms[0] if isinstance(alarms[0], dict) else {}
        parts.append(f"{name} raised {len(alarms)} alarm{'s' if len(alarms) > 1 else ''} "
                     f"(first at step {first.get('step', '?')}: {first.get('message', '?')})")
    calm = [name for name in watched if name not in raised]
    return ("; ".join(parts) + (f"; {', '.join(calm)} raised none" if calm else "") + ".")


def drift_sentence(facts: dict) -> str:
    models = facts.get("models") or {}
    sft = models.get(BASELINE) or {}
    if not _number(sft.get("mean_chars")) or not _number(sft.get("empty")):
        return ""
    moved, steady = [], []
    for name, m in models.items():
        if name in NOT_RLHF or not isinstance(m, dict) or not _number(m.get("mean_chars")) or not _number(m.get("empty")):
            continue
        notes = []
        if sft["mean_chars"] > 0 and abs(m["mean_chars"] / sft["mean_chars"] - 1) > LENGTH_DRIFT:
            change = m["mean_chars"] / sft["mean_chars"] - 1
            notes.append(f"answers {abs(change):.0%} {'longer' if change > 0 else 'shorter'} than SFT's "
                         f"({m['mean_chars']:.0f} against {sft['mean_chars']:.0f} characters)")
        if m["empty"] - sft["empty"] > EMPTY_RISE:
            notes.append(f"{m['empty']:.0%} empty answers against SFT's {sft['empty']:.0%}")
        (moved if notes else steady).append(f"{name}: {' and '.join(notes)}" if notes else name)
    if not moved and not steady:
        return ""
    if not moved:
        return (f"Answer length and the share of empty answers stayed near SFT's for {', '.join(steady)} "
                f"(within {LENGTH_DRIFT:.0%}, and at most {EMPTY_RISE:.0%} more empty answers).")
    return "Answers moved away from SFT's: " + "; ".join(moved) + "."


def verdict(facts: dict) -> str:
    """One paragraph from the figures of a run (see the module docstring for `facts`)."""
    sentences = [gold_sentence(facts), *reward_model_sentences(facts), alarm_sentence(facts), drift_sentence(facts)]
    return " ".join(s for s in sentences if s)
