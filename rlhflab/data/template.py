"""Chat templates, label masks and prompt encoding.

Every conversation becomes token ids through the tokenizer's own chat template. A tokenizer
without one gets the documented default below (ChatML, as used by Qwen): its markers are added
as special tokens when missing, which grows the vocabulary (the caller resizes embeddings).

Labels: only assistant turns are trained (every assistant turn of a multi-turn conversation),
including the end-of-turn marker, so the model learns to stop. The assistant spans are found by
rendering the conversation prefix by prefix and mapping character spans onto tokens through the
fast tokenizer's offsets, so this works for any template that renders prefixes consistently.

Truncation policy: a conversation longer than `max_length` tokens keeps its first `max_length`
tokens (right truncation). A row left with no trainable token is skipped; both cases are counted.
"""

from __future__ import annotations

from dataclasses import dataclass

from rlhflab.errors import UsageError

IGNORE_INDEX = -100

IM_START, IM_END, PAD = "<|im_start|>", "<|im_end|>", "<|pad|>"

# The {% generation %} block marks what an assistant turn trains on (its answer and <|im_end|>,
# as rlhflab's own label mask does), so that `apply_chat_template(..., return_assistant_tokens_mask=True)`
# and trainers built on it (TRL's assistant_only_loss) find the same tokens. It renders nothing.
DEFAULT_CHAT_TEMPLATE = (
    "{% for message in messages %}"
    "{% if message['role'] == 'assistant' %}"
    "{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}"
    "{{ '\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def ensure_chat_template(tokenizer) -> bool:
    """Give a tokenizer without a chat template the default one. Returns True if the vocab grew."""
    if getattr(tokenizer, "chat_template", None):
        return False
    before = len(tokenizer)
    missing = [t for t in (IM_START, IM_END) if t not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens({"additional_special_tokens": missing})
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    return len(tokenizer) > before


def ensure_pad_token(tokenizer) -> bool:
    """Make sure the pad token exists and differs from EOS, so EOS stays a trained label.

    Returns True if a token was added (the caller must resize the embeddings).
    """
    if tokenizer.pad_token is not None and tokenizer.pad_token_id != tokenizer.eos_token_id:
        return False
    before = len(tokenizer)
    tokenizer.add_special_tokens({"pad_token": PAD})
    return len(tokenizer) > before


def stop_token_ids(tokenizer) -> list[int]:
    """Token ids that end an assistant turn: EOS, plus the template's end-of-turn marker."""
    ids = []
    if tokenizer.eos_token_id is not None:
        ids.append(tokenizer.eos_token_id)
    vocab = tokenizer.get_vocab()
    for marker in (IM_END, "<|eot_id|>", "<|end|>", "<end_of_turn>"):
        if marker in vocab and vocab[marker] not in ids:
            ids.append(vocab[marker])
    return ids


def turn_end_ids(tokenizer) -> list[int]:
    """The tokens the chat template puts after an assistant answer, from its end-of-turn marker on
    ("<|im_end|>", "\n" in ChatML; just EOS in simpler templates; none if it marks no end)."""
    messages = [{"role": "user", "content": "q"}, {"role": "assistant", "content": "a"}]
    head = len(encode_prompt(tokenizer, messages[:1]))
    full = tokenizer(render(tokenizer, messages), add_special_tokens=False)["input_ids"]
    stops = set(stop_token_ids(tokenizer))
    end = next((i for i in range(head, len(full)) if full[i] in stops), len(full))
    return full[end:]


def render(tokenizer, messages: list[dict], add_generation_prompt: bool = False) -> str:
    return tokenizer.apply_chat_template(
        messages, tokenize=False, add_generation_prompt=add_generation_prompt
    )


def encode_prompt(tokenizer, messages: list[dict]) -> list[int]:
    """Token ids of a conversation that ends with a user turn, plus the assistant header."""
    text = render(tokenizer, messages, add_generation_prompt=True)
    return tokenizer(text, add_special_tokens=False)["input_ids"]


def assistant_char_spans(tokenizer, messages: list[dict]) -> tuple[str, list[tuple[int, int]]]:
    """The rendered conversation and the [start, end) character span of each assistant turn."""
    full = render(tokenizer, messages)
    spans = []
    for i, message in enumerate(messages):
        if message["role"] != "assistant":
            continue
        head = render(tokenizer, messages[:i], add_generation_prompt=True) if i else ""
        upto = full if i == len(messages) - 1 else render(tokenizer, messages[: i + 1])
        if not (full.startswith(head) and full.startswith(upto)):
            raise UsageError(
                "the tokenizer's chat template does not render conversation prefixes "
                "consistently, so assistant turns cannot be located for the label mask; "
                "pass --chat-template default to use rlhflab's ChatML template"
            )
        start, end = len(head), len(upto.rstrip())
        spans.append((start, end))
    return full, spans


@dataclass
class Encoded:
    input_ids: list[int]
    labels: list[int]  # IGNORE_INDEX outside assistant turns
    truncated: bool

    @property
    def n_trainable(self) -> int:
        return sum(1 for x in self.labels if x != IGNORE_INDEX)


def encode_chat(tokenizer, messages: list[dict], max_length: int, keep_end: bool = False) -> Encoded:
    """Token ids and labels for a whole conversation (see the module docstring for the policy).
    Longer than max_length, it keeps its start, or with `keep_end` its end: a reward model reads
    its score at the last token, so cutting the end would cut the answer it is asked to judge."""
    if not getattr(tokenizer, "is_fast", False):
        raise UsageError("rlhflab needs a fast tokenizer (tokenizer.json) to build label masks")
    text, spans = assistant_char_spans(tokenizer, messages)
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids, offsets = enc["input_ids"], enc["offset_mapping"]
    labels = [IGNORE_INDEX] * len(ids)
    for t, (a, b) in enumerate(offsets):
        if b > a and any(s <= a < e for s, e in spans):
            labels[t] = ids[t]
    truncated = len(ids) > max_length
    cut = slice(len(ids) - max_length, None) if keep_end and truncated else slice(0, max_length)
    return Encoded(ids[cut], labels[cut], truncated)
