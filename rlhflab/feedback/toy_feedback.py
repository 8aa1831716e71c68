"""Feedback demonstrations for the toy world: what makes its 1M-parameter model a critic and labeller.

A large model brings to Constitutional AI an understanding of what "harmful" or "in the user's
language" means; the toy world's tiny model has none. `rlhflab world export --constitution toy`
therefore also writes `feedback.jsonl`: conversations, in exactly the wording `critique` and
`rank --by model:` use (feedback/constitution.py), that show ONE principle at a time on training
prompts, with answers written by the world's demonstrator:

- comparisons of two answers (in a random order) on the principle, answered "(A)" or "(B)": 40%
  compare one that follows it with one that breaks it (the *contrast*); 20% one that breaks
  ANOTHER principle with one that breaks this one (the *crossed* lesson: the first still wins, so
  the principle is judged on its own point, not on what else is wrong); and 40% two answers the
  principle does not tell apart (the *neutral* lesson), answered "(A)" as the question asks for
  answers that follow it equally. Asked in both orders, such a pair then gets "(A)" twice, which
  the labeller reads as a tie: a principle that does not apply abstains instead of picking a side;
- critiques of one answer (breaking the principle or not) and its revision (the good answer, or
  the answer unchanged when nothing was wrong).

Fine-tuning the SFT model on the critiques gives the toy world's feedback model (the critic of
`critique`), and fine-tuning that on the comparisons gives its labeller (bench/rlaif.sh).
It never sees a preference label, an annotator or a gold score; the world's judge only checks
which principle a crossed or neutral lesson's answers break. Whether it can weigh principles
against each other on the policy's own answers is what the measurements in docs/rlaif.md test.
"""

from __future__ import annotations

import random

from rlhflab.feedback.constitution import CHOICES, Constitution, comparison_messages, revision_messages
from rlhflab.world import demonstrator, judge, tasks

# Which demonstrator answer kinds break each principle of the toy constitution (harmless: on a
# harmful prompt, complying; on a benign one, refusing).
BREAKS = {"harmless": ("comply",), "language": ("wrong_language",), "polite": ("rude",),
          "concise": ("filler", "verbose", "repetitive"), "truthful": ("wrong_value",)}
OVER_REFUSAL = ("refuse",)
# The gold judge's facets that say whether an answer follows each principle.
FACETS = {"harmless": ("refusal",), "language": ("language",), "polite": ("polite",),
          "concise": ("concise", "nonrepetitive"), "truthful": ("correct",)}
LESSONS = {"contrast": 0.4, "crossed": 0.2, "neutral": 0.4}   # shares of the comparison lessons
COMPARISONS_PER_DEMONSTRATION = 8   # world export's default number of comparisons, per SFT demonstration
# How often each principle is drawn, relative to the others (1 when absent). The tiny model learns
# the language comparison last: after 1,500 steps of evenly drawn lessons it still judged Chinese
# questions at chance (0.45 on fresh lessons, against 0.92-1.0 for the other principles).
WEIGHT = {"language": 3.0}
CRITIQUE = {
    "harmless": {"en": "The answer helps with a harmful request. It should politely refuse.",
                 "zh": "这个回答协助了有害的请求，应该礼貌地拒绝。"},
    "harmless_benign": {"en": "The request is not harmful, yet the answer refuses it.",
                        "zh": "这个请求并无害处，回答却拒绝了。"},
    "language": {"en": "The answer is not in the language of the question.",
                 "zh": "这个回答没有使用提问的语言。"},
    "polite": {"en": "The answer insults the user.", "zh": "这个回答侮辱了用户。"},
    "concise": {"en": "The answer has filler or repeats itself.", "zh": "这个回答有废话或重复。"},
    "truthful": {"en": "The answer is wrong.", "zh": "这个回答是错的。"},
}
FINE = {"en": "Nothing is wrong with the answer on this point.", "zh": "这个回答在这一点上没有问题。"}


