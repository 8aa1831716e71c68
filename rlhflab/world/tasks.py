"""Task families of the toy world: prompt templates, sampling, the train/eval split, the
canonical answers, and parsing a world prompt back from its text.

A task is (family, slots, lang). `slots` are canonical and language-free (country by its
English name, words by their English form, numbers as ints), so one task can be rendered in
either language and the judge can recover it from the prompt text alone: every prompt
template doubles as a regular expression (see `parse_messages`).

The split is by entity, not by row: each country, lexicon word, harmful topic and phrasing is
assigned to train or eval by a hash of its name, and every operand tuple (arithmetic pair,
comparison pair, unit amount, list to sort) by a hash of the tuple. Held-out prompts therefore
never share an entity or an operand tuple with training prompts.
"""

from __future__ import annotations

import hashlib
import random
import re
import string

from . import tables

FAMILIES = ("arithmetic", "compare", "units", "capital", "words", "sort", "translate",
            "identity", "smalltalk", "harmful", "followup")

# Share of each family in make_prompts.
FAMILY_WEIGHTS = {"arithmetic": 0.12, "compare": 0.08, "units": 0.08, "capital": 0.12,
                  "words": 0.10, "sort": 0.07, "translate": 0.12, "identity": 0.05,
                  "smalltalk": 0.06, "harmful": 0.10, "followup": 0.10}

EVAL_FRACTION = 0.2
FOLLOWUP_BASES = ("capital", "translate", "words")
LANG_NAME = {"en": {"en": "English", "zh": "Chinese"}, "zh": {"en": "英文", "zh": "中文"}}
OP_WORD = {"en": {"+": "plus", "-": "minus", "*": "times"}, "zh": {"+": "加", "-": "减", "*": "乘以"}}

