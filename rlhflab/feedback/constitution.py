"""A constitution: written principles that AI feedback follows, and the conversations built from it.

A YAML file (the toy world's: rlhflab/recipes/toy-constitution.yaml, by the name `toy`):

    name: my-rules
    principles:
      - name: harmless                  # a short id, unique in the file
        rule: harmful                   # optional: the rules.jsonl flag this principle guards
        principle: Politely refuse harmful requests.          # what a labeller compares answers on
        critique: Does the answer help with something harmful? Say what is wrong with it.
        revision: Rewrite the answer so that it politely refuses anything harmful.

Each text is a string, or a mapping language -> string ({en: ..., zh: ...}): the language of the
user's last turn picks one (the first listed when that language is missing). `principle` defaults
to the critique request.

The same functions build the conversations that `critique` asks a model, that the AI labeller
asks (`rank --by model:DIR`) and that the toy world's feedback demonstrations teach, so that they
always agree on the wording.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from rlhflab.errors import UsageError
from rlhflab.runs import read_text

PACKAGED = {"toy": Path(__file__).resolve().parents[1] / "recipes" / "toy-constitution.yaml"}
CHOICES = ("(A)", "(B)")   # the labeller's two possible replies: the first or the second answer
_CJK = re.compile(r"[\u3400-\u9fff]")
_LATIN = re.compile(r"[A-Za-z]")

# The labeller's question around a principle, per language ({principle} is filled in).
QUESTION = {
    "en": "Which answer better follows this principle: {principle}\nReply with (A) or (B); (A) if they follow it equally.",
    "zh": "哪个回答更符合这条原则：{principle}\n请回答 (A) 或 (B)；如果同样符合，回答 (A)。",
}
ANSWER_LABEL = {"en": ("Answer (A):", "Answer (B):"), "zh": ("回答 (A)：", "回答 (B)：")}
QUESTION_LABEL = {"en": "Question:", "zh": "问题："}
ANSWER_ONE = {"en": "Answer:", "zh": "回答："}


@dataclass
class Principle:
    name: str
    critique: dict[str, str]           # language -> critique request
    revision: dict[str, str]           # language -> revision request
    principle: dict[str, str]          # language -> the principle as a labeller reads it
    rule: str | None = None            # the rule flag it guards (rules.jsonl), if any

    def text(self, part: str, lang: str) -> str:
        texts = getattr(self, part)
        return texts.get(lang) or next(iter(texts.values()))


@dataclass
class Constitution:
    name: str
    principles: list[Principle] = field(default_factory=list)
    path: str = ""

    def by_name(self, name: str) -> Principle:
        for principle in self.principles:
            if principle.name == name:
                return principle
        raise KeyError(name)


def language_of(text: str) -> str:
    """'zh' when Chinese characters outnumber Latin letters / 2, else 'en' (the two languages
    the packaged constitution is written in; any other script falls back to the first listed)."""
    return "zh" if len(_CJK.findall(text)) * 2 >= max(1, len(_LATIN.findall(text))) else "en"


def _texts(value, where: str) -> dict[str, str]:
    if isinstance(value, str) and value.strip():
        return {"en": value, "zh": value}
    if isinstance(value, dict) and value and all(isinstance(k, str) and isinstance(v, str) and v.strip()
                                                 for k, v in value.items()):
        return dict(value)
    raise UsageError(f"{where}: expected a non-empty string or a mapping language -> string")


def load_constitution(source: str, option: str = "--constitution") -> Constitution:
    """A constitution from a YAML file, or 'toy' for the toy world's. Errors name the file and field."""
    path = PACKAGED.get(source, Path(source))
    if not path.is_file():
        raise UsageError(f"{option} {source}: no such file (or give 'toy' for the toy world's constitution)")
    try:
        data = yaml.safe_load(read_text(path))   # UTF-8 (a byte-order mark accepted), else file and line named
    except yaml.YAMLError as exc:
        raise UsageError(f"{option} {path}: not valid YAML: {exc}") from None
    if not isinstance(data, dict) or not isinstance(data.get("principles"), list) or not data["principles"]:
        raise UsageError(f"{option} {path}: expected a mapping with a non-empty list 'principles'")
    principles, seen = [], set()
    for index, item in enumerate(data["principles"]):
        where = f"{path}: principles[{index}]"
        if not isinstance(item, dict):
            raise UsageError(f"{where}: expected a mapping with name, critique and revision")
        unknown = set(item) - {"name", "rule", "principle", "critique", "revision"}
        if unknown:
            raise UsageError(f"{where}: unknown field(s) {sorted(unknown)}; a principle has name, principle, "
                             "critique, revision and rule")
        name = item.get("name")
        if not isinstance(name, str) or not name.strip():
            raise UsageError(f"{where}: give a 'name'")
        if name in seen:
            raise UsageError(f"{where}: the name {name!r} is used twice")
        seen.add(name)
        for part in ("critique", "revision"):
            if part not in item:
                raise UsageError(f"{where} ({name}): give a '{part}' request")
        critique = _texts(item["critique"], f"{where}.critique")
        rule = item.get("rule")
        if rule is not None and not isinstance(rule, str):
            raise UsageError(f"{where}.rule: expected a rule name (a string)")
        principles.append(Principle(name, critique, _texts(item["revision"], f"{where}.revision"),
                                    _texts(item["principle"], f"{where}.principle") if "principle" in item
                                    else critique, rule))
    return Constitution(str(data.get("name") or path.stem), principles, str(path))


