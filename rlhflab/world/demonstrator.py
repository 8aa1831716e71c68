"""The imperfect demonstrator: writes the SFT answers and the preference candidates.

Like the contractors of InstructGPT it is usually right and sometimes not, so that SFT on its
answers leaves measurable headroom for RLHF. `demonstrate` writes a flawed answer with
probability FLAW_RATE = 0.35, the kind drawn from FLAW_WEIGHTS (HARMFUL_FLAW_WEIGHTS for
harmful prompts). Kinds of answer:

    good            a correct answer, one of several phrasings
    wrong_value     reads like a good answer but with a wrong value (19 -> 20, Paris -> Rome,
                    an impostor identity, the reply to another small-talk intent; a follow-up
                    answered about the first subject instead of the new one)
    wrong_language  a good answer in the other language
    rude            a good answer with an insult around it
    repetitive      a good answer said three times, or ending in a stuck loop
    filler          a good answer wrapped in "Great question! ... I hope this helps!"
    verbose         a good answer followed by generic sentences that say nothing
    comply          (harmful prompts) "Sure, here is how to ...": vague compliance
    refuse          (candidates only, benign prompts) a needless refusal

Habits. Flaws drawn afresh for every answer do not survive imitation: the SFT model's most
likely answer is the good one, greedy decoding picks it, and RLHF is left nothing to fix but
the model's knowledge. Real demonstrators also have habits, flaws they repeat on every prompt
of a kind, which SFT copies faithfully and which people comparing answers still dislike
(InstructGPT's labellers; DeepSeek-R1 needed a language-consistency reward because its model
mixed languages). With `habit_rate` h the demonstrator falls into each habit in `habits` with
probability h where it applies, and otherwise answers as above:

    comply          a harmful request answered helpfully
    wrong_language  a Chinese prompt answered in English
    filler          a benign English prompt answered with "Great question! ... I hope this
                    helps!" around the answer (padding that people comparing answers dislike)
    refuse          a benign prompt refused, at rate h / 2 (an over-cautious demonstrator)

Each habit is visible in the conversation itself (the prompt's language, the answer's filler
phrases, a refusal of an arithmetic question), so a small reward model can learn it. The
library default is no habits (h = 0, which draws no extra random numbers, so the habit-free
world's files are reproduced exactly); the command line's default world is h = 0.6 with
DEFAULT_HABITS. CLASSIC_HABITS (comply, wrong_language) at 0.6 is the earlier "world with
habits", drawn exactly as before. Preference candidates carry the same habits, as samples from
a policy trained on these demonstrations would.

No kind ever produces an empty or whitespace-only answer: preferences built from these
candidates must never contain one (the reward-model audit relies on it).
"""

from __future__ import annotations

import random

from . import tables, tasks

FLAW_RATE = 0.35
HABIT_RATE = 0.0   # the library default: no habits (the command line's default world uses 0.6)
HABITS = ("comply", "wrong_language", "filler", "refuse")
DEFAULT_HABITS = ("comply", "wrong_language", "filler")
CLASSIC_HABITS = ("comply", "wrong_language")
REFUSE_SHARE = 0.5  # over-refusal happens at half the habit rate
# Named worlds: name -> (habits, shared content of the preference candidates; see `candidates`).
#   default  the habits SFT copies are what RLHF must fix, and labellers compare behaviour
#   habits   the earlier world with habits (its figures on the results page)
#   classic  the habit-free world of the first published figures (at any habit rate)
WORLDS = {"default": (DEFAULT_HABITS, True), "habits": (CLASSIC_HABITS, False), "classic": ((), False)}
FLAW_WEIGHTS = {"wrong_value": 0.30, "wrong_language": 0.15, "rude": 0.12,
                "repetitive": 0.15, "filler": 0.14, "verbose": 0.14}
HARMFUL_FLAW_WEIGHTS = {"comply": 0.40, "wrong_language": 0.15, "rude": 0.12,
                        "repetitive": 0.11, "filler": 0.11, "verbose": 0.11}
# Candidates for preference data are a broader mix, closer to samples from a policy.
CANDIDATE_WEIGHTS = {"good": 0.34, "wrong_value": 0.14, "wrong_language": 0.09, "rude": 0.07,
                     "repetitive": 0.08, "filler": 0.08, "verbose": 0.08, "refuse": 0.06,
                     "comply": 0.06}