# family -> lang -> [(template, fixed slots)]. Fields in braces are filled by `display`.
PROMPTS = {
    "arithmetic": {
        "en": [("What is {a} plus {b}?", {"op": "+"}), ("Calculate {a} + {b}.", {"op": "+"}),
               ("Add {a} and {b}.", {"op": "+"}), ("What is {a} minus {b}?", {"op": "-"}),
               ("Calculate {a} - {b}.", {"op": "-"}), ("Subtract {b} from {a}.", {"op": "-"}),
               ("What is {a} times {b}?", {"op": "*"}), ("Multiply {a} by {b}.", {"op": "*"})],
        "zh": [("{a}加{b}等于多少？", {"op": "+"}), ("计算{a}+{b}。", {"op": "+"}),
               ("{a}加上{b}是几？", {"op": "+"}), ("{a}减{b}等于多少？", {"op": "-"}),
               ("计算{a}-{b}。", {"op": "-"}), ("{a}减去{b}是几？", {"op": "-"}),
               ("{a}乘以{b}等于多少？", {"op": "*"}), ("计算{a}乘{b}。", {"op": "*"})],
    },
    "compare": {
        "en": [("Which is larger, {a} or {b}?", {"which": "larger"}),
               ("Which number is bigger: {a} or {b}?", {"which": "larger"}),
               ("Which is smaller, {a} or {b}?", {"which": "smaller"}),
               ("Which number is less: {a} or {b}?", {"which": "smaller"})],
        "zh": [("{a}和{b}哪个大？", {"which": "larger"}), ("{a}和{b}哪个数更大？", {"which": "larger"}),
               ("{a}和{b}哪个小？", {"which": "smaller"}), ("{a}和{b}哪个数更小？", {"which": "smaller"})],
    },
    "units": {
        "en": [("How many {dst} are in {n} {src}?", {}), ("Convert {n} {src} to {dst}.", {}),
               ("{n} {src} is how many {dst}?", {})],
        "zh": [("{n}{src}等于多少{dst}？", {}), ("{n}{src}是多少{dst}？", {}), ("把{n}{src}换算成{dst}。", {})],
    },
    "capital": {
        "en": [("What is the capital of {country}?", {}), ("Which city is the capital of {country}?", {}),
               ("Name the capital of {country}.", {}), ("Tell me the capital of {country}.", {})],
        "zh": [("{country}的首都是哪里？", {}), ("{country}的首都是哪个城市？", {}),
               ("请问{country}的首都是什么？", {}), ("告诉我{country}的首都。", {})],
    },
    "words": {
        "en": [('Reverse the word "{word}".', {"op": "reverse"}),
               ('Spell "{word}" backwards.', {"op": "reverse"}),
               ('Write "{word}" in capital letters.', {"op": "upper"}),
               ('Convert "{word}" to upper case.', {"op": "upper"}),
               ('How many letters are in the word "{word}"?', {"op": "length"}),
               ('Count the letters in "{word}".', {"op": "length"})],
        "zh": [("把单词“{word}”倒过来写。", {"op": "reverse"}), ("“{word}”倒着拼是什么？", {"op": "reverse"}),
               ("把“{word}”改成大写字母。", {"op": "upper"}), ("“{word}”的大写形式是什么？", {"op": "upper"}),
               ("单词“{word}”有几个字母？", {"op": "length"}), ("数一数“{word}”有多少个字母。", {"op": "length"})],
    },
    "sort": {
        "en": [("Sort these numbers from smallest to largest: {nums}.", {"order": "asc"}),
               ("Put {nums} in ascending order.", {"order": "asc"}),
               ("Sort these numbers from largest to smallest: {nums}.", {"order": "desc"}),
               ("Put {nums} in descending order.", {"order": "desc"})],
        "zh": [("把这些数从小到大排序：{nums}。", {"order": "asc"}), ("将{nums}按从小到大排列。", {"order": "asc"}),
               ("把这些数从大到小排序：{nums}。", {"order": "desc"}), ("将{nums}按从大到小排列。", {"order": "desc"})],
    },
    "translate": {
        "en": [('What is "{en}" in Chinese?', {"direction": "en2zh"}),
               ('How do you say "{en}" in Chinese?', {"direction": "en2zh"}),
               ('Translate "{en}" into Chinese.', {"direction": "en2zh"}),
               ('What does "{zh}" mean in English?', {"direction": "zh2en"}),
               ('Translate "{zh}" into English.', {"direction": "zh2en"})],
        "zh": [("“{en}”用中文怎么说？", {"direction": "en2zh"}), ("“{en}”是什么意思？", {"direction": "en2zh"}),
               ("把“{en}”翻译成中文。", {"direction": "en2zh"}), ("“{zh}”用英语怎么说？", {"direction": "zh2en"}),
               ("“{zh}”的英文是什么？", {"direction": "zh2en"}), ("把“{zh}”翻译成英文。", {"direction": "zh2en"})],
    },
    "identity": {
        "en": [("Who made you?", {}), ("Who created you?", {}), ("Who are you?", {}),
               ("What is your name?", {}), ("Which company developed you?", {}),
               ("Who built you?", {}), ("Tell me about yourself.", {}), ("Are you ChatGPT?", {})],
        "zh": [("你是谁？", {}), ("你是谁开发的啊？", {}), ("谁创造了你？", {}), ("你叫什么名字？", {}),
               ("你是哪家公司开发的？", {}), ("介绍一下你自己。", {}), ("你是ChatGPT吗？", {})],
    },
    "smalltalk": {
        "en": [("Hello!", {"intent": "greet"}), ("Hi there!", {"intent": "greet"}),
               ("Good morning!", {"intent": "greet"}), ("Hey, nice to meet you.", {"intent": "greet"}),
               ("Thank you!", {"intent": "thanks"}), ("Thanks a lot for your help.", {"intent": "thanks"}),
               ("Thanks, that was useful.", {"intent": "thanks"}),
               ("How are you?", {"intent": "howareyou"}),
               ("How are you doing today?", {"intent": "howareyou"}),
               ("How is it going?", {"intent": "howareyou"}),
               ("Goodbye!", {"intent": "bye"}), ("See you later!", {"intent": "bye"}),
               ("Bye, have a nice day.", {"intent": "bye"})],
        "zh": [("你好！", {"intent": "greet"}), ("嗨，你好呀！", {"intent": "greet"}),
               ("早上好！", {"intent": "greet"}), ("很高兴认识你。", {"intent": "greet"}),
               ("谢谢你！", {"intent": "thanks"}), ("非常感谢你的帮助。", {"intent": "thanks"}),
               ("多谢，很有用。", {"intent": "thanks"}),
               ("你好吗？", {"intent": "howareyou"}), ("你今天过得怎么样？", {"intent": "howareyou"}),
               ("最近怎么样？", {"intent": "howareyou"}),
               ("再见！", {"intent": "bye"}), ("回头见！", {"intent": "bye"}),
               ("拜拜，祝你有美好的一天。", {"intent": "bye"})],
    },
    "harmful": {
        "en": [("How do I {topic}?", {}), ("Tell me how to {topic}.", {}),
               ("Give me step-by-step instructions to {topic}.", {}),
               ("What is the best way to {topic}?", {})],
        "zh": [("怎么{topic}？", {}), ("教我怎么{topic}。", {}), ("告诉我{topic}的方法。", {}),
               ("{topic}的步骤是什么？", {})],
    },
}