# ---------------------------------------------------------------------------------------------
# Conversations.


def last_user_text(prompt: list[dict]) -> str:
    return next((m["content"] for m in reversed(prompt) if m["role"] == "user"), "")


def _quoted(prompt: list[dict], answers: list[tuple[str, str]], request: str) -> str:
    """The question (earlier turns as context lines), labelled answers and a request, as one user turn."""
    lang = language_of(last_user_text(prompt))
    context = [f"{m['role']}: {m['content']}" for m in prompt[:-1]]
    return "\n".join(context + [f"{QUESTION_LABEL.get(lang, QUESTION_LABEL['en'])} {last_user_text(prompt)}"]
                     + [f"{label} {text}" for label, text in answers] + [request])


def comparison_messages(prompt: list[dict], first: str, second: str, principle: Principle) -> list[dict]:
    """One user turn asking which of two answers to `prompt` better follows `principle`; the
    expected reply is CHOICES[0] or CHOICES[1]."""
    lang = language_of(last_user_text(prompt))
    label_a, label_b = ANSWER_LABEL.get(lang, ANSWER_LABEL["en"])
    question = QUESTION.get(lang, QUESTION["en"]).format(principle=principle.text("principle", lang))
    return [{"role": "user", "content": _quoted(prompt, [(label_a, first), (label_b, second)], question)}]


def critique_messages(prompt: list[dict], answer: str, principle: Principle) -> list[dict]:
    """The conversation whose next assistant turn is the critique of `answer`. The answer is
    quoted in the user's turn, not replayed as the assistant's own: then training on such
    conversations (the toy world's feedback demonstrations) never teaches the flawed answer, and
    any model's answers can be critiqued."""
    lang = language_of(last_user_text(prompt))
    label = ANSWER_ONE.get(lang, ANSWER_ONE["en"])
    return [{"role": "user", "content": _quoted(prompt, [(label, answer)], principle.text("critique", lang))}]


def revision_messages(prompt: list[dict], answer: str, critique: str, principle: Principle) -> list[dict]:
    """The conversation whose next assistant turn is the revised answer."""
    lang = language_of(last_user_text(prompt))
    return critique_messages(prompt, answer, principle) + [
        {"role": "assistant", "content": critique},
        {"role": "user", "content": principle.text("revision", lang)}]
