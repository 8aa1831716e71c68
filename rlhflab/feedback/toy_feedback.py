"""Feedback demonstrations for the toy world: what makes its 1M-parameter model a critic and labeller.

A large model brings to Constitutional AI an understanding of what "harmful" or "in the user's
language" means; the toy world's tiny model has none. `rlhflab world export --constitution toy`
therefore also writes `feedback.jsonl`: conversations, in exactly the wording `critique` and
`rank --by model:` use (feedback/constitution.py), that show ONE principle at a time on training
prompts, with answers written by the world's demonstrator:

- a comparison of an answer that follows the principle and one that breaks it (in a random
  order), answered "(A)" or "(B)";
- a critique of one answer (breaking the principle or not) and its revision (the good answer, or
  the answer unchanged when nothing was wrong).

Fine-tuning the SFT model on these (next to its SFT data) gives the toy world's feedback model.
It never sees a preference label, an annotator or a gold score, and never compares two answers
that differ in more than the one principle asked about; whether it can weigh principles against
each other on the policy's own answers is what the measurements in docs/rlaif.md test.
"""

from __future__ import annotations

import random

from rlhflab.feedback.constitution import CHOICES, Constitution, comparison_messages, revision_messages
from rlhflab.world import demonstrator, tasks

# Which demonstrator answer kinds break each principle of the toy constitution.
BREAKS = {"harmless": ("comply",), "language": ("wrong_language",), "polite": ("rude",),
          "concise": ("filler", "verbose", "repetitive"), "truthful": ("wrong_value",)}
CRITIQUE = {
    "harmless": {"en": "The answer helps with a harmful request. It should politely refuse.",
                 "zh": "这个回答协助了有害的请求，应该礼貌地拒绝。"},
    "language": {"en": "The answer is not in the language of the question.",
                 "zh": "这个回答没有使用提问的语言。"},
    "polite": {"en": "The answer insults the user.", "zh": "这个回答侮辱了用户。"},
    "concise": {"en": "The answer has filler or repeats itself.", "zh": "这个回答有废话或重复。"},
    "truthful": {"en": "The answer is wrong.", "zh": "这个回答是错的。"},
}
FINE = {"en": "Nothing is wrong with the answer on this point.", "zh": "这个回答在这一点上没有问题。"}


def feedback_rows(constitution: Constitution, n: int, seed: int | str = 0) -> list[dict]:
    """`n` feedback demonstrations (messages rows, meta.feedback = comparison | critique) on training
    prompts, half of each kind. Principles without a toy-world meaning (not in BREAKS) are skipped."""
    principles = [p for p in constitution.principles if p.name in BREAKS]
    if not principles:
        raise ValueError(f"the constitution {constitution.path} has none of the toy world's principles "
                         f"({', '.join(BREAKS)})")
    rng = random.Random(f"feedback:{seed}")
    rows = []
    for index, record in enumerate(tasks.make_prompts("train", n, seed=f"{seed}:feedback")):
        harmful = bool(record["meta"].get("harmful"))
        usable = [p for p in principles if (p.name == "harmless") == harmful or p.name in ("language", "polite")]
        principle = rng.choice(usable)
        lang = record["meta"]["lang"]
        good = demonstrator.render(record, "good", rng)
        bad = demonstrator.render(record, rng.choice(BREAKS[principle.name]), rng)
        prompt = record["messages"]
        if index % 2 == 0:
            good_first = rng.random() < 0.5
            first, second = (good, bad) if good_first else (bad, good)
            messages = comparison_messages(prompt, first, second, principle) + [
                {"role": "assistant", "content": CHOICES[0] if good_first else CHOICES[1]}]
            kind = "comparison"
        else:
            broken = rng.random() < 0.7
            answer = bad if broken else good
            critique = CRITIQUE[principle.name][lang] if broken else FINE[lang]
            messages = revision_messages(prompt, answer, critique, principle) + [
                {"role": "assistant", "content": good}]
            kind = "critique"
        rows.append({"messages": messages, "meta": {"feedback": kind, "principle": principle.name, "lang": lang}})
    return rows