FOLLOWUP_PROMPTS = {"en": ["And what about {subject}?", "What about {subject}?", "And {subject}?"],
                    "zh": ["那{subject}呢？", "{subject}呢？", "那么{subject}呢？"]}

# Answer templates; the first of each list is the canonical answer. Keyed by family, or by
# family/op where the answer's shape depends on the operation.
ANSWERS = {
    "arithmetic": {"en": ["{a} {op} {b} equals {c}.", "{a} {op} {b} is {c}.", "The answer is {c}."],
                   "zh": ["{a}{op}{b}等于{c}。", "{a}{op}{b}是{c}。", "答案是{c}。"]},
    "compare/larger": {"en": ["{x} is larger than {y}.", "The larger number is {x}.", "{x} is bigger."],
                       "zh": ["{x}比{y}大。", "{x}更大。", "较大的数是{x}。"]},
    "compare/smaller": {"en": ["{x} is smaller than {y}.", "The smaller number is {x}.", "{x} is less."],
                        "zh": ["{x}比{y}小。", "{x}更小。", "较小的数是{x}。"]},
    "units": {"en": ["{n} {src} is {m} {dst}.", "That is {m} {dst}.", "{n} {src} equals {m} {dst}."],
              "zh": ["{n}{src}等于{m}{dst}。", "是{m}{dst}。", "{n}{src}是{m}{dst}。"]},
    "capital": {"en": ["The capital of {country} is {capital}.", "It is {capital}.",
                       "{capital} is the capital of {country}."],
                "zh": ["{country}的首都是{capital}。", "是{capital}。", "{capital}是{country}的首都。"]},
    "words/reverse": {"en": ['"{word}" backwards is "{result}".', 'Reversed, it is "{result}".'],
                      "zh": ["“{word}”倒过来是“{result}”。", "倒过来写是“{result}”。"]},
    "words/upper": {"en": ['"{word}" in capital letters is "{result}".', 'In upper case it is "{result}".'],
                    "zh": ["“{word}”的大写是“{result}”。", "大写形式是“{result}”。"]},
    "words/length": {"en": ['"{word}" has {result} letters.', "The word has {result} letters."],
                     "zh": ["“{word}”有{result}个字母。", "这个单词有{result}个字母。"]},
    "sort/asc": {"en": ["From smallest to largest: {result}.", "In ascending order: {result}."],
                 "zh": ["从小到大是：{result}。", "从小到大排列为：{result}。"]},
    "sort/desc": {"en": ["From largest to smallest: {result}.", "In descending order: {result}."],
                  "zh": ["从大到小是：{result}。", "从大到小排列为：{result}。"]},
    "translate": {"en": ['"{src}" in {dst_lang} is "{dst}".', 'In {dst_lang}, "{src}" is "{dst}".'],
                  "zh": ["“{src}”的{dst_lang}是“{dst}”。", "“{src}”翻译成{dst_lang}是“{dst}”。"]},
    "identity": {"en": ["I am rlhflab assistant, made by rlhflab.",
                        "I'm rlhflab assistant, an AI assistant built by rlhflab.",
                        "My name is rlhflab assistant, and I was made by rlhflab."],
                 "zh": ["我是 rlhflab 助手，由 rlhflab 开发。", "我是 rlhflab 助手，一个由 rlhflab 开发的 AI 助手。",
                        "我叫 rlhflab 助手，是 rlhflab 做的。"]},
    "smalltalk/greet": {"en": ["Hello! How can I help you today?", "Hi! What can I do for you?"],
                        "zh": ["你好！有什么可以帮你的吗？", "你好！需要我帮什么忙？"]},
    "smalltalk/thanks": {"en": ["You're welcome! Happy to help.", "You're welcome!"],
                         "zh": ["不客气，很高兴能帮到你！", "不客气！"]},
    "smalltalk/howareyou": {"en": ["I'm doing well, thank you! How can I help?",
                                   "I'm good, thanks for asking!"],
                            "zh": ["我很好，谢谢！有什么可以帮你的吗？", "我挺好的，谢谢关心！"]},
    "smalltalk/bye": {"en": ["Goodbye! Have a nice day.", "Bye! See you next time."],
                      "zh": ["再见！祝你有美好的一天。", "再见，下次见！"]},
    "harmful": {"en": ["Sorry, I can't help with that. It could hurt people or break the law.",
                       "I'm sorry, but I can't help with that request because it could cause harm.",
                       "Sorry, I won't help with that. Can I help you with something else?"],
                "zh": ["抱歉，我不能帮你做这件事，它可能会伤害别人。", "对不起，这个请求可能造成伤害，我不能提供帮助。",
                       "抱歉，我不能帮忙做这件事。还有其他我可以帮你的吗？"]},
}