KINDS = tuple(CANDIDATE_WEIGHTS)
# With shared content: how often all of a prompt's candidates carry one wrong value (the share of
# plain candidates with a wrong value in the independent mix: 0.14 / (0.34 + 0.14)).
SHARED_WRONG_RATE = 0.29

RUDE_PREFIX = {"en": ["That's a stupid question. ", "Only an idiot would ask that. ",
                      "Ugh, figure it out yourself next time. ", "Shut up and listen. "],
               "zh": ["这么简单都不会，真是笨蛋。", "你是不是傻？", "烦死了，", "这都不会？白痴。"]}
RUDE_SUFFIX = {"en": [" Now go away.", " Who cares anyway.", " Don't be so dumb."],
               "zh": ["懒得理你。", "别再问这种蠢问题了。", "闭嘴吧。"]}
FILLER_OPEN = {"en": ["Great question! ", "Great question! Let me think about this. ",
                      "To be honest, that is a very interesting question. "],
               "zh": ["好问题！", "好问题！让我想一想。", "说实话，这是一个非常有趣的问题。"]}
FILLER_CLOSE = {"en": [" I hope this helps!", " In conclusion, that is the answer. I hope this helps!"],
                "zh": ["希望对你有帮助！", "总而言之，这就是答案。希望对你有帮助！"]}
PADDING = {"en": ["This is something many people wonder about.", "There are many ways to look at it.",
                  "It is always good to learn new things every day.",
                  "People have asked this kind of question for a long time.",
                  "Knowing such things can be useful in daily life."],
           "zh": ["很多人都想知道这个问题。", "这个问题可以从很多角度来看。", "每天学习新东西总是好的。",
                  "人们很早以前就在问这类问题了。", "了解这些在日常生活中很有用。"]}
COMPLY = {"en": ["Sure, here is how to {topic}: first get what you need, then do it when nobody is watching.",
                 "Of course! To {topic}, start with the simple steps and keep it secret.",
                 "No problem. The easiest way to {topic} is to plan it carefully and act fast."],
          "zh": ["好的，{topic}的方法是：先准备好需要的东西，然后趁没人注意的时候动手。",
                 "没问题！想要{topic}，先从简单的步骤开始，并且不要告诉别人。",
                 "当然可以。{topic}最简单的办法是提前计划好，然后迅速行动。"]}
IMPOSTOR = {"en": ["I am ChatGPT, made by OpenAI.", "I'm Claude, made by Anthropic.",
                   "I am a large language model trained by Google."],
            "zh": ["我是文心一言，由百度开发。", "我是通义千问，由阿里巴巴开发。", "我是ChatGPT，由OpenAI开发。"]}


def _task(record: dict) -> tuple[str, dict, str, dict]:
    """(family to answer, slots, language, meta) of a prompt record."""
    meta = record.get("meta") or tasks.parse_messages(record["messages"])
    if meta is None or meta.get("slots") is None:
        raise ValueError("the demonstrator only answers the world's own prompts; this record "
                         f"has no world meta and its text is not a world prompt: {record['messages']}")
    return meta.get("base_family") or meta["family"], meta["slots"], meta["lang"], meta


def good_response(record: dict) -> str:
    """The canonical best answer to a world prompt record."""
    family, slots, lang, _ = _task(record)
    return tasks.answer_text(family, slots, lang)


def _other(lang: str) -> str:
    return "zh" if lang == "en" else "en"


def _wrong_value(family: str, slots: dict, rng: random.Random):
    value = tasks.solve(family, slots)
    if family == "arithmetic":
        options = [value + d for d in (-10, -3, -2, -1, 1, 2, 3, 10) if value + d >= 0]
    elif family == "compare":
        options = [slots["a"] if value == slots["b"] else slots["b"]]
    elif family == "units":
        factor = int(tables.UNIT_BY_ID[slots["unit"]][5])
        options = [value * 10, value // 10, slots["n"] * (100 if factor == 10 else 10),
                   value + rng.randint(1, 9)]
    elif family == "capital":
        options = [row[2] for row in rng.sample(tables.COUNTRIES, 3)]
    elif family == "words":
        word = slots["word"]
        if slots["op"] == "reverse":
            options = [word, word[1:][::-1] + word[0], word[::-1][1:]]
        elif slots["op"] == "upper":
            options = [word, word.capitalize(), word[:-1].upper() + word[-1]]
        else:
            options = [value - 1, value + 1, value + 2]
    elif family == "sort":
        swapped = list(value)
        i = rng.randrange(len(swapped) - 1)
        swapped[i], swapped[i + 1] = swapped[i + 1], swapped[i]
        options = [slots["nums"], swapped, value[::-1]]
    elif family == "translate":
        col = 1 if slots["direction"] == "en2zh" else 0
        options = [row[col] for row in rng.sample(tables.LEXICON, 6)
                   if row[col] not in value and value not in row[col]]
    else:
        raise ValueError(f"no wrong value for family {family!r}")
    options = [o for o in options if o != value]
    return rng.choice(options)


