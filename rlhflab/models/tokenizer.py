"""Training a byte-level BPE tokenizer for a model built from scratch (the toy world).

Digits are split one by one so a tiny model can learn arithmetic digit by digit. The special
tokens are: <|endoftext|> (EOS and document separator), <|pad|> (distinct from EOS), and the
ChatML role markers <|im_start|> / <|im_end|>; the default chat template is saved with it, so
`AutoTokenizer.from_pretrained(out_dir)` gives a ready chat tokenizer.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

from rlhflab.data.template import DEFAULT_CHAT_TEMPLATE, IM_END, IM_START, PAD

EOS = "<|endoftext|>"
SPECIAL_TOKENS = [EOS, PAD, IM_START, IM_END]


def train_tokenizer(texts: Iterable[str], vocab_size: int, out_dir: str | Path | None = None):
    """Train byte-level BPE on `texts`; save to `out_dir` if given; return a fast HF tokenizer."""

    core = Tokenizer(models.BPE())
    core.pre_tokenizer = pre_tokenizers.Sequence(
        [
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True),
        ]
    )
    core.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=SPECIAL_TOKENS,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    core.train_from_iterator(texts, trainer=trainer)
    tokenizer = PreTrainedTokenizerFast(
        tokenizer_object=core,
        eos_token=EOS,
        bos_token=EOS,
        pad_token=PAD,
        additional_special_tokens=[IM_START, IM_END],
    )
    tokenizer.chat_template = DEFAULT_CHAT_TEMPLATE
    if out_dir is not None:
        tokenizer.save_pretrained(str(out_dir))
    return tokenizer