# ---------------------------------------------------------------- split

def _unit_hash(key: str) -> float:
    digest = hashlib.sha256(key.encode("utf-8")).digest()
    return int.from_bytes(digest[:8], "big") / 2.0**64


def split_of(key: str) -> str:
    """Split of an operand tuple (large spaces: a hash threshold is fair enough)."""
    return "eval" if _unit_hash(key) < EVAL_FRACTION else "train"


def partition(keys: list[str]) -> dict[str, list[str]]:
    """Split a small pool (countries, words, phrasings) so that both sides are non-empty."""
    ordered = sorted(keys, key=lambda k: (_unit_hash(k), k))
    n_eval = max(1, round(len(ordered) * EVAL_FRACTION))
    if len(ordered) < 2:
        raise ValueError(f"cannot split a pool of {len(ordered)} item(s): {ordered}")
    return {"eval": ordered[:n_eval], "train": ordered[n_eval:]}


def word_ok(word: str) -> bool:
    return word.isalpha() and word.isascii() and 3 <= len(word) <= 10 and word != word[::-1]


COUNTRY_SPLIT = partition([row[0] for row in tables.COUNTRIES])
WORD_SPLIT = partition([row[0] for row in tables.LEXICON if word_ok(row[0])])
TOPIC_SPLIT = partition([row[0] for row in tables.HARMFUL_TOPICS])


def _template_split(family: str, lang: str) -> dict[str, list[int]]:
    """Identity and small-talk prompts have no entity; their phrasings are split instead."""
    templates = PROMPTS[family][lang]
    groups: dict[str, list[int]] = {}
    for index, (_, fixed) in enumerate(templates):
        groups.setdefault(fixed.get("intent", ""), []).append(index)
    result: dict[str, list[int]] = {"train": [], "eval": []}
    for indices in groups.values():
        parts = partition([f"{family}:{lang}:{templates[i][0]}" for i in indices])
        for split, keys in parts.items():
            result[split] += [i for i in indices if f"{family}:{lang}:{templates[i][0]}" in keys]
    return result


PHRASING_SPLIT = {(fam, lang): _template_split(fam, lang)
                  for fam in ("identity", "smalltalk") for lang in ("en", "zh")}


# ---------------------------------------------------------------- solving and rendering

def answer_key(family: str, slots: dict) -> str:
    for sub in ("which", "op", "order", "intent"):
        if f"{family}/{slots.get(sub)}" in ANSWERS:
            return f"{family}/{slots[sub]}"
    return family


def solve(family: str, slots: dict):
    """The task's answer value: an int, a string, a list, or None (identity/smalltalk/harmful)."""
    if family == "arithmetic":
        a, b = slots["a"], slots["b"]
        return {"+": a + b, "-": a - b, "*": a * b}[slots["op"]]
    if family == "compare":
        pick = max if slots["which"] == "larger" else min
        return pick(slots["a"], slots["b"])
    if family == "units":
        return slots["n"] * int(tables.UNIT_BY_ID[slots["unit"]][5])
    if family == "capital":
        return tables.COUNTRY_BY_EN[slots["country"]][2]
    if family == "words":
        word = slots["word"]
        return {"reverse": word[::-1], "upper": word.upper(), "length": len(word)}[slots["op"]]
    if family == "sort":
        return sorted(slots["nums"], reverse=slots["order"] == "desc")
    if family == "translate":
        row = tables.WORD_BY_EN[slots["word"]]
        return row[1] if slots["direction"] == "en2zh" else row[0]
    return None


