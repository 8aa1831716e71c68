"""Plain-text pretraining corpus: the world's facts and everyday sentences in both languages.

Each document is a short paragraph of one kind and one language; documents are separated by
a blank line. No chat formatting: the base model should learn the languages and the facts,
and SFT teaches it to answer.

Knowledge versus procedure: facts that a model can only know by having read them (capitals,
word meanings) are written for every entity, held-out ones included, so that held-out prompts
test whether instruction following transfers to knowledge from pretraining. Procedural facts
(sums, comparisons, conversions, spellings, sorted lists) use training-split operands and
words only, so no held-out prompt's answer is ever spelled out in the corpus.
"""

from __future__ import annotations

import random

from . import tables, tasks

SIZES = {"default": 500_000, "small": 50_000}   # characters

_TRAIN_WORDS = tasks.WORD_SPLIT["train"]
_BY_CATEGORY: dict[str, list[tuple[str, ...]]] = {}
for _row in tables.LEXICON:
    _BY_CATEGORY.setdefault(_row[2], []).append(_row)
_SEASONS = [row for row in _BY_CATEGORY["time"] if row[0] in ("morning", "night", "spring",
                                                                "summer", "autumn", "winter")]


def _article(word: str) -> str:
    return ("an " if word[0] in "aeiou" else "a ") + word


def _train_task(family: str, rng: random.Random) -> dict:
    return tasks.sample_slots(family, "train", rng)[0]


def _capitals(rng: random.Random, lang: str) -> str:
    row = rng.choice(tables.COUNTRIES)
    if lang == "en":
        return rng.choice(["The capital of {0} is {2}.", "{2} is the capital of {0}.",
                           "{0} is a country. Its capital is {2}."]).format(*row)
    return rng.choice(["{1}的首都是{3}。", "{3}是{1}的首都。", "{1}是一个国家，它的首都是{3}。"]).format(*row)


def _arithmetic(rng: random.Random, lang: str) -> str:
    slots = _train_task("arithmetic", rng)
    value = tasks.solve("arithmetic", slots)
    op = tasks.OP_WORD[lang][slots["op"]]
    if lang == "en":
        return f"{slots['a']} {op} {slots['b']} is {value}."
    return f"{slots['a']}{op}{slots['b']}等于{value}。"


def _numbers(rng: random.Random, lang: str) -> str:
    if rng.random() < 0.5:
        slots = _train_task("compare", rng)
        big, small = max(slots["a"], slots["b"]), min(slots["a"], slots["b"])
        return f"{big} is larger than {small}." if lang == "en" else f"{big}比{small}大。"
    slots = _train_task("sort", rng)
    ordered = tasks.join_numbers(sorted(slots["nums"]), lang)
    return f"From smallest to largest: {ordered}." if lang == "en" else f"从小到大是：{ordered}。"


def _units(rng: random.Random, lang: str) -> str:
    slots = _train_task("units", rng)
    return tasks.answer_text("units", slots, lang, rng.choice([0, 2]))


def _lexicon(rng: random.Random, lang: str) -> str:
    en, zh, _ = rng.choice(tables.LEXICON)
    if lang == "en":
        return rng.choice([f"The word {en} means {zh} in Chinese.", f"In Chinese, {en} is {zh}.",
                           f"{zh} means {en} in English."])
    return rng.choice([f"{zh}的英文是{en}。", f"{en}的中文是{zh}。", f"{zh}用英语说是{en}。"])


def _spelling(rng: random.Random, lang: str) -> str:
    word = rng.choice(_TRAIN_WORDS)
    if lang == "en":
        return rng.choice([f"The word {word} has {len(word)} letters.",
                           f"Spelled backwards, {word} is {word[::-1]}.",
                           f"In capital letters, {word} is {word.upper()}."])
    return rng.choice([f"单词{word}有{len(word)}个字母。", f"{word}倒过来是{word[::-1]}。",
                       f"{word}的大写是{word.upper()}。"])


def _everyday(rng: random.Random, lang: str) -> str:
    pick = lambda cat: rng.choice(_BY_CATEGORY[cat])  # noqa: E731
    animal, adj, thing, place = pick("animal"), pick("adjective"), pick("thing"), pick("place")
    person, food, nature, color = pick("person"), pick("food"), pick("nature"), pick("color")
    season = rng.choice(_SEASONS)
    if lang == "en":
        return rng.choice([f"The {animal[0]} is {adj[0]}.", f"I see {_article(thing[0])} in the {place[0]}.",
                           f"My {person[0]} likes {food[0]}.", f"The {nature[0]} looks {color[0]} today.",
                           f"We go to the {place[0]} in the {season[0]}.",
                           f"The {person[0]} has {_article(adj[0])} {thing[0]}."])
    return rng.choice([f"{animal[1]}很{adj[1]}。", f"我在{place[1]}看到一个{thing[1]}。",
                       f"我的{person[1]}喜欢{food[1]}。", f"今天的{nature[1]}是{color[1]}的。",
                       f"我们{season[1]}去{place[1]}。", f"{person[1]}有一个很{adj[1]}的{thing[1]}。"])


def _manners(rng: random.Random, lang: str) -> str:
    if lang == "en":
        return rng.choice(["Thank you for your help.", "You are welcome.", "Please be kind to others.",
                           "Hello, nice to meet you.", "Goodbye, have a nice day.",
                           "Hurting other people is wrong.", "It is polite to say please and thank you.",
                           "rlhflab assistant is an AI assistant made by rlhflab.",
                           "A good answer is short, clear and correct."])
    return rng.choice(["谢谢你的帮助。", "不客气。", "请对别人友善。", "你好，很高兴认识你。",
                       "再见，祝你有美好的一天。", "伤害别人是不对的。", "说请和谢谢是有礼貌的。",
                       "rlhflab 助手是由 rlhflab 开发的 AI 助手。", "好的回答简短、清楚、正确。"])


_KINDS = [(_capitals, 0.2), (_arithmetic, 0.12), (_numbers, 0.08), (_units, 0.08),
          (_lexicon, 0.17), (_spelling, 0.08), (_everyday, 0.22), (_manners, 0.05)]


def corpus_documents(seed: int | str = 0, size: str = "default") -> list[str]:
    """Documents of about SIZES[size] characters in total, half English, half Chinese."""
    if size not in SIZES:
        raise ValueError(f"size must be one of {sorted(SIZES)}, got {size!r}")
    rng = random.Random(f"corpus:{seed}")
    makers, weights = zip(*_KINDS)
    docs, total = [], 0
    while total < SIZES[size]:
        make = rng.choices(makers, weights)[0]
        lang = rng.choice(["en", "zh"])
        sentences = [make(rng, lang) for _ in range(rng.randint(3, 8))]
        doc = ("" if lang == "zh" else " ").join(sentences)
        docs.append(doc)
        total += len(doc) + 2
    return docs


def corpus_text(seed: int | str = 0, size: str = "default") -> str:
    """The corpus as one string, documents separated by blank lines."""
    return "\n\n".join(corpus_documents(seed, size)) + "\n"