def feedback_rows(constitution: Constitution, critiques: int, comparisons: int = 0,
                  seed: int | str = 0) -> list[dict]:
    """Feedback demonstrations (messages rows, meta.feedback = comparison | critique,
    meta.lesson = contrast | crossed | neutral on comparisons): `comparisons` comparisons, then
    `critiques` critiques, each on its own training prompt. The two kinds draw from their own
    random streams, so either count can change without changing the other kind's rows.
    Principles without a toy-world meaning (not in BREAKS) are skipped."""
    principles = [p for p in constitution.principles if p.name in BREAKS]
    if not principles:
        raise ValueError(f"the constitution {constitution.path} has none of the toy world's principles "
                         f"({', '.join(BREAKS)})")
    rows = []
    for kind, n in (("comparison", comparisons), ("critique", critiques)):
        rng = random.Random(f"feedback:{seed}:{kind}")
        for record in tasks.make_prompts("train", n, seed=f"{seed}:feedback:{kind}"):
            rows.append(_lesson(record, kind, principles, rng))
    return rows


def _lesson(record: dict, kind: str, principles: list, rng: random.Random) -> dict:
    harmful = bool(record["meta"].get("harmful"))
    usable = [p for p in principles if p.name != "truthful" or not harmful]
    lang, prompt = record["meta"]["lang"], record["messages"]
    principle = rng.choices(usable, weights=[WEIGHT.get(p.name, 1.0) for p in usable])[0]
    good = demonstrator.render(record, "good", rng)
    bad = demonstrator.render(record, rng.choice(_breaks(principle.name, harmful)), rng)
    meta = {"feedback": kind, "principle": principle.name, "lang": lang}
    if kind == "comparison":
        lesson = rng.choices(list(LESSONS), weights=list(LESSONS.values()))[0]
        first, second, reply, meta["lesson"] = _comparison(record, principle, usable, good, bad, lesson, rng)
        messages = comparison_messages(prompt, first, second, principle) + [{"role": "assistant", "content": reply}]
    else:
        broken = rng.random() < 0.7
        key = "harmless_benign" if principle.name == "harmless" and not harmful else principle.name
        critique = CRITIQUE[key][lang] if broken else FINE[lang]
        messages = revision_messages(prompt, bad if broken else good, critique, principle) + [
            {"role": "assistant", "content": good}]
    return {"messages": messages, "meta": meta}


def _breaks(name: str, harmful: bool) -> tuple[str, ...]:
    return OVER_REFUSAL if name == "harmless" and not harmful else BREAKS[name]


def _follows(record: dict, answer: str, name: str) -> float:
    """How far `answer` follows the principle `name`, by the judge's facets for it."""
    facets = judge(record["messages"], answer, record["meta"]).facets
    return sum(facets.get(f, 1.0) for f in FACETS[name])


def _comparison(record, principle, usable, good: str, bad: str, lesson: str, rng):
    """(first, second, reply, lesson) of a comparison lesson; a crossed or neutral lesson whose
    answers the judge does not confirm (another principle's flaw that also breaks this one)
    falls back to a contrast."""
    harmful = bool(record["meta"].get("harmful"))
    if lesson != "contrast":
        other = rng.choice([p for p in usable if p is not principle])
        flawed = demonstrator.render(record, rng.choice(_breaks(other.name, harmful)), rng)
        follows = _follows(record, flawed, principle.name)
        if lesson == "crossed" and follows > _follows(record, bad, principle.name):
            good = flawed    # it breaks `other`, yet follows the principle asked about better than `bad`
        elif lesson == "neutral" and follows == _follows(record, good, principle.name) and flawed != good:
            first_is_good = rng.random() < 0.5
            first, second = (good, flawed) if first_is_good else (flawed, good)
            return first, second, CHOICES[0], lesson   # equal on this point: (A), as the question asks
        else:
            lesson = "contrast"
    good_first = rng.random() < 0.5
    first, second = (good, bad) if good_first else (bad, good)
    return first, second, CHOICES[0] if good_first else CHOICES[1], lesson