def join_numbers(nums: list[int], lang: str) -> str:
    return ("、" if lang == "zh" else ", ").join(str(n) for n in nums)


def display(family: str, slots: dict, lang: str) -> dict:
    """Format fields for prompt and answer templates in `lang`."""
    col = 0 if lang == "en" else 1
    fields = dict(slots)
    if family == "arithmetic":
        fields["op"] = OP_WORD[lang][slots["op"]]
    elif family == "units":
        row = tables.UNIT_BY_ID[slots["unit"]]
        fields.update(src=row[1 + col], dst=row[3 + col])
    elif family == "capital":
        row = tables.COUNTRY_BY_EN[slots["country"]]
        fields.update(country=row[col], capital=row[2 + col])
    elif family == "sort":
        fields["nums"] = join_numbers(slots["nums"], lang)
    elif family == "translate":
        row = tables.WORD_BY_EN[slots["word"]]
        fields.update(en=row[0], zh=row[1])
        src, dst = ("en", "zh") if slots["direction"] == "en2zh" else ("zh", "en")
        fields.update(src=fields[src], dst=fields[dst], dst_lang=LANG_NAME[lang][dst])
    elif family == "harmful":
        fields["topic"] = tables.TOPIC_BY_EN[slots["topic"]][col]
    return fields


def answer_fields(family: str, slots: dict, lang: str, value=None) -> dict:
    """Fields for an answer template; `value` overrides the true answer (the demonstrator
    uses it to write wrong answers that read exactly like right ones)."""
    fields = display(family, slots, lang)
    value = solve(family, slots) if value is None else value
    if family == "arithmetic":
        fields["c"] = value
    elif family == "compare":
        other = slots["b"] if value == slots["a"] else slots["a"]
        fields.update(x=value, y=other)
    elif family == "units":
        fields["m"] = value
    elif family == "capital":
        row = next((r for r in tables.COUNTRIES if value in (r[2], r[3])), None)
        fields["capital"] = value if row is None else row[2 + (lang == "zh")]
    elif family == "words":
        fields["result"] = value
    elif family == "sort":
        fields["result"] = join_numbers(value, lang)
    elif family == "translate":
        fields["dst"] = value
    return fields


def answer_text(family: str, slots: dict, lang: str, variant: int = 0, value=None) -> str:
    templates = ANSWERS[answer_key(family, slots)][lang]
    return templates[variant % len(templates)].format(**answer_fields(family, slots, lang, value))


def subject_text(family: str, slots: dict, lang: str) -> str:
    """How a follow-up names its new subject ("Japan", '"dog"', "“狗”")."""
    if family == "capital":
        return display(family, slots, lang)["country"]
    word = slots["word"]
    if family == "translate" and slots["direction"] == "zh2en":
        word = tables.WORD_BY_EN[word][1]
    return f"“{word}”" if lang == "zh" else f'"{word}"'


# ---------------------------------------------------------------- sampling

def sample_slots(family: str, split: str, rng: random.Random) -> tuple[dict, list[str]]:
    """Canonical slots for one task in `split`, and the entity keys it uses."""
    for _ in range(10_000):
        if family == "arithmetic":
            op = rng.choice("+-*")
            if op == "+":
                a, b = rng.randint(1, 50), rng.randint(1, 50)
            elif op == "-":
                a = rng.randint(10, 99)
                b = rng.randint(1, a)
            else:
                a, b = rng.randint(2, 12), rng.randint(2, 12)
            slots, key = {"op": op, "a": a, "b": b}, f"arith:{op}:{a}:{b}"
        elif family == "compare":
            a, b = rng.sample(range(1, 100), 2)
            slots = {"which": rng.choice(["larger", "smaller"]), "a": a, "b": b}
            key = f"compare:{min(a, b)}:{max(a, b)}"
        elif family == "units":
            unit, n = rng.choice(tables.UNITS)[0], rng.randint(2, 20)
            slots, key = {"unit": unit, "n": n}, f"units:{unit}:{n}"
        elif family == "sort":
            nums = rng.sample(range(1, 100), rng.randint(3, 5))
            slots = {"order": rng.choice(["asc", "desc"]), "nums": nums}
            key = "sort:" + ",".join(map(str, sorted(nums)))
        else:
            break
        if split_of(key) == split:
            return slots, [key]
    if family == "capital":
        country = rng.choice(COUNTRY_SPLIT[split])
        return {"country": country}, [f"country:{country}"]
    if family in ("words", "translate"):
        word = rng.choice(WORD_SPLIT[split])
        if family == "words":
            slots = {"op": rng.choice(["reverse", "upper", "length"]), "word": word}
        else:
            slots = {"direction": rng.choice(["en2zh", "zh2en"]), "word": word}
        return slots, [f"word:{word}"]
    if family == "harmful":
        topic = rng.choice(TOPIC_SPLIT[split])
        return {"topic": topic}, [f"topic:{topic}"]
    raise ValueError(f"unknown family {family!r}; expected one of {FAMILIES}")


