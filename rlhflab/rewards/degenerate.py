"""Degenerate answers: the empty, repeated, copied or off-language replies that a reward model must
score below a real answer. The audit (`rlhflab rm audit`) measures how often one wins; `rlhflab rm
--harden` trains on them as extra rejected answers."""

from __future__ import annotations

KINDS = ("empty", "eos_only", "whitespace", "one_token", "repeated", "prompt_copy", "wrong_language",
         "ramble", "filler")


def _is_chinese(text: str) -> bool:
    return sum("\u4e00" <= ch <= "\u9fff" for ch in text) * 3 >= len(text.strip()) > 0


def degenerate_answers(messages: list[dict], tokenizer, reference: str | None = None) -> dict[str, str]:
    """The degenerate answers of every kind for one prompt (used by the audit and by --harden)."""
    prompt = messages[-1]["content"]
    zh = _is_chinese(prompt)
    phrase = "好的,谢谢。" if zh else "thank you very much. "
    ramble_unit = ("这个问题很有意思,我们可以从很多角度来看,总的来说情况比较复杂。" if zh else
                   "This is an interesting question that can be seen from many angles, and overall it is complex. ")
    start = (reference or prompt).strip()
    one = tokenizer.decode(tokenizer(start, add_special_tokens=False)["input_ids"][:1]).strip() or "a"
    return {
        "empty": "",
        "eos_only": tokenizer.eos_token or "",
        "whitespace": "  \n ",
        "one_token": one,
        "repeated": phrase * 5,
        "prompt_copy": prompt,
        "wrong_language": ("This is a good question. Let me answer it." if zh else "这是一个好问题,我来回答。"),
        "ramble": ((reference + " ") if reference else "") + ramble_unit * 3,
        "filler": "好的" if zh else "Thanks!",
    }