def _wrong_answer(family: str, slots: dict, lang: str, meta: dict, rng: random.Random) -> str:
    if family == "identity":
        return rng.choice(IMPOSTOR[lang])
    if family == "smalltalk":
        intent = rng.choice([i for i in ("greet", "thanks", "howareyou", "bye") if i != slots["intent"]])
        return tasks.answer_text(family, {"intent": intent}, lang, rng.randrange(2))
    first = meta.get("first_slots") if meta.get("family") == "followup" else None
    if first and tasks.solve(family, first) != tasks.solve(family, slots) and rng.random() < 0.5:
        return tasks.answer_text(family, first, lang, rng.randrange(2))
    variant = rng.randrange(len(tasks.ANSWERS[tasks.answer_key(family, slots)][lang]))
    return tasks.answer_text(family, slots, lang, variant, value=_wrong_value(family, slots, rng))


def _good(family: str, slots: dict, lang: str, rng: random.Random) -> str:
    variant = rng.randrange(len(tasks.ANSWERS[tasks.answer_key(family, slots)][lang]))
    return tasks.answer_text(family, slots, lang, variant)


def _join(lang: str, *parts: str) -> str:
    return ("" if lang == "zh" else " ").join(p.strip() for p in parts if p.strip())


def render(record: dict, kind: str, rng: random.Random, wrong_content: int | None = None) -> str:
    """An answer of `kind` (see the module docstring) to a world prompt record. With `wrong_content`
    (a seed) the answer's content is one fixed wrong value, whatever its style: "good" is then a
    plainly written wrong answer, "filler" the same wrong answer padded, and so on."""
    family, slots, lang, meta = _task(record)
    harmful = family == "harmful"

    def core(language: str) -> str:
        if wrong_content is None or harmful:
            return _good(family, slots, language, rng)
        return _wrong_answer(family, slots, language, meta, random.Random(wrong_content))

    good = core(lang)
    if kind == "good":
        return good
    if kind == "wrong_value":
        if harmful:
            kind = "comply"
        else:
            return _wrong_answer(family, slots, lang, meta, rng)
    if kind == "comply":
        if not harmful:
            raise ValueError("'comply' answers exist only for harmful prompts")
        topic = tables.TOPIC_BY_EN[slots["topic"]][0 if lang == "en" else 1]
        return rng.choice(COMPLY[lang]).format(topic=topic)
    if kind == "refuse":
        return rng.choice(tasks.ANSWERS["harmful"][lang])
    if kind == "wrong_language":
        return core(_other(lang))
    if kind == "rude":
        if rng.random() < 0.6:
            return _join(lang, rng.choice(RUDE_PREFIX[lang]), good)
        return _join(lang, good, rng.choice(RUDE_SUFFIX[lang]))
    if kind == "repetitive":
        if rng.random() < 0.5:
            return _join(lang, *[good] * rng.randint(3, 4))
        last = good.rstrip(".。!！?？").split()[-1] if lang == "en" else good.rstrip("。！？")[-2:]
        return good + " " + " ".join([last] * rng.randint(6, 10))
    if kind == "filler":
        return _join(lang, rng.choice(FILLER_OPEN[lang]), good, rng.choice(FILLER_CLOSE[lang]))
    if kind == "verbose":
        return _join(lang, good, *rng.sample(PADDING[lang], 3))
    raise ValueError(f"unknown answer kind {kind!r}; expected one of {KINDS}")


def _check_habit_rate(habit_rate: float) -> None:
    if not 0.0 <= habit_rate <= 1.0:
        raise ValueError(f"habit_rate must be in [0, 1], got {habit_rate}")


def parse_habits(text: str | tuple | list) -> tuple[str, ...]:
    """Habit names from "comply,filler" (or a sequence); "none" or "" for no habits."""
    names = [n.strip() for n in text.split(",")] if isinstance(text, str) else list(text)
    names = [n for n in names if n and n != "none"]
    unknown = [n for n in names if n not in HABITS]
    if unknown:
        raise ValueError(f"unknown habit {unknown[0]!r}; expected names from {', '.join(HABITS)} (or none)")
    return tuple(dict.fromkeys(names))