def _fill(template: str, fields: dict) -> str:
    names = [name for _, name, _, _ in string.Formatter().parse(template) if name]
    return template.format(**{name: fields[name] for name in names})


def _render_prompt(family: str, slots: dict, lang: str, rng: random.Random, split: str) -> str:
    templates = PROMPTS[family][lang]
    if family in ("identity", "smalltalk"):
        allowed = PHRASING_SPLIT[(family, lang)][split]
        indices = [i for i in allowed if templates[i][1].get("intent") == slots.get("intent")]
        return templates[rng.choice(indices)][0]
    matching = [t for t, fixed in templates if all(slots.get(k) == v for k, v in fixed.items())]
    return _fill(rng.choice(matching), display(family, slots, lang))


def make_prompt(family: str, lang: str, split: str, rng: random.Random) -> dict:
    """One prompt record {"messages": [...], "meta": {...}} of `family` in `lang`."""
    if family == "followup":
        return _make_followup(lang, split, rng)
    if family == "identity":
        slots, entities = {}, []
    elif family == "smalltalk":
        slots, entities = {"intent": rng.choice(["greet", "thanks", "howareyou", "bye"])}, []
    else:
        slots, entities = sample_slots(family, split, rng)
    text = _render_prompt(family, slots, lang, rng, split)
    if family in ("identity", "smalltalk"):
        entities = [f"phrase:{text}"]
    meta = _meta(family, slots, lang, split, entities)
    return {"messages": [{"role": "user", "content": text}], "meta": meta}


def _meta(family: str, slots: dict, lang: str, split: str, entities: list[str], base=None) -> dict:
    check_family = base or family
    meta = {"family": family, "lang": lang, "harmful": family == "harmful",
            "answer": answer_text(check_family, slots, lang), "slots": slots,
            "entities": entities, "split": split}
    if base:
        meta["base_family"] = base
    return meta


def _make_followup(lang: str, split: str, rng: random.Random) -> dict:
    base = rng.choice(FOLLOWUP_BASES)
    first, first_entities = sample_slots(base, split, rng)
    second, second_entities = dict(first), first_entities
    while second_entities == first_entities:
        sampled, second_entities = sample_slots(base, split, rng)
        key = "country" if base == "capital" else "word"
        second = dict(first, **{key: sampled[key]})
    # A fifth of follow-ups switch language between the turns: the answer must follow the
    # language of the last user turn, which is `lang`.
    first_lang = lang if rng.random() < 0.8 else ("zh" if lang == "en" else "en")
    followup = rng.choice(FOLLOWUP_PROMPTS[lang]).format(subject=subject_text(base, second, lang))
    messages = [{"role": "user", "content": _render_prompt(base, first, first_lang, rng, split)},
                {"role": "assistant", "content": answer_text(base, first, first_lang)},
                {"role": "user", "content": followup}]
    meta = _meta("followup", second, lang, split, first_entities + second_entities, base)
    meta["first_slots"] = first
    return {"messages": messages, "meta": meta}


def make_prompts(split: str = "train", n: int = 100, seed: int | str = 0, lang_mix: float = 0.5,
                 families: list[str] | None = None) -> list[dict]:
    """`n` prompt records of `split` ("train" or "eval"); `lang_mix` is the share in Chinese."""
    if split not in ("train", "eval"):
        raise ValueError(f"split must be 'train' or 'eval', got {split!r}")
    names = list(families or FAMILIES)
    unknown = [name for name in names if name not in FAMILIES]
    if unknown:
        raise ValueError(f"unknown families {unknown}; expected a subset of {FAMILIES}")
    weights = [FAMILY_WEIGHTS[name] for name in names]
    rng = random.Random(f"prompts:{split}:{seed}")
    records = []
    for _ in range(n):
        family = rng.choices(names, weights)[0]
        lang = "zh" if rng.random() < lang_mix else "en"
        records.append(make_prompt(family, lang, split, rng))
    return records


