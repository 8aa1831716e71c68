"""Small commands that are not training stages: tokenizer training, world export, the gold judge."""

from __future__ import annotations

from pathlib import Path

from rlhflab.data.formats import iter_raw_rows
from rlhflab.errors import UsageError
from rlhflab.feedback.constitution import load_constitution
from rlhflab.feedback.toy_feedback import COMPARISONS_PER_DEMONSTRATION, feedback_rows
from rlhflab.models.tokenizer import train_tokenizer
from rlhflab.runs import atomic_write_jsonl, refuse_a_file
from rlhflab.world import export
from rlhflab.world.demonstrator import WORLDS, parse_habits


def tokenizer_train(config) -> int:
    """`rlhflab tokenizer train --corpus a.txt[,b.jsonl] --vocab-size N --out DIR`."""

    if not config.corpus or not config.out:
        raise UsageError("give --corpus (text files) and --out (the tokenizer directory)")

    refuse_a_file(config.out)
    if config.vocab_size < 300:
        raise UsageError(f"--vocab-size: at least 300 (256 bytes + special tokens + merges), got {config.vocab_size}")
    texts = []
    for source in config.corpus.split(","):
        for where, row in iter_raw_rows(source.strip()):
            if isinstance(row, dict) and isinstance(row.get(config.text_field), str):
                texts.append(row[config.text_field])
            elif isinstance(row, dict) and isinstance(row.get("messages"), list):
                texts += [m.get("content", "") for m in row["messages"] if isinstance(m, dict)]
            else:
                raise UsageError(f"{where}: no {config.text_field!r} text field (or messages) to learn from")
    if not texts:
        raise UsageError(f"--corpus {config.corpus}: no text found")
    tokenizer = train_tokenizer(texts + ["user", "assistant", "system"], config.vocab_size, config.out)
    print(f"tokenizer with {len(tokenizer)} tokens written to {config.out}")
    return 0


def world_export(config) -> int:
    """`rlhflab world export --out DIR [--seed S] [--size small|default] [--world W] [--habit-rate H]
    [--rankings N]`; the default world ranks more prompts (shared_content)."""

    if not config.out:
        raise UsageError("give --out (the directory to write the world's files into)")

    refuse_a_file(config.out)
    if not 0.0 <= config.habit_rate <= 1.0:
        raise UsageError(f"--habit-rate must be between 0 and 1, got {config.habit_rate}")
    constitution = load_constitution(config.constitution) if config.constitution else None
    habits, shared_content = WORLDS[config.world]
    if config.habits is not None:
        try:
            habits = parse_habits(config.habits)
        except ValueError as exc:
            raise UsageError(f"--habits: {exc}") from None
    result = export(config.out, seed=config.seed, size=config.size, habit_rate=config.habit_rate, habits=habits,
                    shared_content=shared_content, rankings=config.rankings or None)
    if constitution is not None:
        try:
            demonstrations = result["counts"]["sft.jsonl"]
            rows = feedback_rows(constitution, critiques=demonstrations, seed=config.seed,
                                 comparisons=config.comparisons or COMPARISONS_PER_DEMONSTRATION * demonstrations)
        except ValueError as exc:
            raise UsageError(f"--constitution {exc}") from None
        result["feedback.jsonl"] = f"{len(rows)} rows"
        atomic_write_jsonl(Path(config.out) / "feedback.jsonl", rows)
    for name, info in result.items():
        print(f"{name}: {info}")
    return 0