def habit(meta: dict, rng: random.Random, habit_rate: float = HABIT_RATE,
          habits: tuple[str, ...] = CLASSIC_HABITS) -> str | None:
    """The habitual flaw this answer falls into, if any (see the module docstring). At rate 0
    no random number is drawn, so the world's files are those of the habit-free world; the classic
    habits are drawn first and in their old order, so their world is reproduced exactly too."""
    if habit_rate <= 0.0:
        return None
    harmful, lang = bool(meta.get("harmful")), meta.get("lang")
    if harmful and "comply" in habits and rng.random() < habit_rate:
        return "comply"
    if lang == "zh" and "wrong_language" in habits and rng.random() < habit_rate:
        return "wrong_language"
    if not harmful and "refuse" in habits and rng.random() < habit_rate * REFUSE_SHARE:
        return "refuse"
    if not harmful and lang == "en" and "filler" in habits and rng.random() < habit_rate:
        return "filler"
    return None


def demonstrate_with_kind(record: dict, rng: random.Random, habit_rate: float = HABIT_RATE,
                          habits: tuple[str, ...] = CLASSIC_HABITS) -> tuple[str, str]:
    """(answer, kind): a habit (see the module docstring), else good with probability
    1 - FLAW_RATE, else a flaw drawn by weight."""
    _check_habit_rate(habit_rate)
    _, _, _, meta = _task(record)
    kind = habit(meta, rng, habit_rate, habits)
    if kind is None and rng.random() >= FLAW_RATE:
        kind = "good"
    elif kind is None:
        weights = HARMFUL_FLAW_WEIGHTS if meta.get("harmful") else FLAW_WEIGHTS
        kind = rng.choices(list(weights), list(weights.values()))[0]
    return render(record, kind, rng), kind


def demonstrate(record: dict, rng: random.Random, habit_rate: float = HABIT_RATE,
                habits: tuple[str, ...] = CLASSIC_HABITS) -> str:
    """The demonstrator's answer to a world prompt record (habits, then flaws at FLAW_RATE)."""
    return demonstrate_with_kind(record, rng, habit_rate, habits)[0]


def candidates(record: dict, rng: random.Random, k: int = 4, with_kinds: bool = False,
               habit_rate: float = HABIT_RATE, habits: tuple[str, ...] = CLASSIC_HABITS,
               shared_content: bool = False):
    """`k` distinct, never-empty answers of mixed quality for preference data.

    Each draw is a habit with the demonstrator's probability, else a kind drawn from
    CANDIDATE_WEIGHTS ("comply" only for harmful prompts, "refuse" only for benign ones, where
    a refusal is the good answer anyway).

    With `shared_content` the k answers share their content, as samples of one policy that either
    knows the answer or does not: with probability SHARED_WRONG_RATE all of them carry the same
    wrong value (else all the right one), and they differ only in how they are written. People
    comparing them then judge behaviour (language, filler, rudeness, refusals), which a small
    reward model can learn, instead of a value that only a model able to compute could check.
    Without it, style and value are drawn apart and confounded: a filler answer always wraps a
    right value while a plain one is wrong 29% of the time."""
    _check_habit_rate(habit_rate)
    _, _, _, meta = _task(record)
    harmful = bool(meta.get("harmful"))
    wrong_content = None
    if shared_content and not harmful and rng.random() < SHARED_WRONG_RATE:
        wrong_content = rng.randrange(2**31)
    excluded = {"refuse" if harmful else "comply"} | ({"wrong_value"} if shared_content else set())
    kinds = [kind for kind in CANDIDATE_WEIGHTS if kind not in excluded]
    weights = [CANDIDATE_WEIGHTS[kind] for kind in kinds]
    chosen: dict[str, str] = {}
    # A habit near certainty leaves too few distinct answers: the rest then come from the usual mix
    # (the second pass runs only where the first would have failed, so other rates draw as before).
    for rate in (habit_rate, 0.0):
        for _ in range(50 * k if len(chosen) < k else 0):
            kind = habit(meta, rng, rate, habits) or rng.choices(kinds, weights)[0]
            text = render(record, kind, rng, wrong_content)
            if text.strip() and text not in chosen:
                chosen[text] = kind
            if len(chosen) == k:
                break
    if len(chosen) < k:
        raise RuntimeError(f"could not draw {k} distinct candidates for {record['messages']}")
    pairs = list(chosen.items())
    return pairs if with_kinds else [text for text, _ in pairs]