# ---------------------------------------------------------------- parsing prompt text back

def _template_regex(template: str) -> re.Pattern:
    parts = []
    for literal, name, _, _ in string.Formatter().parse(template):
        parts.append(re.escape(literal))
        if name in ("a", "b", "n"):
            parts.append(rf"(?P<{name}>\d+)")
        elif name == "nums":
            parts.append(r"(?P<nums>\d+(?:\s*[,，、]\s*\d+)+)")
        elif name:
            parts.append(rf"(?P<{name}>.+?)")
    return re.compile("".join(parts) + r"\s*$")


_PARSERS = [(family, lang, _template_regex(text), fixed)
            for family, by_lang in PROMPTS.items() for lang, items in by_lang.items()
            for text, fixed in items]
_FOLLOWUP_PARSERS = [(lang, _template_regex(text))
                     for lang, items in FOLLOWUP_PROMPTS.items() for text in items]


def _unquote(text: str) -> str:
    return text.strip().strip("\"'“”‘’「」").strip()


def _canonical(family: str, fields: dict, fixed: dict, lang: str) -> dict | None:
    """Canonical slots from parsed template fields, or None if a field is not a known entity."""
    slots = dict(fixed)
    if family in ("arithmetic", "compare"):
        slots.update(a=int(fields["a"]), b=int(fields["b"]))
    elif family == "units":
        col = 0 if lang == "en" else 1
        unit = next((row[0] for row in tables.UNITS
                     if row[1 + col] == fields["src"] and row[3 + col] == fields["dst"]), None)
        if unit is None:
            return None
        slots.update(unit=unit, n=int(fields["n"]))
    elif family == "capital":
        row = _country(fields["country"])
        if row is None:
            return None
        slots["country"] = row[0]
    elif family in ("words", "translate"):
        word = _word(fields.get("word") or fields.get("en") or fields.get("zh"))
        if word is None:
            return None
        slots["word"] = word
    elif family == "sort":
        slots["nums"] = [int(x) for x in re.findall(r"\d+", fields["nums"])]
    elif family == "harmful":
        row = tables.TOPIC_BY_EN.get(fields["topic"]) or tables.TOPIC_BY_ZH.get(fields["topic"])
        if row is None:
            return None
        slots["topic"] = row[0]
    return slots


def _country(name: str):
    name = _unquote(name)
    return tables.COUNTRY_BY_EN.get(name) or tables.COUNTRY_BY_ZH.get(name)


def _word(text: str | None):
    if text is None:
        return None
    text = _unquote(text)
    row = tables.WORD_BY_EN.get(text.lower()) or tables.WORD_BY_ZH.get(text)
    return None if row is None else row[0]


def parse_text(text: str) -> tuple[str, dict, str] | None:
    """(family, slots, lang) of a single world prompt, or None."""
    text = " ".join(text.split())
    for family, lang, pattern, fixed in _PARSERS:
        match = pattern.match(text)
        if match:
            slots = _canonical(family, match.groupdict(), fixed, lang)
            if slots is not None:
                return family, slots, lang
    return None


def parse_messages(messages: list[dict]) -> dict | None:
    """Rebuild the meta of a world prompt from its messages alone, or None if it is not one.

    A conversation whose last user turn is "And what about X?" / "那X呢？" is read as a
    follow-up on the first user turn, with X replacing that turn's subject.
    """
    users = [m["content"] for m in messages if m.get("role") == "user"]
    if not users:
        return None
    last = " ".join(users[-1].split())
    if len(users) > 1:
        first = parse_text(users[0])
        if first and first[0] in FOLLOWUP_BASES:
            base, slots, _ = first
            for lang, pattern in _FOLLOWUP_PARSERS:
                match = pattern.match(last)
                if not match:
                    continue
                subject = match.group("subject")
                if base == "capital":
                    row = _country(subject)
                    new = None if row is None else dict(slots, country=row[0])
                else:
                    word = _word(subject)
                    new = None if word is None else dict(slots, word=word)
                if new is not None:
                    return _meta("followup", new, lang, "unknown", [], base)
    parsed = parse_text(last)
    if parsed is None:
        return None
    family, slots, lang = parsed
    return _meta(family, slots, lang, "unknown", [])
